"""An editor, as far as the benchmark needs one: pygls's ``LanguageClient``
driving the real lsp-llm server over stdio (as ``lsp_llm.tools.demo`` does).

    editor = await Editor.start(cmd, {"lineTokens": 12})
    editor.open(uri, text)
    editor.change(uri, old_text, (line, col), (line, col), "x")
    request = editor.complete(uri, text, (line, col))   # an asyncio.Future
    await editor.stop()

Positions are (line, column) in code points; the editor converts them to
UTF-16, the encoding it negotiates.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lsprotocol import types as t
from pygls.lsp.client import LanguageClient

from .lspclient import utf16_col
from .traces import Pos, offset_of

STATS_COMMAND = "lsp-llm.stats"


def lsp_position(text: str, pos: Pos) -> t.Position:
    line, col = pos
    start = offset_of(text, (line, 0))
    end = text.find("\n", start)
    line_text = text[start : end if end >= 0 else len(text)]
    return t.Position(line=line, character=utf16_col(line_text, col))


class Editor:
    """One server process and the documents open in it."""

    def __init__(self, client: LanguageClient, log: Path | None) -> None:
        self.client = client
        self.versions: dict[str, int] = {}
        # pygls pipes the server's stderr and never reads it: a full pipe would stall the server
        self._stderr = asyncio.ensure_future(_drain(self._process.stderr, log))

    @classmethod
    async def start(cls, cmd: Sequence[str], options: dict | None = None, timeout: float = 300.0,
                    log: Path | None = None) -> Editor:
        """Start the server (its stderr goes to log, or nowhere) and initialize it."""
        client = LanguageClient("lsp-llm-bench", "0.1")
        await client.start_io(*cmd)
        editor = cls(client, log)
        caps = t.ClientCapabilities(general=t.GeneralClientCapabilities(
            position_encodings=[t.PositionEncodingKind.Utf16]))
        await asyncio.wait_for(client.initialize_async(t.InitializeParams(
            capabilities=caps, process_id=None, root_uri=None, initialization_options=options)), timeout)
        client.initialized(t.InitializedParams())
        return editor

    @property
    def _process(self) -> asyncio.subprocess.Process:
        server = self.client._server  # pygls keeps the asyncio subprocess here
        assert server is not None, "the server is not running"
        return server

    @property
    def pid(self) -> int:
        return self._process.pid

    def open(self, uri: str, text: str) -> None:
        self.versions[uri] = 1
        self.client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))

    def change(self, uri: str, old: str, start: Pos, end: Pos, new_text: str) -> None:
        """One range edit, positions taken in the old text (as editors send)."""
        self.versions[uri] += 1
        rng = t.Range(lsp_position(old, start), lsp_position(old, end))
        self.client.text_document_did_change(t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
            content_changes=[t.TextDocumentContentChangePartial(range=rng, text=new_text)]))

    def complete(self, uri: str, text: str, pos: Pos) -> Request:
        """textDocument/completion at pos (in text); see Request."""
        params = t.CompletionParams(text_document=t.TextDocumentIdentifier(uri=uri),
                                    position=lsp_position(text, pos))
        return self._request(t.TEXT_DOCUMENT_COMPLETION, params)

    def inline(self, uri: str, text: str, pos: Pos) -> Request:
        """textDocument/inlineCompletion at pos (in text), invoked automatically."""
        params = t.InlineCompletionParams(
            text_document=t.TextDocumentIdentifier(uri=uri), position=lsp_position(text, pos),
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic))
        return self._request(t.TEXT_DOCUMENT_INLINE_COMPLETION, params)

    def _request(self, method: str, params: Any) -> Request:
        msg_id = str(uuid.uuid4())
        future = self.client.protocol.send_request_async(method, params, msg_id=msg_id)
        return Request(self, msg_id, future)

    async def stats(self, uri: str | None = None) -> dict:
        """lsp-llm.stats: a document's counters, or the server's."""
        args = [uri] if uri is not None else None
        res = await self.client.workspace_execute_command_async(
            t.ExecuteCommandParams(command=STATS_COMMAND, arguments=args))
        return dict(res or {})

    async def stop(self, timeout: float = 10.0) -> None:
        """shutdown + exit; kill the server if it does not exit in time."""
        try:
            await asyncio.wait_for(self.client.shutdown_async(None), timeout)
            self.client.exit(None)
        except Exception:  # noqa: BLE001 - the server may be gone already
            pass
        try:
            await asyncio.wait_for(self._process.wait(), timeout)
        except asyncio.TimeoutError:
            self._process.kill()
        await self.client.stop()
        await asyncio.wait_for(self._stderr, timeout)


async def _drain(stream: asyncio.StreamReader | None, log: Path | None) -> None:
    if stream is None:
        return
    with log.open("ab") if log is not None else open(os.devnull, "wb") as out:
        while chunk := await stream.read(65536):
            out.write(chunk)
            out.flush()  # a worker killed at its timeout keeps the server's last words


class Request:
    """A request in flight: await ``future``; ``cancel()`` sends $/cancelRequest
    as editors do when a newer keystroke makes the answer useless."""

    def __init__(self, editor: Editor, msg_id: str, future: asyncio.Future) -> None:
        self.editor = editor
        self.msg_id = msg_id
        self.future = future

    def cancel(self) -> None:
        if not self.future.done():
            self.editor.client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id=self.msg_id))


def completion_items(result: Any) -> list[t.CompletionItem]:
    if isinstance(result, t.CompletionList):
        return list(result.items)
    return list(result or [])


def inline_text(item: t.InlineCompletionItem) -> str:
    """What an inline item inserts (a plain string or a snippet's text)."""
    return item.insert_text if isinstance(item.insert_text, str) else item.insert_text.value


def inline_items(result: Any) -> list[t.InlineCompletionItem]:
    if isinstance(result, t.InlineCompletionList):
        return list(result.items)
    return list(result or [])
