"""A client for llama-server's native API (llama.cpp's HTTP server), for synchronous callers.

The engine thread (and, for tokenization, the LSP event loop thread) calls plain methods;
each submits a coroutine to a private asyncio loop that runs ``httpx.AsyncClient`` (kept-alive
connections) in a daemon thread owned by the client, and polls ``should_stop()`` about every
10 ms while it waits. A stop cancels the request's task, which closes its connection, and
raises ``Cancelled``.

Server behaviour this relies on (measured with llama.cpp's server through xllamacpp):

- ``/completion`` requests are streamed (``"stream": true``): the server notices a closed
  connection at its next write (connections close with a reset, so the first write fails) and
  stops the task between decode steps: a cancelled generation decoded 0-2 more tokens. Without
  streaming it went on generating for tens of seconds after the client had gone.
- A prompt given as token ids gets no BOS added: callers send it (``ServerInfo.bos_id``).
- ``n_predict: 0`` still samples (and streams) one token; ``n_probs`` are raw (pre-sampling).
- A list of prompts in one request runs as one task each, answered by ``index``; one
  ``id_slot`` applies to the whole request, so prompts meant for given slots go as
  concurrent requests, one per slot (the server batches them all the same).
- An ``id_slot`` out of range is silently ignored (any slot is used): checked here.
- With ``stop`` strings, ``tokens`` still carry every generated token, the stop's included.
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
POLL_S = 0.01  # how often a waiting call asks should_stop()
CLOSE_WAIT_S = 1.0  # how long a cancelled call waits for its connection to close
EXACT_TOP = 10  # tokens compared by measure_exact
REWIND_EXTRA = 8  # tokens appended (then dropped) by measure_exact's rewind

# greedy decoding: only the most likely token survives, whatever the server's defaults
GREEDY = {"samplers": ["top_k"], "top_k": 1, "temperature": 0.0}
# close connections with a reset (linger 0): a cancelled request's connection is then refused at
# the server's very next write, where an orderly close lets one more write through first
ABORTIVE_CLOSE = [(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))]


def _never() -> bool:
    return False


class EngineError(Exception):
    """A fault of the remote engine. ``kind``: unreachable, timeout, auth, not_found, busy,
    bad_request, unsupported, server or protocol. Messages name the URL, never the API key."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind

    def __reduce__(self) -> tuple[type[EngineError], tuple[str, str]]:
        return (EngineError, (self.message, self.kind))


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
    """``cache_n`` tokens reused from the slot's cache, ``prompt_n`` evaluated, ``predicted_n``
    generated, ``ms`` the server's time for both."""

    cache_n: int
    prompt_n: int
    predicted_n: int
    ms: float


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


def _piece_bytes(piece: str | list[int]) -> bytes:
    """A piece as ``/tokenize`` gives it: text, or a list of bytes when not valid UTF-8."""
    return bytes(piece) if isinstance(piece, list) else piece.encode()


def _timings(answer: dict[str, Any]) -> Timings:
    t = answer.get("timings") or {}
    ms = float(t.get("prompt_ms", 0.0)) + float(t.get("predicted_ms", 0.0))
    return Timings(int(t.get("cache_n", 0)), int(t.get("prompt_n", 0)), int(t.get("predicted_n", 0)), ms)


def _display_url(base_url: str) -> str:
    """The URL without any user:password part, for messages."""
    url = httpx.URL(base_url)
    return str(url.copy_with(username=None, password=None)).rstrip("/")


def _server_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
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


