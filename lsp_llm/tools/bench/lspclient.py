"""A small, generic LSP client over a subprocess's stdio (JSON-RPC 2.0 with
Content-Length framing), for driving a language server as an editor would.

Threads: the caller's thread writes; one reader thread parses frames and
completes pending requests; one thread drains stderr into a file (or
discards it). Server-to-client requests get an empty, successful answer
unless a handler is registered for them.

    client = LspClient.spawn([sys.executable, "-m", "lsp_llm", ...])
    client.initialize(root_uri=None)
    client.did_open(uri, text)
    client.did_change(uri, [change_event(text, start, end, new)])
    items = client.completion(uri, line, utf16_character)
    client.close()
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

Handler = Callable[[Any], Any]


class LspError(Exception):
    """An error response from the server."""

    def __init__(self, method: str, error: dict) -> None:
        self.code = error.get("code")
        self.data = error.get("data")
        super().__init__(f"{method}: {error.get('message', error)} (code {self.code})")


class ServerExited(Exception):
    pass


def utf16_col(line: str, col: int) -> int:
    """Code-point column on a line to LSP's default UTF-16 column."""
    head = line[:col]
    if head.isascii():
        return col
    return len(head.encode("utf-16-le")) // 2


def position(text: str, line: int, col: int) -> dict:
    """An LSP Position for a code-point (line, col) in text."""
    start = 0
    for _ in range(line):
        start = text.index("\n", start) + 1
    end = text.find("\n", start)
    line_text = text[start : end if end >= 0 else len(text)]
    return {"line": line, "character": utf16_col(line_text, col)}


def change_event(old_text: str, start: tuple[int, int], end: tuple[int, int], new: str) -> dict:
    """A TextDocumentContentChangeEvent with a range, positions taken in old_text."""
    return {
        "range": {"start": position(old_text, *start), "end": position(old_text, *end)},
        "text": new,
    }


