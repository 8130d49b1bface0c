"""The tools' one LSP client: the real server as a subprocess over stdio,
driven the way an editor drives it (pygls's ``LanguageClient``). The demo,
the soak, the bench and the fuzz and lifecycle tests use it.

It records what the server sends besides answers (messages, progress, the
``window/workDoneProgress/create`` requests, whose answers it can delay or
never give, like a slow client), keeps the server's stderr flowing (its last
lines kept, all of it written to a log if given), and hands out requests
that can be cancelled as editors do.

    server = await StdioServer.launch(server_command(model), {"lineTokens": 12})
    server.open(uri, text)
    server.change(uri, old_text, (line, col), (line, col), "x")
    request = server.complete(uri, text, (line, col))  # await request.future; request.cancel()
    await server.stop()

Positions given as (line, column) count code points on lines ending in
``\\n``; the client converts them to the negotiated encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from math import inf
from pathlib import Path
from typing import IO, Any

from lsprotocol import types as t
from pygls.lsp.client import LanguageClient

from .editor_text import Pos, lsp_position

DOCUMENT_COMMAND = "lsp-llm.document"
STATS_COMMAND = "lsp-llm.stats"
UTF16_CLIENT = t.ClientCapabilities(general=t.GeneralClientCapabilities(
    position_encodings=[t.PositionEncodingKind.Utf16]))


def server_command(model: str | None = None, threads: int = 2, log_level: str | None = "warning",
                   base: Sequence[str] | None = None, **flags: object) -> list[str]:
    """The command that starts the server: ``base`` (default: this Python's
    ``-m lsp_llm``) and its flags, ``n_ctx=1024`` as ``--n-ctx 1024``; no
    ``--log-level`` when log_level is None or base sets one."""
    cmd = list(base or [sys.executable, "-m", "lsp_llm"])
    if log_level and "--log-level" not in cmd:
        cmd += ["--log-level", log_level]
    for name, value in {"model": model, "threads": threads, **flags}.items():
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


@dataclass
class Recorded:
    """What the server sent besides answers."""

    messages: list[t.ShowMessageParams] = field(default_factory=list)
    progress: dict[str, list[Any]] = field(default_factory=dict)  # token -> begin/report/end values
    created: list[str] = field(default_factory=list)  # tokens the server asked to create

    def unended(self) -> list[str]:
        """Tokens whose progress began and did not end (or did not begin first)."""
        return [tok for tok, vs in self.progress.items()
                if not vs or not isinstance(vs[0], t.WorkDoneProgressBegin)
                or not isinstance(vs[-1], t.WorkDoneProgressEnd)
                or sum(isinstance(v, t.WorkDoneProgressEnd) for v in vs) != 1]


class Request:
    """A request in flight: await ``future``; ``answered`` is when its answer
    arrived (``time.perf_counter()``); ``cancel()`` sends ``$/cancelRequest``
    as editors do when a newer keystroke makes the answer useless."""

    def __init__(self, server: StdioServer, msg_id: str, sent: Future) -> None:
        self.server, self.msg_id = server, msg_id
        self.answered: float | None = None
        sent.add_done_callback(self._arrived)  # runs as the answer is read, not when an awaiter wakes
        self.future: asyncio.Future = asyncio.wrap_future(sent)

    def _arrived(self, _: Future) -> None:
        self.answered = time.perf_counter()

    def cancel(self, even_if_answered: bool = False) -> None:
        if even_if_answered or not self.future.done():
            self.server.client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id=self.msg_id))


class StdioServer:
    """One server process and its client. ``create_delay``: seconds before
    answering a progress token (None: at once; float('inf'): never);
    ``log``: a file that gets all of the server's stderr."""

    def __init__(self, command: Sequence[str], create_delay: float | None = None, log: Path | None = None) -> None:
        self.argv = list(command)
        self.create_delay = create_delay
        self.log = log
        self.client = LanguageClient("lsp-llm-tools", "0.1")
        self.recorded = Recorded()
        self.stderr: deque[str] = deque(maxlen=200)  # its last lines
        self.init_result: t.InitializeResult | None = None
        self.versions: dict[str, int] = {}  # of the documents opened with open()
        self._ids = itertools.count()
        self._drained: asyncio.Future | None = None
        self._release = asyncio.Event()
        self._register()

    @classmethod
    async def launch(cls, command: Sequence[str], options: Any = None, timeout: float = 60.0,
                     log: Path | None = None, capabilities: t.ClientCapabilities = UTF16_CLIENT) -> StdioServer:
        """A started and initialized server; stopped again if it did not initialize."""
        server = cls(command, log=log)
        try:
            await server.start(capabilities, options, timeout)
        except BaseException:
            await server.stop()
            raise
        return server

    def _register(self) -> None:
        rec = self.recorded

        @self.client.feature(t.WINDOW_SHOW_MESSAGE)
        def show(params: t.ShowMessageParams) -> None:
            rec.messages.append(params)

        @self.client.feature(t.WINDOW_LOG_MESSAGE)
        def log_message(params: t.LogMessageParams) -> None:
            pass

        @self.client.feature(t.PROGRESS)
        def progress(params: t.ProgressParams) -> None:
            rec.progress.setdefault(str(params.token), []).append(_progress_value(params.value))

        @self.client.feature(t.WINDOW_WORK_DONE_PROGRESS_CREATE)
        async def create(params: t.WorkDoneProgressCreateParams) -> None:
            rec.created.append(str(params.token))
            if self.create_delay is not None:  # stop() releases the answers still held
                delay = None if self.create_delay == inf else self.create_delay
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._release.wait(), delay)

    # -- the process ------------------------------------------------------------------------

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        return self.client._server  # pygls keeps the process here

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server is not running"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, capabilities: t.ClientCapabilities = UTF16_CLIENT, options: Any = None,
                    timeout: float = 60.0, root_uri: str | None = None) -> t.InitializeResult:
        await self.client.start_io(*self.argv)
        assert self.process is not None and self.process.stderr is not None
        self._drained = asyncio.ensure_future(self._drain(self.process.stderr))
        self.init_result = await asyncio.wait_for(self.client.initialize_async(t.InitializeParams(
            capabilities=capabilities, initialization_options=options, process_id=None, root_uri=root_uri)), timeout)
        self.client.initialized(t.InitializedParams())
        return self.init_result

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        """Keep the server's stderr flowing (a full pipe would block it)."""
        with self.log.open("ab") if self.log is not None else contextlib.nullcontext() as out:
            while chunk := await stream.read(65536):
                _write(out, chunk)
                self.stderr.extend(chunk.decode("utf-8", "replace").splitlines())

    @property
    def encoding(self) -> str:
        """The negotiated position encoding (LSP's default: UTF-16)."""
        enc = self.init_result.capabilities.position_encoding if self.init_result else None
        return str(getattr(enc, "value", enc)) if enc is not None else "utf-16"

    async def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down; kill it if it does not exit in time."""
        self._release.set()
        if self.process is not None:
            await self._end(self.process, timeout)
        await self.client.stop()
        if self._drained is not None:  # the log complete
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained, timeout)

    async def _end(self, proc: asyncio.subprocess.Process, timeout: float) -> None:
        try:
            if proc.returncode is None:
                await asyncio.wait_for(self.client.shutdown_async(None), timeout)
                self.client.exit(None)
            await asyncio.wait_for(proc.wait(), timeout)
        except Exception:  # noqa: BLE001 - gone or stuck: kill it
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    # -- requests ---------------------------------------------------------------------------

    def send(self, method: str, params: Any) -> Request:
        """A request, not awaited: see Request."""
        msg_id = f"tools-{next(self._ids)}"
        return Request(self, msg_id, self.client.protocol.send_request(method, params, msg_id=msg_id))

    async def request(self, method: str, params: Any, timeout: float = 30) -> Any:
        return await asyncio.wait_for(self.send(method, params).future, timeout)

    async def raw_request(self, method: str, params: Any, timeout: float = 30) -> Any:
        """A request exactly as given, bypassing the client's type checks."""
        msg_id = f"raw-{next(self._ids)}"
        fut: Future = Future()
        self.client.protocol._request_futures[msg_id] = fut
        self.client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)

    async def command(self, name: str, *args: Any, timeout: float = 30) -> Any:
        return await self.request(t.WORKSPACE_EXECUTE_COMMAND,
                                  t.ExecuteCommandParams(command=name, arguments=list(args) or None), timeout)

    async def document(self, uri: str) -> dict[str, Any]:
        """The server's mirror of a document (``lsp-llm.document``)."""
        return await self.command(DOCUMENT_COMMAND, uri)

    async def stats(self, uri: str | None = None, timeout: float = 30) -> dict[str, Any]:
        """``lsp-llm.stats``: a document's counters, or the server's."""
        return dict(await self.command(STATS_COMMAND, *([uri] if uri else []), timeout=timeout) or {})

    # -- documents, positions in code points ------------------------------------------------

    def open(self, uri: str, text: str) -> None:
        self.versions[uri] = 1
        self.client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))

    def change(self, uri: str, old: str, start: Pos, end: Pos, new_text: str) -> None:
        """One range edit, positions taken in the old text (as editors send)."""
        self.versions[uri] += 1
        rng = t.Range(lsp_position(old, start, self.encoding), lsp_position(old, end, self.encoding))
        self.client.text_document_did_change(t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
            content_changes=[t.TextDocumentContentChangePartial(range=rng, text=new_text)]))

    def complete(self, uri: str, text: str, pos: Pos) -> Request:
        """textDocument/completion at pos (in text)."""
        return self.send(t.TEXT_DOCUMENT_COMPLETION, t.CompletionParams(
            text_document=t.TextDocumentIdentifier(uri=uri), position=lsp_position(text, pos, self.encoding)))

    def inline(self, uri: str, text: str, pos: Pos) -> Request:
        """textDocument/inlineCompletion at pos (in text), invoked automatically."""
        return self.send(t.TEXT_DOCUMENT_INLINE_COMPLETION, t.InlineCompletionParams(
            text_document=t.TextDocumentIdentifier(uri=uri), position=lsp_position(text, pos, self.encoding),
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic)))