class LlamaServer:
    """llama-server's native API (``/completion`` with token-id prompts, ``/tokenize``, ``/slots``)."""

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0, verify: bool | ssl.SSLContext = True
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = _display_url(self.base_url)
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
        return f"LlamaServer({self.url!r})"

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
        """The bytes of token ``id``: from every tokenize and n_probs answer, else asked for
        (``/detokenize``, whose text loses a piece that is not valid UTF-8 on its own)."""
        known = self._pieces.get(id)
        if known is None:
            known = self._call(self._piece(id), _never)
        return known

    def feed(self, slot: int, prompt: list[int], should_stop: ShouldStop = _never) -> Timings:
        """Bring ``slot``'s cache to ``prompt`` (re-feed in idle time)."""
        body = {"prompt": prompt, "n_predict": 0, "id_slot": self._slot(slot), **GREEDY}
        return self._call(self._one(body), should_stop)[1]

    def top_next(
        self, slot: int, prompt: list[int], n: int, should_stop: ShouldStop = _never
    ) -> tuple[list[TopToken], Timings]:
        """The ``n`` most likely tokens after ``prompt`` with raw (pre-sampling) log-probabilities."""
        body = {"prompt": prompt, "n_predict": 1, "n_probs": n, "id_slot": self._slot(slot), **GREEDY}
        answer, timings = self._call(self._one(body), should_stop)
        return self._top_tokens(answer), timings

    def greedy(
        self,
        slots: list[int] | None,
        prompts: list[list[int]],
        n_predict: int,
        should_stop: ShouldStop = _never,
        stop: list[str] | None = None,
    ) -> list[tuple[list[int], Timings]]:
        """The greedy continuation of each prompt (up to ``n_predict`` tokens, ending at EOS or
        after a ``stop`` string, whose tokens are included). Without ``slots``, all prompts go in
        one request; with them, prompt i runs on ``slots[i]`` (one request each, concurrently)."""
        if slots is not None and len(slots) != len(prompts):
            raise ValueError("one slot per prompt")
        if not prompts:
            return []
        for slot in slots or []:
            self._slot(slot)
        return self._call(self._greedy(slots, prompts, n_predict, stop), should_stop)

    def measure_exact(self, prompt: list[int], slot: int = 0) -> bool:
        """Whether ``prompt``'s top tokens agree bit for bit cold (evaluated whole), warm (again,
        from the cache) and after a rewind (a longer prompt fed, then this one). Uses ``slot``'s
        cache; the details are kept in ``last_exact``."""
        self.last_exact = self._call(self._exact_runs(prompt, self._slot(slot)), _never)
        log.info("llama-server at %s exact across cache states: %s", self.url, self.last_exact.exact)
        return self.last_exact.exact

    def slots(self) -> list[dict[str, Any]]:
        """``GET /slots`` as the server gives it (``is_processing`` for each slot)."""
        return self._call(self._json("GET", "/slots"), _never)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._http.aclose(), _never)
        finally:
            self._loop.stop()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], should_stop: ShouldStop) -> T:
        if should_stop():
            coro.close()
            raise Cancelled()
        return self._loop.call(coro, should_stop)

    def _slot(self, slot: int) -> int:
        if slot < 0 or (self.info is not None and slot >= self.info.n_slots):
            n = self.info.n_slots if self.info else "?"
            raise ValueError(f"slot {slot} out of range: llama-server at {self.url} has {n} slots")
        return slot

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
                log.debug("llama-server at %s closed a kept-alive connection (%s): again", self.url, e)
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
            raise EngineError(f"llama-server at {self.url} sent no JSON for {path}", "protocol") from None

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The streamed answers of one ``/completion`` request."""
        response = await self._send("POST", "/completion", {"cache_prompt": True, **body, "stream": True}, stream=True)
        try:
            if response.status_code != 200:
                await response.aread()
                raise self._status_fault(response, "/completion")
            async for line in response.aiter_lines():
                event = self._event(line)
                if event is not None:
                    yield event
        except httpx.HTTPError as e:
            raise self._transport_fault(e, "/completion") from None
        finally:
            await response.aclose()  # on a cancel too: the connection closes with the request unfinished

    def _event(self, line: str) -> dict[str, Any] | None:
        name, _, data = line.partition(":")
        if name not in ("data", "error") or not data.strip():
            return None
        try:
            event = json.loads(data)
        except ValueError:
            raise EngineError(f"llama-server at {self.url} streamed malformed JSON", "protocol") from None
        if name == "error" or (isinstance(event, dict) and "error" in event):
            error = event.get("error", event) if isinstance(event, dict) else event
            message = error.get("message", error) if isinstance(error, dict) else error
            raise EngineError(f"llama-server at {self.url} failed on /completion: {message}", "server")
        return event if isinstance(event, dict) else None

    async def _one(self, body: dict[str, Any]) -> tuple[dict[str, Any], Timings]:
        """One prompt's first answer (the one with probabilities) and the final timings."""
        first: dict[str, Any] | None = None
        timings: Timings | None = None
        async for event in self._events(body):  # to the end: the connection goes back to the pool
            first = first or event
            if event.get("stop"):
                timings = _timings(event)
        if first is None or timings is None:
            raise EngineError(f"llama-server at {self.url} ended /completion without a final answer", "protocol")
        return first, timings

    async def _many(self, body: dict[str, Any], n: int) -> list[tuple[list[int], Timings]]:
        """Tokens and timings of each of ``n`` prompts sent in one request."""
        tokens: list[list[int]] = [[] for _ in range(n)]
        timings: list[Timings | None] = [None] * n
        async for event in self._events(body):
            i = int(event.get("index", 0))
            tokens[i].extend(event.get("tokens") or [])
            if event.get("stop"):
                timings[i] = _timings(event)
        if any(t is None for t in timings):
            raise EngineError(f"llama-server at {self.url} ended /completion before every answer", "protocol")
        return [(tok, t) for tok, t in zip(tokens, timings) if t is not None]

    async def _greedy(
        self, slots: list[int] | None, prompts: list[list[int]], n_predict: int, stop: list[str] | None
    ) -> list[tuple[list[int], Timings]]:
        body = {"n_predict": n_predict, "return_tokens": True, "stop": stop or [], **GREEDY}
        if slots is None:
            prompt: list[int] | list[list[int]] = prompts[0] if len(prompts) == 1 else prompts
            return await self._many({**body, "prompt": prompt}, len(prompts))
        asks = [self._many({**body, "prompt": p, "id_slot": s}, 1) for s, p in zip(slots, prompts)]
        return [answer[0] for answer in await asyncio.gather(*asks)]

    def _top_tokens(self, answer: dict[str, Any]) -> list[TopToken]:
        probs = answer.get("completion_probabilities") or []
        if not probs:
            raise EngineError(f"llama-server at {self.url} sent no completion_probabilities", "protocol")
        top = []
        for entry in probs[0].get("top_logprobs") or probs[0].get("top_probs") or []:
            piece = bytes(entry["bytes"]) if "bytes" in entry else str(entry.get("token", "")).encode()
            self._pieces[int(entry["id"])] = piece
            top.append(TopToken(int(entry["id"]), piece, float(entry["logprob"])))
        return top

    async def _tokenize(self, text: bytes) -> list[Token]:
        body = {"content": text.decode("utf-8", "replace"), "with_pieces": True}
        answer = await self._json("POST", "/tokenize", {**body, "add_special": False, "parse_special": False})
        tokens = [Token(int(t["id"]), _piece_bytes(t["piece"])) for t in answer["tokens"]]
        self._pieces.update((t.id, t.piece) for t in tokens)
        return tokens

    async def _special(self, text: str | None) -> int | None:
        """The id of a special token's text (``<bos>``), if it is one token."""
        if not text:
            return None
        answer = await self._json("POST", "/tokenize", {"content": text, "parse_special": True, "with_pieces": True})
        tokens = answer.get("tokens") or []
        if len(tokens) != 1:
            return None
        self._pieces[int(tokens[0]["id"])] = _piece_bytes(tokens[0]["piece"])
        return int(tokens[0]["id"])

    async def _piece(self, id: int) -> bytes:
        answer = await self._json("POST", "/detokenize", {"tokens": [id]})
        piece = str(answer.get("content", "")).encode()
        self._pieces[id] = piece
        return piece

    async def _connect(self) -> ServerInfo:
        props = await self._json("GET", "/props")
        models = await self._optional("GET", "/v1/models")
        model = (models or {}).get("data") or [{}]
        path = str(props.get("model_path") or model[0].get("id") or "")
        n_slots = props.get("total_slots") or len(await self._optional("GET", "/slots") or [None])
        bos_start = (await self._json("POST", "/tokenize", {"content": "", "add_special": True})).get("tokens") or []
        bos, eos = props.get("bos_token"), props.get("eos_token")
        return ServerInfo(
            model=str(props.get("model_alias") or model[0].get("id") or path).rsplit("/", 1)[-1],
            model_path=path,
            n_slots=int(n_slots),
            n_ctx=self._n_ctx(props, model[0]),
            infill=await self._infill(),
            add_bos=bool(bos_start),
            bos_id=int(bos_start[0]) if bos_start else await self._special(bos),
            eos_id=await self._special(eos),
            bos=bos,
            eos=eos,
            n_vocab=(model[0].get("meta") or {}).get("n_vocab"),
        )

    @staticmethod
    def _n_ctx(props: dict[str, Any], model: dict[str, Any]) -> int:
        settings = props.get("default_generation_settings") or {}
        return int(settings.get("n_ctx") or props.get("n_ctx") or (model.get("meta") or {}).get("n_ctx") or 0)

    async def _optional(self, method: str, path: str) -> Any:
        """An answer the client can do without (404, 501 -> None)."""
        try:
            return await self._json(method, path)
        except EngineError as e:
            if e.kind in ("not_found", "unsupported"):
                return None
            raise

    async def _infill(self) -> bool | None:
        """Infill support, asked without running a task: llama-server checks the model's FIM
        tokens (501) before it validates the input (400 for this malformed one)."""
        try:
            await self._json("POST", "/infill", {"input_extra": "probe"})
        except EngineError as e:
            if e.kind == "unsupported":
                return False
            if e.kind == "bad_request":
                return True
            if e.kind == "not_found":
                return None
            raise
        return None

    async def _exact_runs(self, prompt: list[int], slot: int) -> ExactRuns:
        probe = {"n_predict": 1, "n_probs": EXACT_TOP, "id_slot": slot, **GREEDY}
        # cold: ``cache_prompt: false`` evaluates the whole prompt. An erased slot (``POST
        # /slots/{id}?action=erase``, which needs --slot-save-path) or one fed something else is
        # not enough: the server restores a matching prefix from its host-memory prompt cache.
        cold, cold_t = await self._one({**probe, "prompt": prompt, "cache_prompt": False})
        warm, warm_t = await self._one({**probe, "prompt": prompt})
        longer = prompt + prompt[-REWIND_EXTRA:]
        await self._one({"prompt": longer, "n_predict": 0, "id_slot": slot, **GREEDY})
        rewound, rewound_t = await self._one({**probe, "prompt": prompt})
        tops = [self._top_tokens(a) for a in (cold, warm, rewound)]
        return ExactRuns(*tops, cold_t, warm_t, rewound_t)

    # -- faults ---------------------------------------------------------------------------------

    def _transport_fault(self, e: httpx.HTTPError, path: str) -> EngineError:
        if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
            message = f"llama-server at {self.url} did not answer {path} within {self.timeout_s:g} s"
            return EngineError(message, "timeout")
        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
            return EngineError(f"cannot reach llama-server at {self.url}: {type(e).__name__}: {e}", "unreachable")
        if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return EngineError(f"llama-server at {self.url} dropped the connection during {path}: {e}", "unreachable")
        return EngineError(f"llama-server at {self.url} failed on {path}: {type(e).__name__}: {e}", "protocol")

    def _status_fault(self, response: httpx.Response, path: str) -> EngineError:
        status, message = response.status_code, _server_message(response)
        if status in (401, 403):
            if not self._has_key:
                return EngineError(f"llama-server at {self.url} needs an API key: set LSP_LLM_API_KEY", "auth")
            return EngineError(f"llama-server at {self.url} rejected the API key (LSP_LLM_API_KEY)", "auth")
        if status == 404:
            return EngineError(
                f"llama-server at {self.url} has no {path} (HTTP 404): is the URL that of llama.cpp's "
                f"llama-server with its native API (/completion, /tokenize, /props)?",
                "not_found",
            )
        if status == 429:
            return EngineError(f"llama-server at {self.url} is busy: too many requests (HTTP 429)", "busy")
        if status == 501:
            return EngineError(f"llama-server at {self.url} does not support {path}: {message}", "unsupported")
        if status >= 500:
            return EngineError(f"llama-server at {self.url} failed on {path} (HTTP {status}): {message}", "server")
        return EngineError(f"llama-server at {self.url} refused {path} (HTTP {status}): {message}", "bad_request")
