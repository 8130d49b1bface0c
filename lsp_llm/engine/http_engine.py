"""What the HTTP engine clients share (llama-server's native API, ``llama_server.LlamaServer``;
OpenAI-compatible completions, ``openai_api.OpenAIEngine``), for synchronous callers.

The engine thread (and, for tokenization, the LSP event loop thread) calls plain methods;
each submits a coroutine to a private asyncio loop that runs ``httpx.AsyncClient`` (kept-alive
connections) in a daemon thread owned by the client, and polls ``should_stop()`` about every
10 ms while it waits. A stop cancels the request's task, which closes its connection, and
raises ``Cancelled``. Faults are ``EngineError`` with a kind the LSP server tells once.

``HttpEngine`` is the interface ``remote.RemotePool`` drives: ``connect``, ``tokenize``,
``piece``, ``feed``, ``top_next``, ``greedy``, ``measure_exact``, ``close``. A slot is where a
document's prompt goes when the API has slots; an API without them ignores it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from .session import Cancelled

log = logging.getLogger(__name__)

ShouldStop = Callable[[], bool]
T = TypeVar("T")
E = TypeVar("E", bound="HttpEngine")
POLL_S = 0.01  # how often a waiting call asks should_stop()
CLOSE_WAIT_S = 1.0  # how long a cancelled call waits for its connection to close
EXACT_TOP = 10  # tokens compared by measure_exact
REWIND_EXTRA = 8  # tokens appended (then dropped) by measure_exact's rewind

# close connections with a reset (linger 0): a cancelled request's connection is then refused at
# the server's very next write, where an orderly close lets one more write through first
ABORTIVE_CLOSE = [(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))]


def _never() -> bool:
    return False


class EngineError(Exception):
    """A fault of the remote engine. ``kind``: unreachable, timeout, auth, not_found, busy,
    bad_request, unsupported, server or protocol. Messages name the URL, never the API key;
    ``detail`` is the server's own message, if any."""

    def __init__(self, message: str, kind: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.detail = detail

    def __reduce__(self) -> tuple[type[EngineError], tuple[str, str, str]]:
        return (EngineError, (self.message, self.kind, self.detail))


@dataclass(frozen=True)
class Token:
    id: int
    piece: bytes


@dataclass(frozen=True)
class TopToken:
    id: int
    piece: bytes
    logprob: float


@dataclass(frozen=True)
class Timings:
    """``cache_n`` tokens reused from the server's cache, ``prompt_n`` evaluated, ``predicted_n``
    generated, ``ms`` the time for both; ``slot`` the server's slot that ran it (-1: not said)."""

    cache_n: int
    prompt_n: int
    predicted_n: int
    ms: float
    slot: int = -1


NO_TIMINGS = Timings(0, 0, 0, 0.0)


@dataclass(frozen=True)
class ServerInfo:
    model: str
    model_path: str
    n_slots: int
    n_ctx: int  # per slot
    infill: bool | None  # None: not detectable
    add_bos: bool  # whether the model's prompts start with BOS
    bos_id: int | None
    eos_id: int | None
    bos: str | None
    eos: str | None
    n_vocab: int | None
    slot_files: bool = False  # slots can be saved to and restored from the server's disk


@dataclass(frozen=True)
class ExactRuns:
    """The top tokens of one prompt cold, warm and after a rewind (``measure_exact``)."""

    cold: list[TopToken]
    warm: list[TopToken]
    rewound: list[TopToken]
    cold_timings: Timings
    warm_timings: Timings
    rewound_timings: Timings

    @property
    def exact(self) -> bool:
        return self.cold == self.warm == self.rewound


def piece_bytes(piece: str | list[int]) -> bytes:
    """A piece as llama-server's ``/tokenize`` gives it: text, or a list of bytes when not valid UTF-8."""
    return bytes(piece) if isinstance(piece, list) else piece.encode()


def display_url(base_url: str) -> str:
    """The URL without any user:password part, for messages."""
    url = httpx.URL(base_url)
    return str(url.copy_with(username=None, password=None)).rstrip("/")


def _server_message(response: httpx.Response) -> str:
    """The server's message: ``{"error": {"message"}}`` (OpenAI, llama-server), ``{"error": text}``,
    or ``{"message"}`` at the top (vLLM's older errors)."""
    try:
        answer = response.json()
        error = answer.get("error") or answer.get("message")
    except (ValueError, AttributeError):
        return response.text.strip()[:300]
    if isinstance(error, dict):
        return str(error.get("message", ""))
    return str(error or "")


class _Loop:
    """A private asyncio loop in a daemon thread; ``call`` runs a coroutine there and waits,
    asking ``should_stop`` every POLL_S."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llama-server-client", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], should_stop: ShouldStop) -> T:
        done = threading.Event()
        future = asyncio.run_coroutine_threadsafe(self._guard(coro, done), self.loop)
        while True:
            try:
                return future.result(timeout=POLL_S)
            except concurrent.futures.TimeoutError:
                if should_stop():
                    future.cancel()  # cancels the task: httpx closes its connection
                    done.wait(CLOSE_WAIT_S)
                    raise Cancelled() from None

    @staticmethod
    async def _guard(coro: Awaitable[T], done: threading.Event) -> T:
        try:
            return await coro
        finally:
            done.set()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class HttpEngine:
    """An engine served over HTTP: the connection, the faults, the synchronous calls. Subclasses
    give the API (``_connect``, ``_tokenize``, ``_piece``, ``_exact_runs`` and the completions)."""

    api = "?"  # engineApi
    name = "the engine"  # in messages: "<name> at <url>"

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0, verify: bool | ssl.SSLContext = True
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = display_url(self.base_url)
        self.label = f"{self.name} at {self.url}"
        self.timeout_s = timeout_s
        self.info: ServerInfo | None = None
        self.last_exact: ExactRuns | None = None
        self._has_key = bool(api_key)
        self._pieces: dict[int, bytes] = {}
        self._closed = False
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        self._loop = _Loop()
        transport = httpx.AsyncHTTPTransport(verify=verify, socket_options=ABORTIVE_CLOSE)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- synchronous API ---------------------------------------------------------------------

    def connect(self) -> ServerInfo:
        """What the server runs: model, slots, context, BOS/EOS, infill support."""
        self.info = self._call(self._connect(), _never)
        return self.info

    def tokenize(self, text: bytes, should_stop: ShouldStop = _never) -> list[Token]:
        """``text`` as tokens with their pieces, no BOS, special-token text kept as text.
        Invalid UTF-8 goes as U+FFFD (then the pieces do not join to ``text``)."""
        return self._call(self._tokenize(text), should_stop)

    def piece(self, id: int) -> bytes:
        """The bytes of token ``id``: from every tokenize and top-token answer, else asked for
        (``/detokenize``, whose text loses a piece that is not valid UTF-8 on its own)."""
        known = self._pieces.get(id)
        if known is None:
            known = self._call(self._piece(id), _never)
        return known

    def feed(self, slot: int, prompt: list[int], should_stop: ShouldStop = _never) -> Timings:
        """Bring the server's cache (``slot``'s, where the API has slots) to ``prompt``."""
        raise NotImplementedError

    def top_next(
        self, slot: int, prompt: list[int], n: int, should_stop: ShouldStop = _never
    ) -> tuple[list[TopToken], Timings]:
        """The ``n`` most likely tokens after ``prompt`` with their log-probabilities."""
        raise NotImplementedError

    def greedy(
        self,
        slots: list[int] | None,
        prompts: list[list[int]],
        n_predict: int,
        should_stop: ShouldStop = _never,
        stop: list[str] | None = None,
        t_max_ms: int = 0,
    ) -> list[tuple[list[int], Timings]]:
        """The greedy continuation of each prompt (up to ``n_predict`` tokens;
        past ``t_max_ms`` of generation, where the API can, it ends at the next
        line break)."""
        raise NotImplementedError

    def infill(self, slot: int, prefix: str, suffix: str, n_predict: int, should_stop: ShouldStop = _never,
               stop: list[str] | None = None, t_max_ms: int = 0) -> tuple[list[int], Timings]:
        """The greedy middle between ``prefix`` and ``suffix`` (where ``ServerInfo.infill``); past
        ``t_max_ms``, it ends at the next line break."""
        raise NotImplementedError

    def save_slot(self, slot: int, filename: str) -> int:
        """The slot's cache saved on the server (where ``ServerInfo.slot_files``): tokens saved."""
        raise NotImplementedError

    def restore_slot(self, slot: int, filename: str) -> int:
        """The slot's cache restored from the server's disk: tokens restored (0: none)."""
        raise NotImplementedError

    def measure_exact(self, prompt: list[int], slot: int = 0) -> bool:
        """Whether ``prompt``'s top tokens agree bit for bit cold (evaluated whole), warm (again,
        from the cache) and after a rewind (a longer prompt fed, then this one). The details are
        kept in ``last_exact``."""
        self.last_exact = self._call(self._exact_runs(prompt, slot), _never)
        log.info("%s exact across cache states: %s", self.label, self.last_exact.exact)
        return self.last_exact.exact

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._http.aclose(), _never)
        finally:
            self._loop.stop()

    def __enter__(self: E) -> E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what an API gives ----------------------------------------------------------------------

    async def _connect(self) -> ServerInfo:
        raise NotImplementedError

    async def _tokenize(self, text: bytes) -> list[Token]:
        raise NotImplementedError

    async def _piece(self, id: int) -> bytes:
        raise NotImplementedError

    async def _exact_runs(self, prompt: list[int], slot: int) -> ExactRuns:
        raise NotImplementedError

    def _not_found_hint(self) -> str:
        """What a 404 suggests about the URL or the API."""
        return ""

    # -- plumbing -------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], should_stop: ShouldStop) -> T:
        if should_stop():
            coro.close()
            raise Cancelled()
        return self._loop.call(coro, should_stop)

    async def _send(self, method: str, path: str, body: dict[str, Any] | None, stream: bool) -> httpx.Response:
        """Send a request; once more on a fresh connection when a kept-alive one turns out to
        have been closed by the server (idle timeout) before any answer came."""
        for attempt in range(2):
            request = self._http.build_request(method, path, json=body)
            try:
                return await self._http.send(request, stream=stream)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                if attempt:
                    raise self._transport_fault(e, path) from None
                log.debug("%s closed a kept-alive connection (%s): again", self.label, e)
            except httpx.HTTPError as e:
                raise self._transport_fault(e, path) from None
        raise AssertionError("unreachable")

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self._send(method, path, body, stream=False)
        if response.status_code != 200:
            raise self._status_fault(response, path)
        try:
            return response.json()
        except ValueError:
            raise EngineError(f"{self.label} sent no JSON for {path}", "protocol") from None

    async def _optional(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """An answer the client can do without (404, 501 -> None)."""
        try:
            return await self._json(method, path, body)
        except EngineError as e:
            if e.kind in ("not_found", "unsupported"):
                return None
            raise

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The server-sent events of one streamed request, as JSON objects."""
        response = await self._send("POST", path, body, stream=True)
        try:
            if response.status_code != 200:
                await response.aread()
                raise self._status_fault(response, path)
            async for line in response.aiter_lines():
                event = self._event(line, path)
                if event is not None:
                    yield event
        except httpx.HTTPError as e:
            raise self._transport_fault(e, path) from None
        finally:
            await response.aclose()  # on a cancel too: the connection closes with the request unfinished

    def _event(self, line: str, path: str) -> dict[str, Any] | None:
        name, _, data = line.partition(":")
        if name not in ("data", "error") or not data.strip() or data.strip() == "[DONE]":
            return None
        try:
            event = json.loads(data)
        except ValueError:
            raise EngineError(f"{self.label} streamed malformed JSON on {path}", "protocol") from None
        if name == "error" or (isinstance(event, dict) and "error" in event):
            error = event.get("error", event) if isinstance(event, dict) else event
            message = error.get("message", error) if isinstance(error, dict) else error
            raise EngineError(f"{self.label} failed on {path}: {message}", "server", str(message))
        return event if isinstance(event, dict) else None

    # -- faults ---------------------------------------------------------------------------------

    def _transport_fault(self, e: httpx.HTTPError, path: str) -> EngineError:
        if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
            return EngineError(f"{self.label} did not answer {path} within {self.timeout_s:g} s", "timeout")
        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
            return EngineError(f"cannot reach {self.label}: {type(e).__name__}: {e}", "unreachable")
        if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return EngineError(f"{self.label} dropped the connection during {path}: {e}", "unreachable")
        return EngineError(f"{self.label} failed on {path}: {type(e).__name__}: {e}", "protocol")

    def _status_fault(self, response: httpx.Response, path: str) -> EngineError:
        status, message = response.status_code, _server_message(response)
        if status in (401, 403):
            if not self._has_key:
                return EngineError(f"{self.label} needs an API key: set LSP_LLM_API_KEY", "auth")
            return EngineError(f"{self.label} rejected the API key (LSP_LLM_API_KEY)", "auth")
        if status == 404:
            return EngineError(f"{self.label} has no {path} (HTTP 404): {self._not_found_hint()}", "not_found")
        if status == 429:
            return EngineError(f"{self.label} is busy: too many requests (HTTP 429)", "busy", message)
        if status == 501:
            return EngineError(f"{self.label} does not support {path}: {message}", "unsupported", message)
        if status >= 500:
            return EngineError(f"{self.label} failed on {path} (HTTP {status}): {message}", "server", message)
        return EngineError(f"{self.label} refused {path} (HTTP {status}): {message}", "bad_request", message)