class _Pending:
    __slots__ = ("event", "result", "error", "received_at", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self.event = threading.Event()
        self.result: Any = None
        self.error: dict | None = None
        self.received_at = 0.0


class LspClient:
    def __init__(self, proc: subprocess.Popen, stderr_path: str | os.PathLike[str] | None = None) -> None:
        self.proc = proc
        self._out: BinaryIO = proc.stdin  # type: ignore[assignment]
        self._in: BinaryIO = proc.stdout  # type: ignore[assignment]
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._handlers: dict[str, Handler] = {}
        self._notification_handlers: dict[str, Handler] = {}
        self.notifications: list[tuple[str, Any]] = []
        self.keep_notifications = False
        self.versions: dict[str, int] = {}
        self.server_capabilities: dict = {}
        self._reader = threading.Thread(target=self._read_loop, name="lsp-reader", daemon=True)
        self._reader.start()
        self._stderr_thread = None
        if proc.stderr is not None:
            self._stderr_thread = threading.Thread(
                target=self._drain_stderr, args=(stderr_path,), name="lsp-stderr", daemon=True
            )
            self._stderr_thread.start()

    @classmethod
    def spawn(
        cls,
        cmd: Sequence[str],
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        stderr_path: str | os.PathLike[str] | None = None,
    ) -> LspClient:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            bufsize=0,
        )
        return cls(proc, stderr_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- wire ---------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        body = json.dumps(msg, separators=(",", ":")).encode("utf-8")
        frame = b"Content-Length: %d\r\n\r\n" % len(body) + body
        with self._write_lock:
            if self._closed:
                raise ServerExited("the client is closed")
            try:
                self._out.write(frame)
                self._out.flush()
            except (BrokenPipeError, OSError) as e:
                raise ServerExited(f"cannot write to the server: {e}") from None

    def _read_frame(self) -> dict | None:
        length = None
        while True:
            line = self._in.readline()
            if not line:
                return None
            line = line.strip()
            if not line:
                if length is not None:
                    break
                continue
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        data = b""
        while len(data) < length:
            chunk = self._in.read(length - len(data))
            if not chunk:
                return None
            data += chunk
        return json.loads(data)

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self._read_frame()
                if msg is None:
                    break
                now = time.perf_counter()
                if "method" in msg:
                    if "id" in msg:
                        self._answer_server_request(msg)
                    else:
                        self._on_notification(msg["method"], msg.get("params"))
                    continue
                with self._lock:
                    pending = self._pending.pop(msg.get("id"), None)
                if pending is None:
                    continue
                pending.received_at = now
                pending.result = msg.get("result")
                pending.error = msg.get("error")
                pending.event.set()
        except Exception:  # a broken frame ends the session
            log.exception("LSP reader failed")
        finally:
            with self._lock:
                pending_all = list(self._pending.values())
                self._pending.clear()
            for p in pending_all:
                p.error = {"code": -32099, "message": "server exited"}
                p.event.set()

    def _drain_stderr(self, path: str | os.PathLike[str] | None) -> None:
        stream = self.proc.stderr
        assert stream is not None
        if path is None:
            for _ in iter(lambda: stream.read(65536), b""):
                pass
            return
        with Path(path).open("ab") as f:
            for chunk in iter(lambda: stream.read(65536), b""):
                f.write(chunk)
                f.flush()

    def _answer_server_request(self, msg: dict) -> None:
        handler = self._handlers.get(msg["method"])
        reply: dict = {"jsonrpc": "2.0", "id": msg["id"]}
        try:
            reply["result"] = handler(msg.get("params")) if handler else None
        except Exception as e:  # report, don't die
            reply["error"] = {"code": -32603, "message": str(e)}
        try:
            self._send(reply)
        except ServerExited:
            pass

    def _on_notification(self, method: str, params: Any) -> None:
        if self.keep_notifications:
            self.notifications.append((method, params))
        handler = self._notification_handlers.get(method)
        if handler is not None:
            try:
                handler(params)
            except Exception:
                log.exception("notification handler for %s failed", method)

    # -- public API -----------------------------------------------------------------
    def on_request(self, method: str, handler: Handler) -> None:
        """Answer server-to-client requests of this method with handler(params)."""
        self._handlers[method] = handler

    def on_notification(self, method: str, handler: Handler) -> None:
        self._notification_handlers[method] = handler

    def notify(self, method: str, params: Any = None) -> None:
        msg: dict = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self._send(msg)

    def send_request(self, method: str, params: Any = None) -> tuple[int, _Pending]:
        """Send a request without waiting; see wait()."""
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            pending = _Pending(method)
            self._pending[rid] = pending
        msg: dict = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        try:
            self._send(msg)
        except ServerExited:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        return rid, pending

    def wait(self, rid: int, pending: _Pending, timeout: float | None = None) -> Any:
        if not pending.event.wait(timeout):
            with self._lock:
                self._pending.pop(rid, None)
            self.cancel(rid)
            raise TimeoutError(f"{pending.method}: no answer within {timeout}s")
        if pending.error is not None:
            if pending.error.get("code") == -32099:
                raise ServerExited(f"{pending.method}: the server exited")
            raise LspError(pending.method, pending.error)
        return pending.result

    def request(self, method: str, params: Any = None, timeout: float | None = 60.0) -> Any:
        rid, pending = self.send_request(method, params)
        return self.wait(rid, pending, timeout)

    def cancel(self, rid: int) -> None:
        try:
            self.notify("$/cancelRequest", {"id": rid})
        except ServerExited:
            pass

    # -- LSP conveniences ---------------------------------------------------------
    def initialize(
        self,
        root_uri: str | None = None,
        capabilities: dict | None = None,
        initialization_options: Any = None,
        timeout: float = 120.0,
    ) -> dict:
        caps = capabilities or {
            "textDocument": {
                "synchronization": {"dynamicRegistration": False, "didSave": False},
                "completion": {
                    "completionItem": {"snippetSupport": False, "insertReplaceSupport": True},
                    "contextSupport": True,
                },
            },
            "workspace": {"executeCommand": {"dynamicRegistration": False}},
            "general": {"positionEncodings": ["utf-16"]},
        }
        params = {
            "processId": os.getpid(),
            "clientInfo": {"name": "lsp-llm-bench"},
            "rootUri": root_uri,
            "capabilities": caps,
        }
        if initialization_options is not None:
            params["initializationOptions"] = initialization_options
        result = self.request("initialize", params, timeout=timeout)
        self.server_capabilities = (result or {}).get("capabilities", {})
        self.notify("initialized", {})
        return result

    def did_open(self, uri: str, text: str, language_id: str = "python", version: int = 1) -> None:
        self.versions[uri] = version
        self.notify(
            "textDocument/didOpen",
            {"textDocument": {"uri": uri, "languageId": language_id, "version": version, "text": text}},
        )

    def did_change(self, uri: str, changes: list[dict]) -> int:
        version = self.versions.get(uri, 0) + 1
        self.versions[uri] = version
        self.notify(
            "textDocument/didChange",
            {"textDocument": {"uri": uri, "version": version}, "contentChanges": changes},
        )
        return version

    def did_close(self, uri: str) -> None:
        self.versions.pop(uri, None)
        self.notify("textDocument/didClose", {"textDocument": {"uri": uri}})

    def completion_params(self, uri: str, line: int, character: int, trigger_kind: int = 1) -> dict:
        return {
            "textDocument": {"uri": uri},
            "position": {"line": line, "character": character},
            "context": {"triggerKind": trigger_kind},
        }

    def completion(self, uri: str, line: int, character: int, timeout: float | None = 60.0) -> Any:
        return self.request("textDocument/completion", self.completion_params(uri, line, character), timeout)

    def execute_command(self, command: str, arguments: list | None = None, timeout: float | None = 60.0) -> Any:
        params: dict = {"command": command}
        if arguments is not None:
            params["arguments"] = arguments
        return self.request("workspace/executeCommand", params, timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        try:
            self.request("shutdown", None, timeout=timeout)
            self.notify("exit")
        except (ServerExited, TimeoutError, LspError):
            pass

    def close(self, timeout: float = 10.0) -> int | None:
        """shutdown + exit, then wait for the process (killing it if it hangs)."""
        if self.proc.poll() is None:
            self.shutdown(timeout)
        with self._write_lock:
            self._closed = True
            try:
                self._out.close()
            except OSError:
                pass
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(2)
        if self._stderr_thread is not None:
            self._stderr_thread.join(2)
        return rc

    def __enter__(self) -> LspClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
