"""The real server as a subprocess over stdio, driven the way an editor
drives it (pygls's ``LanguageClient``), recording what the server sends:
messages, progress, and the answers to ``window/workDoneProgress/create``
(which it can delay or never give, like a slow client). Used by the fuzz
tests and ``lsp-llm soak``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from math import inf
from typing import Any

from lsprotocol import types as t
from pygls.lsp.client import LanguageClient

DOCUMENT_COMMAND = "lsp-llm.document"


def server_command(model: str | None = None, threads: int = 2, log_level: str = "warning") -> list[str]:
    cmd = [sys.executable, "-m", "lsp_llm", "--threads", str(threads), "--log-level", log_level]
    return cmd + (["--model", model] if model else [])


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


class StdioServer:
    """One server process and its client. ``create_delay``: seconds before
    answering a progress token (None: at once; float('inf'): never)."""

    def __init__(self, command: list[str], create_delay: float | None = None) -> None:
        self.argv = command
        self.create_delay = create_delay
        self.client = LanguageClient("lsp-llm-test", "0.1")
        self.recorded = Recorded()
        self.stderr: deque[str] = deque(maxlen=200)
        self.init_result: t.InitializeResult | None = None
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self._release = asyncio.Event()
        self._register()

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

    @property
    def pid(self) -> int | None:
        proc = self.client._server  # pygls keeps the process here
        return proc.pid if proc is not None else None

    @property
    def alive(self) -> bool:
        proc = self.client._server
        return proc is not None and proc.returncode is None

    async def start(self, capabilities: t.ClientCapabilities, options: Any = None) -> t.InitializeResult:
        await self.client.start_io(*self.argv)
        proc = self.client._server
        assert proc is not None and proc.stderr is not None
        self._tasks.append(asyncio.ensure_future(self._drain(proc.stderr)))
        self.init_result = await asyncio.wait_for(self.client.initialize_async(t.InitializeParams(
            capabilities=capabilities, initialization_options=options, process_id=None)), 60)
        self.client.initialized(t.InitializedParams())
        return self.init_result

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        """Keep the server's stderr flowing (a full pipe would block it)."""
        while line := await stream.readline():
            self.stderr.append(line.decode("utf-8", "replace").rstrip())

    @property
    def encoding(self) -> str:
        """The negotiated position encoding (LSP's default: UTF-16)."""
        enc = self.init_result.capabilities.position_encoding if self.init_result else None
        return str(getattr(enc, "value", enc)) if enc is not None else "utf-16"

    async def request(self, method: str, params: Any, timeout: float = 30) -> Any:
        return await asyncio.wait_for(self.client.protocol.send_request_async(method, params), timeout)

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

    async def stop(self, timeout: float = 10) -> None:
        """Shut the server down; kill it if it does not exit in time."""
        proc = self.client._server
        self._release.set()
        try:
            if self.alive:
                await asyncio.wait_for(self.client.shutdown_async(None), timeout)
                self.client.exit(None)
                if proc is not None:
                    await asyncio.wait_for(proc.wait(), timeout)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - gone or stuck: kill it
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        await self.client.stop()
        for task in self._tasks:
            task.cancel()


def _progress_value(value: Any) -> Any:
    """$/progress values arrive as plain objects; type them by their kind."""
    kinds = {"begin": t.WorkDoneProgressBegin, "report": t.WorkDoneProgressReport, "end": t.WorkDoneProgressEnd}
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    if isinstance(value, dict) and kind in kinds:
        allowed = {"begin": ("title", "percentage", "message", "cancellable"),
                   "report": ("percentage", "message", "cancellable"), "end": ("message",)}[kind]
        return kinds[kind](**{k: v for k, v in value.items() if k in allowed})
    return value
