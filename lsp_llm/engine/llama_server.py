"""A client for llama-server's native API (llama.cpp's HTTP server); the plumbing it shares
with the OpenAI-compatible client is in ``http_engine``.


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
- ``/infill`` takes the text around the cursor (``input_prefix``, ``input_suffix``; its
  ``prompt`` must be a string) and lays it out with the model's FIM tokens, prefix first:
  ``BOS <PRE> prefix <SUF> suffix <MID>``. It streams and answers as ``/completion`` does.
- ``POST /slots/{id}?action=save|restore`` with ``{"filename": ...}`` needs ``--slot-save-path``
  (else 501); an unknown action is a 400, which tells at connect without touching a slot.
  The file name is appended to the path as given (the path needs its trailing slash).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from .http_engine import (
    EXACT_TOP,
    REWIND_EXTRA,
    EngineError,
    ExactRuns,
    HttpEngine,
    ServerInfo,
    ShouldStop,
    Timings,
    Token,
    TopToken,
    _never,
    piece_bytes,
)

__all__ = ["EngineError", "ExactRuns", "LlamaServer", "ServerInfo", "Timings", "Token", "TopToken"]

log = logging.getLogger(__name__)

# greedy decoding: only the most likely token survives, whatever the server's defaults
GREEDY = {"samplers": ["top_k"], "top_k": 1, "temperature": 0.0}


def _timings(answer: dict[str, Any]) -> Timings:
    t = answer.get("timings") or {}
    ms = float(t.get("prompt_ms", 0.0)) + float(t.get("predicted_ms", 0.0))
    return Timings(int(t.get("cache_n", 0)), int(t.get("prompt_n", 0)), int(t.get("predicted_n", 0)), ms,
                   int(answer.get("id_slot", -1)))


class LlamaServer(HttpEngine):
    """llama-server's native API (``/completion`` with token-id prompts, ``/tokenize``, ``/slots``)."""

    api = "llama-server"
    name = "llama-server"
    shared = False  # several lsp-llm servers on this engine: it chooses the slots (see RemotePool.slot)

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
        t_max_ms: int = 0,
    ) -> list[tuple[list[int], Timings]]:
        """The greedy continuation of each prompt (up to ``n_predict`` tokens, ending at EOS or
        after a ``stop`` string, whose tokens are included; past ``t_max_ms`` of generation, at
        the next line break: ``t_max_predict_ms``). Without ``slots``, all prompts go in one
        request; with them, prompt i runs on ``slots[i]`` (one request each, concurrently)."""
        if slots is not None and len(slots) != len(prompts):
            raise ValueError("one slot per prompt")
        if not prompts:
            return []
        for slot in slots or []:
            self._slot(slot)
        return self._call(self._greedy(slots, prompts, n_predict, stop, t_max_ms), should_stop)

    def infill(
        self,
        slot: int,
        prefix: str,
        suffix: str,
        n_predict: int,
        should_stop: ShouldStop = _never,
        stop: list[str] | None = None,
        t_max_ms: int = 0,
    ) -> tuple[list[int], Timings]:
        """The greedy middle between ``prefix`` and ``suffix`` (``/infill``, the server's FIM
        layout), as ``greedy`` bounds and stops it, on ``slot``; past ``t_max_ms`` of generation
        the server ends it at the next line break (``t_max_predict_ms``: a first line comes back
        whole, and what is ready comes back within the budget)."""
        body = {"input_prefix": prefix, "input_suffix": suffix, "input_extra": [], "n_predict": n_predict,
                "return_tokens": True, "stop": stop or [], "id_slot": self._slot(slot), **GREEDY,
                "t_max_predict_ms": t_max_ms}
        return self._call(self._many(body, 1, "/infill"), should_stop)[0]

    def save_slot(self, slot: int, filename: str) -> int:
        """The slot's cache written to ``filename`` on the server: the tokens saved."""
        answer = self._call(self._slot_action(slot, "save", filename), _never)
        return int(answer.get("n_saved", 0))

    def restore_slot(self, slot: int, filename: str) -> int:
        """The slot's cache read back from ``filename``: the tokens restored (0 when the file
        is not there or does not fit)."""
        try:
            answer = self._call(self._slot_action(slot, "restore", filename), _never)
        except EngineError as e:
            if e.kind != "bad_request":
                raise
            return 0
        return int(answer.get("n_restored", 0))

    def measure_exact(self, prompt: list[int], slot: int = 0) -> bool:
        """``HttpEngine.measure_exact`` on ``slot``'s cache."""
        return super().measure_exact(prompt, self._slot(slot))

    def slots(self) -> list[dict[str, Any]]:
        """``GET /slots`` as the server gives it (``is_processing`` for each slot)."""
        return self._call(self._json("GET", "/slots"), _never)

    # -- plumbing -------------------------------------------------------------------------------

    def _slot(self, slot: int) -> int:
        """The ``id_slot`` a request goes with: the document's slot, or -1
        (shared: the server picks one; see ``RemotePool.slot``)."""
        if slot == -1 and self.shared:
            return -1
        if slot < 0 or (self.info is not None and slot >= self.info.n_slots):
            n = self.info.n_slots if self.info else "?"
            raise ValueError(f"slot {slot} out of range: llama-server at {self.url} has {n} slots")
        return slot

    def _events(self, body: dict[str, Any], path: str = "/completion") -> AsyncIterator[dict[str, Any]]:
        """The streamed answers of one ``/completion`` (or ``/infill``) request."""
        return self._stream(path, {"cache_prompt": True, **body, "stream": True})

    async def _slot_action(self, slot: int, action: str, filename: str) -> dict[str, Any]:
        return await self._json("POST", f"/slots/{self._slot(slot)}?action={action}", {"filename": filename})

    async def _one(self, body: dict[str, Any]) -> tuple[dict[str, Any], Timings]:
        """One prompt's first answer (the one with probabilities) and the final timings."""
        first: dict[str, Any] | None = None
        timings: Timings | None = None
        async for event in self._events(body):  # to the end: the connection goes back to the pool
            first = first or event
            if event.get("stop"):
                timings = _timings(event)
        if first is None or timings is None:
            raise EngineError(f"{self.label} ended /completion without a final answer", "protocol")
        return first, timings

    async def _many(self, body: dict[str, Any], n: int, path: str = "/completion") -> list[tuple[list[int], Timings]]:
        """Tokens and timings of each of ``n`` prompts sent in one request."""
        tokens: list[list[int]] = [[] for _ in range(n)]
        timings: list[Timings | None] = [None] * n
        async for event in self._events(body, path):
            i = int(event.get("index", 0))
            tokens[i].extend(event.get("tokens") or [])
            if event.get("stop"):
                timings[i] = _timings(event)
        if any(t is None for t in timings):
            raise EngineError(f"{self.label} ended {path} before every answer", "protocol")
        return [(tok, t) for tok, t in zip(tokens, timings) if t is not None]

    async def _greedy(
        self, slots: list[int] | None, prompts: list[list[int]], n_predict: int, stop: list[str] | None,
        t_max_ms: int = 0,
    ) -> list[tuple[list[int], Timings]]:
        body = {"n_predict": n_predict, "return_tokens": True, "stop": stop or [], **GREEDY,
                "t_max_predict_ms": t_max_ms}
        if slots is None:
            prompt: list[int] | list[list[int]] = prompts[0] if len(prompts) == 1 else prompts
            return await self._many({**body, "prompt": prompt}, len(prompts))
        asks = [self._many({**body, "prompt": p, "id_slot": s}, 1) for s, p in zip(slots, prompts)]
        return [answer[0] for answer in await asyncio.gather(*asks)]

    def _top_tokens(self, answer: dict[str, Any]) -> list[TopToken]:
        probs = answer.get("completion_probabilities") or []
        if not probs:
            raise EngineError(f"{self.label} sent no completion_probabilities", "protocol")
        top = []
        for entry in probs[0].get("top_logprobs") or probs[0].get("top_probs") or []:
            piece = bytes(entry["bytes"]) if "bytes" in entry else str(entry.get("token", "")).encode()
            self._pieces[int(entry["id"])] = piece
            top.append(TopToken(int(entry["id"]), piece, float(entry["logprob"])))
        return top

    async def _tokenize(self, text: bytes) -> list[Token]:
        body = {"content": text.decode("utf-8", "replace"), "with_pieces": True}
        answer = await self._json("POST", "/tokenize", {**body, "add_special": False, "parse_special": False})
        tokens = [Token(int(t["id"]), piece_bytes(t["piece"])) for t in answer["tokens"]]
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
        self._pieces[int(tokens[0]["id"])] = piece_bytes(tokens[0]["piece"])
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
            slot_files=await self._slot_files(),
        )

    @staticmethod
    def _n_ctx(props: dict[str, Any], model: dict[str, Any]) -> int:
        settings = props.get("default_generation_settings") or {}
        return int(settings.get("n_ctx") or props.get("n_ctx") or (model.get("meta") or {}).get("n_ctx") or 0)

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

    async def _slot_files(self) -> bool:
        """Whether slots can be saved and restored (``--slot-save-path``), asked with an unknown
        action: 400 with it, 501 without."""
        try:
            await self._json("POST", "/slots/0?action=probe", {})
        except EngineError as e:
            if e.kind in ("bad_request", "unsupported", "not_found"):
                return e.kind == "bad_request"
            raise
        return False

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

    def _not_found_hint(self) -> str:
        hint = "is the URL that of llama.cpp's llama-server with its native API (/completion, /tokenize, /props)?"
        if self.base_url.endswith("/v1"):
            hint += (' The URL ends in /v1: engineApi "llama-server" takes the server\'s root URL '
                     '(http://host:8080); for an OpenAI-compatible /v1 URL set engineApi to "openai".')
        return hint
