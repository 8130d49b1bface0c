"""A client for OpenAI-compatible completions (``engineApi: openai``): vLLM, SGLang, llama-server's
``/v1``. The base URL is the one OpenAI clients take, with ``/v1``.

- Prompts go as token ids to ``POST {base}/completions`` (the legacy completions API), greedy
  (``temperature: 0``), streamed so that closing the connection cancels the request, never
  with ``echo``. No slots: the server's prefix cache does the reuse.
- Tokens come from the server's own tokenizer at its root (``{root}/tokenize``, outside
  ``/v1``): llama-server's (``content``, with pieces) or vLLM's (``prompt`` -> ids; the pieces
  from ``/detokenize``). Without one, ``connect`` fails naming what is missing.
- Top tokens (``logprobs: n``) come as llama-server gives them (``logprobs.content[i]`` with
  ``id``, ``bytes`` and ``top_logprobs``; ``return_tokens_as_token_ids`` is ignored there) or
  as OpenAI's legacy answer does (``logprobs.top_logprobs[i]``, text -> logprob, or
  ``token_id:N`` -> logprob with vLLM's ``return_tokens_as_token_ids``). Text keys are mapped to
  ids through the pieces seen, else the tokenizer (a text that is not one token is dropped).
- Fields not every server takes (``return_tokens_as_token_ids``, ``stream_options``, the cold
  run's ``cache_prompt``/``cache_salt``) are dropped, and remembered as refused, when a 400 names
  them; a 400 about ``logprobs`` lowers the number asked (vLLM allows 20 by default) and
  remembers the cap.
- Stats: ``usage.prompt_tokens_details.cached_tokens`` where the server reports it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from .http_engine import (
    EXACT_TOP,
    NO_TIMINGS,
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

log = logging.getLogger(__name__)

DEFAULT_DOCS = 4  # documents kept fed when the server does not say how many prompts it caches
DEFAULT_N_CTX = 4096  # when the server does not say
OPTIONAL = ("return_tokens_as_token_ids", "stream_options", "cache_prompt", "cache_salt")
PIECE_ASKS = 16  # concurrent /detokenize requests for a tokenizer without pieces


@dataclass(frozen=True)
class _Tok:
    """A token as an answer names it: its id if given, its text, its bytes if given."""

    id: int | None
    text: str
    raw: bytes | None = None


@dataclass
class _Answer:
    """One streamed completion: each generated token with the top tokens at its step."""

    steps: list[tuple[_Tok, list[tuple[_Tok, float]]]] = field(default_factory=list)
    text: str = ""
    usage: dict[str, Any] | None = None
    choices: bool = False  # whether any event had OpenAI's ``choices``


def _tok_of(text: str) -> _Tok:
    """A token named by text; ``token_id:N`` (vLLM's return_tokens_as_token_ids) names its id."""
    prefix, _, rest = text.partition("token_id:")
    return _Tok(int(rest), text) if not prefix and rest.isdigit() else _Tok(None, text)


def _tok_of_entry(entry: dict[str, Any]) -> _Tok:
    """llama-server's token entry: ``id``, ``token``, ``bytes``."""
    raw = bytes(entry["bytes"]) if isinstance(entry.get("bytes"), list) else None
    text = str(entry.get("token", ""))
    return _Tok(int(entry["id"]), text, raw) if "id" in entry else _Tok(_tok_of(text).id, text, raw)


def _steps(logprobs: dict[str, Any] | None) -> list[tuple[_Tok, list[tuple[_Tok, float]]]]:
    """The tokens of one chunk's ``logprobs``, in either form."""
    if not logprobs:
        return []
    if isinstance(logprobs.get("content"), list):  # llama-server (chat-style entries)
        return [(_tok_of_entry(c), [(_tok_of_entry(t), float(t["logprob"])) for t in c.get("top_logprobs") or []])
                for c in logprobs["content"]]
    tops = logprobs.get("top_logprobs") or []
    return [(_tok_of(str(text)), [(_tok_of(str(k)), float(v)) for k, v in (tops[i] if i < len(tops) else {}).items()])
            for i, text in enumerate(logprobs.get("tokens") or [])]


def _timings(answer: _Answer, prompt: list[int], ms: float) -> Timings:
    usage = answer.usage or {}
    prompt_n = int(usage.get("prompt_tokens") or len(prompt))
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return Timings(cached, prompt_n - cached, int(usage.get("completion_tokens") or len(answer.steps)), ms)


def _lower(detail: str, asked: int) -> int | None:
    """The number of top tokens to ask for after a 400 about ``logprobs``: the largest number
    below ``asked`` that the message names (vLLM: "... greater than max allowed: 20"), else half."""
    named = [int(n) for n in re.findall(r"\d+", detail) if 0 < int(n) < asked]
    if named:
        return max(named)
    return asked // 2 if asked > 1 else None


class OpenAIEngine(HttpEngine):
    """OpenAI-compatible legacy completions (``{base}/completions``) with token-id prompts."""

    api = "openai"
    name = "the OpenAI-compatible engine"

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0, **kw: Any) -> None:
        super().__init__(base_url, api_key, timeout_s, **kw)
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self.root = root  # where the tokenizer is (llama-server's and vLLM's are not under /v1)
        self.model_id = ""
        self.tokenizer: str | None = None  # "llama-server" or "vllm", found at connect
        self.max_logprobs: int | None = None  # learnt from a 400
        self.refused: set[str] = set()  # optional fields the server refused
        self._ids: dict[bytes, int] = {}  # piece -> id, for top tokens named by text

    # -- synchronous API ---------------------------------------------------------------------

    def feed(self, slot: int, prompt: list[int], should_stop: ShouldStop = _never) -> Timings:
        """One token generated after ``prompt``: the server's prefix cache then holds it."""
        return self._call(self._timed(prompt, 1), should_stop)[1]

    def top_next(
        self, slot: int, prompt: list[int], n: int, should_stop: ShouldStop = _never
    ) -> tuple[list[TopToken], Timings]:
        """The ``n`` (at most the server's cap) most likely tokens after ``prompt``."""
        return self._call(self._top(prompt, n), should_stop)

    def greedy(
        self,
        slots: list[int] | None,
        prompts: list[list[int]],
        n_predict: int,
        should_stop: ShouldStop = _never,
        stop: list[str] | None = None,
        t_max_ms: int = 0,
    ) -> list[tuple[list[int], Timings]]:
        """The greedy continuation of each prompt (one request each, concurrently; ``slots`` are
        ignored). With ``stop`` strings, the text ends before the stop (OpenAI's rule). The API
        has no time limit (``t_max_ms`` is ignored): ``should_stop`` ends a call past its budget."""
        if not prompts:
            return []
        if n_predict <= 0:
            return [([], NO_TIMINGS) for _ in prompts]
        return self._call(self._greedy_all(prompts, n_predict, stop), should_stop)

    # -- the API -------------------------------------------------------------------------------

    def _body(self, prompt: list[int], max_tokens: int, logprobs: int | None, extra: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_id, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                                "return_tokens_as_token_ids": True, **extra}
        if logprobs is not None:
            body["logprobs"] = min(logprobs, self.max_logprobs or logprobs)
        return {k: v for k, v in body.items() if k not in self.refused}

    async def _complete(self, prompt: list[int], max_tokens: int, logprobs: int | None = None,
                        extra: dict[str, Any] | None = None) -> _Answer:
        """One completion; again without what a 400 refused (a field, or that many logprobs)."""
        while True:
            body = self._body(prompt, max_tokens, logprobs, extra or {})
            try:
                return await self._read(body)
            except EngineError as e:
                if e.kind != "bad_request" or not self._adapt(e.detail, body):
                    raise

    def _adapt(self, detail: str, body: dict[str, Any]) -> bool:
        """Whether a 400's message names something the request can do without."""
        named = [k for k in OPTIONAL if k in body and k in detail]
        if named:
            log.info("%s refused %s: asking without", self.label, ", ".join(named))
            self.refused.update(named)
            return True
        if "logprobs" in body and "logprobs" in detail.lower():
            lower = _lower(detail, body["logprobs"])
            if lower is not None:
                log.info("%s allows fewer logprobs than %d: asking %d", self.label, body["logprobs"], lower)
                self.max_logprobs = lower
                return True
        return False

    async def _read(self, body: dict[str, Any]) -> _Answer:
        answer = _Answer()
        async for event in self._stream("/completions", body):  # to the end: the connection is reused
            self._take(answer, event)
        if not answer.choices:
            raise EngineError(f"{self.label} answered /completions without OpenAI's choices: "
                              f"{self._expected()}", "protocol")
        return answer

    @staticmethod
    def _take(answer: _Answer, event: dict[str, Any]) -> None:
        answer.usage = event.get("usage") or answer.usage
        choices = event.get("choices")
        if not isinstance(choices, list):
            return
        answer.choices = True
        for choice in choices:
            answer.text += str(choice.get("text") or "")
            answer.steps.extend(_steps(choice.get("logprobs")))

    async def _timed(self, prompt: list[int], max_tokens: int, logprobs: int | None = None,
                     extra: dict[str, Any] | None = None) -> tuple[_Answer, Timings]:
        t0 = time.perf_counter()
        answer = await self._complete(prompt, max_tokens, logprobs, extra)
        return answer, _timings(answer, prompt, (time.perf_counter() - t0) * 1000)

    async def _top(self, prompt: list[int], n: int, extra: dict[str, Any] | None = None
                   ) -> tuple[list[TopToken], Timings]:
        answer, timings = await self._timed(prompt, 1, n, extra)
        if not answer.steps:
            raise EngineError(f"{self.label} sent no logprobs on /completions", "protocol")
        best: dict[int, TopToken] = {}
        for tok, logprob in answer.steps[0][1]:
            token = await self._resolve(tok)
            if token is not None and (token.id not in best or best[token.id].logprob < logprob):
                best[token.id] = TopToken(token.id, token.piece, logprob)
        return sorted(best.values(), key=lambda t: -t.logprob)[:n], timings

    async def _greedy_all(self, prompts: list[list[int]], n_predict: int, stop: list[str] | None
                          ) -> list[tuple[list[int], Timings]]:
        extra = {"stop": stop} if stop else {}
        return list(await asyncio.gather(*(self._greedy(p, n_predict, extra) for p in prompts)))

    async def _greedy(self, prompt: list[int], n_predict: int, extra: dict[str, Any]) -> tuple[list[int], Timings]:
        answer, timings = await self._timed(prompt, n_predict, 1, extra)  # logprobs: the tokens' ids
        tokens = [await self._resolve(tok) for tok, _ in answer.steps]
        if answer.steps and all(t is not None for t in tokens):
            return [t.id for t in tokens if t is not None], timings
        return [t.id for t in await self._tokenize(answer.text.encode())], timings  # named by text only

    async def _resolve(self, tok: _Tok) -> Token | None:
        """A token of an answer as id and piece."""
        if tok.id is not None:
            if tok.raw is not None:
                self._learn(tok.id, tok.raw)
            piece = self._pieces.get(tok.id)
            return Token(tok.id, piece if piece is not None else await self._piece(tok.id))
        raw = tok.raw if tok.raw is not None else tok.text.encode()
        if raw in self._ids:
            return Token(self._ids[raw], raw)
        found = await self._tokenize(raw)
        return found[0] if len(found) == 1 and found[0].piece == raw else None

    def _learn(self, id: int, piece: bytes) -> None:
        self._pieces[id] = piece
        self._ids.setdefault(piece, id)

    # -- the tokenizer ---------------------------------------------------------------------------

    async def _tokenize(self, text: bytes) -> list[Token]:
        content = text.decode("utf-8", "replace")
        if self.tokenizer == "vllm":
            answer = await self._json("POST", self._root("/tokenize"), {"prompt": content, "add_special_tokens": False})
            ids = [int(i) for i in answer.get("tokens") or []]
            await self._pieces_of(ids)
            return [Token(i, self._pieces[i]) for i in ids]
        body = {"content": content, "with_pieces": True, "add_special": False, "parse_special": False}
        answer = await self._json("POST", self._root("/tokenize"), body)
        tokens = [Token(int(t["id"]), piece_bytes(t["piece"])) for t in answer.get("tokens") or []]
        for t in tokens:
            self._learn(t.id, t.piece)
        return tokens

    async def _pieces_of(self, ids: list[int]) -> None:
        """Every piece not known yet, asked for a few at a time."""
        gate = asyncio.Semaphore(PIECE_ASKS)

        async def one(id: int) -> None:
            async with gate:
                await self._piece(id)

        await asyncio.gather(*(one(i) for i in dict.fromkeys(ids) if i not in self._pieces))

    async def _piece(self, id: int) -> bytes:
        answer = await self._json("POST", self._root("/detokenize"), {"tokens": [id]})
        piece = str(answer.get("content", answer.get("prompt", ""))).encode()
        self._learn(id, piece)
        return piece

    async def _find_tokenizer(self) -> str:
        """Which tokenizer the server has at its root: llama-server's or vLLM's."""
        path = self._root("/tokenize")
        found = await self._probe(path, {"content": "a", "with_pieces": True})
        if found and isinstance(found[0], dict):
            return "llama-server"
        found = await self._probe(path, {"prompt": "a", "add_special_tokens": False})
        if found and all(isinstance(i, int) for i in found):
            return "vllm"
        raise EngineError(
            f"{self.label} has no tokenizer lsp-llm can use: {path} answered neither as llama-server's "
            f"(content -> tokens with pieces) nor as vLLM's (prompt -> token ids). lsp-llm sends prompts as "
            f"token ids, so it needs the engine's own tokenizer", "unsupported")

    async def _probe(self, path: str, body: dict[str, Any]) -> list[Any] | None:
        try:
            answer = await self._json("POST", path, body)
        except EngineError as e:
            if e.kind in ("not_found", "unsupported", "bad_request", "protocol"):
                return None
            raise
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        return tokens if isinstance(tokens, list) else None

    def _root(self, path: str) -> str:
        return self.root + path

    # -- connect and exactness -----------------------------------------------------------------

    async def _connect(self) -> ServerInfo:
        model = await self._model()
        self.model_id = str(model["id"])
        self.tokenizer = await self._find_tokenizer()
        props = await self._optional("GET", self._root("/props")) if self.tokenizer == "llama-server" else None
        props = props if isinstance(props, dict) else {}
        start = await self._bos()
        bos, eos = props.get("bos_token"), props.get("eos_token")
        settings = props.get("default_generation_settings") or {}
        return ServerInfo(
            model=self.model_id.rsplit("/", 1)[-1],
            model_path=self.model_id,
            n_slots=int(props.get("total_slots") or DEFAULT_DOCS),
            n_ctx=int(settings.get("n_ctx") or model.get("max_model_len") or DEFAULT_N_CTX),
            infill=None,
            add_bos=bool(start),
            bos_id=start[0] if start else await self._special(bos),
            eos_id=await self._special(eos),
            bos=bos,
            eos=eos,
            n_vocab=(model.get("meta") or {}).get("n_vocab"),
        )

    async def _model(self) -> dict[str, Any]:
        """The first model ``{base}/models`` lists."""
        answer = await self._json("GET", "/models")
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise EngineError(f"{self.label} listed no model at /models: {self._expected()}", "protocol")
        return data[0]

    async def _bos(self) -> list[int]:
        """The tokens the model starts a prompt with (BOS, or nothing)."""
        if self.tokenizer == "vllm":
            answer = await self._json("POST", self._root("/tokenize"), {"prompt": "", "add_special_tokens": True})
        else:
            answer = await self._json("POST", self._root("/tokenize"), {"content": "", "add_special": True})
        return [int(i) for i in answer.get("tokens") or []]

    async def _special(self, text: str | None) -> int | None:
        """The id of a special token's text (llama-server's tokenizer only)."""
        if not text or self.tokenizer != "llama-server":
            return None
        body = {"content": text, "parse_special": True, "with_pieces": True}
        tokens = (await self._json("POST", self._root("/tokenize"), body)).get("tokens") or []
        return int(tokens[0]["id"]) if len(tokens) == 1 else None

    async def _exact_runs(self, prompt: list[int], slot: int) -> ExactRuns:
        # cold: llama-server's cache_prompt: false evaluates the whole prompt; vLLM's cache_salt
        # keeps a request from reusing another's cached prefix
        cold, cold_t = await self._top(prompt, EXACT_TOP, {"cache_prompt": False, "cache_salt": uuid.uuid4().hex})
        warm, warm_t = await self._top(prompt, EXACT_TOP)
        await self._complete(prompt + prompt[-REWIND_EXTRA:], 1)
        rewound, rewound_t = await self._top(prompt, EXACT_TOP)
        return ExactRuns(cold, warm, rewound, cold_t, warm_t, rewound_t)

    # -- faults ---------------------------------------------------------------------------------

    def _expected(self) -> str:
        hint = 'engineApi "openai" expects the base URL OpenAI clients take, with /v1 (http://host:8000/v1)'
        if not httpx.URL(self.base_url).path.rstrip("/").endswith("/v1"):
            hint += "; this URL has no /v1 (for llama-server's native API at its root, engineApi \"llama-server\")"
        return hint

    def _not_found_hint(self) -> str:
        return self._expected()