def _write(out: IO[bytes] | None, chunk: bytes) -> None:
    if out is not None:
        out.write(chunk)
        out.flush()  # a bench worker killed at its timeout keeps the server's last words


def _progress_value(value: Any) -> Any:
    """$/progress values arrive as plain objects; type them by their kind."""
    kinds = {"begin": t.WorkDoneProgressBegin, "report": t.WorkDoneProgressReport, "end": t.WorkDoneProgressEnd}
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    if isinstance(value, dict) and kind in kinds:
        allowed = {"begin": ("title", "percentage", "message", "cancellable"),
                   "report": ("percentage", "message", "cancellable"), "end": ("message",)}[kind]
        return kinds[kind](**{k: v for k, v in value.items() if k in allowed})
    return value


def completion_items(result: Any) -> list[t.CompletionItem]:
    if isinstance(result, t.CompletionList):
        return list(result.items)
    return list(result or [])


def inline_items(result: Any) -> list[t.InlineCompletionItem]:
    if isinstance(result, t.InlineCompletionList):
        return list(result.items)
    return list(result or [])


def inline_text(item: t.InlineCompletionItem) -> str:
    """What an inline item inserts (a plain string or a snippet's text)."""
    return item.insert_text if isinstance(item.insert_text, str) else item.insert_text.value
