"""A tiny HTTP peer for fault cases: a stdlib server on 127.0.0.1 that passes requests through to
a real engine, or answers with a fault status while ``fault`` is set, or as ``rule`` says (a
function of the path and JSON body that returns a status and JSON answer, or None to pass)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

Rule = Callable[[str, Any], "tuple[int, Any] | None"]


class FaultProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = urlsplit(upstream)
        self.fault: int | None = None  # answer every request with this status
        self.rule: Rule | None = None
        self.seen: list[tuple[str, Any]] = []  # (path, body) of every request

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle(None)

    def do_POST(self) -> None:
        self._handle(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def _handle(self, raw: bytes | None) -> None:
        body = json.loads(raw) if raw else None
        self.server.seen.append((self.path, body))
        if self.server.fault is not None:
            status = self.server.fault
            return self._answer(status, {"error": {"code": status, "message": f"fault proxy says {status}"}})
        got = self.server.rule(self.path, body) if self.server.rule else None
        if got is not None:
            return self._answer(*got)
        self._pass(raw)

    def _answer(self, status: int, answer: Any) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _pass(self, raw: bytes | None) -> None:
        """The upstream's answer, written as it comes (a stream too), then the connection closes."""
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
            conn.request(self.command, self.path, body=raw, headers=headers)
            response = conn.getresponse()
            self.send_response(response.status)
            self.send_header("Content-Type", response.getheader("Content-Type") or "application/json")
            self.send_header("Connection", "close")
            self.end_headers()
            while chunk := response.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()
        except OSError:
            pass  # the client went: closing the upstream connection cancels its request
        finally:
            conn.close()
            self.close_connection = True


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
