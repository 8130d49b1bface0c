"""Completion candidates from a session's logits.

The top-k next tokens are each extended greedily, all in one batch per step,
until they form a whole word (after ``pri``: ``print``, not ``nt``). The
most likely token is extended further, to the end of the line; its word item
is a prefix of that same greedy path. Decoding is greedy, so the same text
always gives the same candidates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..engine.branches import Rides, Spare, extend, item_limits, walk_memo
from ..engine.greedy import GreedyMemo
from ..engine.model import ModelError
from ..engine.pool import DocStats
from ..engine.scheduler import Engine, IdleTask
from ..engine.session import Session, ShouldStop

WORD_TOKENS = 8  # at most this many tokens to finish a word
SPARE_FIRSTS = 8  # first tokens beyond the items that free rows extend
QUICK_ITEMS = 1  # a quick ask waits for this many word items; the others ride along


@dataclass(frozen=True)
class Candidate:
    text: str  # what to insert at the cursor
    probability: float  # of the candidate's first token
    whole_line: bool = False


def _is_ident(b: int) -> bool:
    return b == 0x5F or 0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A or b >= 0x80


def word_end(text: bytes, mid_word: bool) -> int | None:
    """Where a candidate's word ends. Inside a word: at the first byte that
    cannot be part of an identifier. Otherwise: after leading spaces, one
    identifier, or one run of punctuation (``(``, ``):``). Always at a line
    break."""
    i = 0
    if not mid_word:
        while i < len(text) and text[i] in (0x20, 0x09):
            i += 1
        if i < len(text) and not _is_ident(text[i]) and text[i] not in (0x0A, 0x0D):
            while i < len(text) and not _is_ident(text[i]) and text[i] not in (0x20, 0x09, 0x0A, 0x0D):
                i += 1
            return i if i < len(text) else None
    while i < len(text):
        if not _is_ident(text[i]):
            return i
        i += 1
    return None


def line_end(text: bytes) -> int | None:
    for i, b in enumerate(text):
        if b in (0x0A, 0x0D):
            return i
    return None


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "ignore")  # drops a multi-byte char cut in half


def top_tokens(logits: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens among allowed (most likely first) and their
    probabilities, renormalized over allowed: P(token | it fits the text)."""
    ids = np.arange(len(logits)) if allowed is None else allowed
    scores = logits[ids].astype(np.float64)
    k = min(k, len(ids))
    top = np.argpartition(scores, -k)[-k:]
    top = top[np.lexsort((ids[top], -scores[top]))]  # by score, ties by token id
    m = scores.max()
    z = np.exp(scores - m).sum()
    return ids[top], np.exp(scores[top] - m) / z


@dataclass(frozen=True)
class Ask:
    """A completion to compute: the prompt at the cursor (healed), the text
    the first token must start with, and how many items."""

    uri: str
    prompt: list[int]
    healed: bytes
    mid_word: bool
    items: int
    line_tokens: int
    quick: bool = False  # wait for the likeliest word item only; the others ride (see ``_rides``)


@dataclass(frozen=True)
class Answer:
    candidates: list[Candidate]
    paths: list[list[int]]  # each item's tokens (path 0: the likeliest, on to the end of the line)
    words: list[int]  # how many tokens of each path its word item takes
    complete: bool = True  # False: a quick ask left some item out (idle work finishes it)


def candidates(
    engine: Engine,
    uri: str,
    prompt: list[int],
    healed: bytes,
    mid_word: bool,
    items: int,
    line_tokens: int,
    should_stop: ShouldStop | None = None,
) -> list[Candidate]:
    """Engine thread: sync the document's session to the prompt, then extend
    the best first tokens that start with the healed text."""
    return answer(engine, Ask(uri, prompt, healed, mid_word, items, line_tokens), should_stop).candidates


def answer(engine: Engine, ask: Ask, should_stop: ShouldStop | None = None,
           deadline: float | None = None) -> Answer:
    """``candidates``, with the token paths behind them. A long read still
    going at ``deadline`` raises LongRead (see ``Engine.sync``)."""
    if not ask.prompt:
        return Answer([], [], [])
    t0, decode0 = time.perf_counter(), Session.decode_seconds
    session = engine.sync(ask.uri, ask.prompt, should_stop, ask.healed, deadline)
    t1 = time.perf_counter()
    choice = _choose(engine, session.logits, ask)
    if choice is None:
        return Answer([], [], [])
    done, limits = _stops(ask, len(choice.firsts))
    limits = item_limits(limits, session.n_ctx - len(session.tokens), session.rule)  # (as ``extend`` caps them)
    hits0 = engine.memo.hits
    # free batch rows extend the next likely first tokens, and every branch
    # to the end of the line, for the keystrokes to come
    skip = len(ask.healed)
    spare = Spare(choice.spare, lambda text: line_end(text[skip:]) is not None,
                  max(ask.line_tokens, WORD_TOKENS), alone=engine.in_idle)
    call_rows = engine.call_rows()  # short in idle work: a request waits for the call running
    branches, generated = extend(session, choice.firsts, done, limits, should_stop, engine.exact_memo,
                                 spare=spare, call_rows=call_rows, rides=_rides(ask))
    t2 = time.perf_counter()
    got = _build(engine.model, branches, choice, ask, _finished(engine.model, branches, done, limits))
    if not engine.in_idle:  # idle work is not a request
        _record(engine.stats.setdefault(ask.uri, DocStats()), generated, engine.memo.hits - hits0,
                t0, t1, t2, Session.decode_seconds - decode0)
    return got


REMOTE_TOP = 40  # next tokens a remote engine is asked for (vLLM allows 20 by default; llama-server more)


def answer_remote(engine: Engine, ask: Ask, should_stop: ShouldStop) -> Answer:
    """``answer`` on a remote engine (``engine.remote``): the likeliest next
    tokens that start with the healed text, from the engine's top
    log-probabilities (renormalized over those shown), each grown greedily on
    the document's slot; the likeliest to the end of the line. A quick ask
    grows only that one: another item shows when its first token alone
    finishes its word."""
    if not ask.prompt:
        return Answer([], [], [])
    pool, model = engine.pool, engine.model
    top = pool.top_next(ask.uri, ask.prompt, REMOTE_TOP, should_stop, engine.focus)
    fits = [t for t in top if t.piece.startswith(ask.healed) and not model.is_eog(t.id)][: ask.items]
    if not fits:
        return Answer([], [], [])
    weights = np.exp(np.array([t.logprob for t in fits]) - fits[0].logprob)
    choice = _Choice([t.id for t in fits], {t.id: float(w) for t, w in zip(fits, weights / weights.sum())}, [])
    done, limits = _stops(ask, len(fits))
    paths: list[list[int]] = []
    for i, first in enumerate(choice.firsts):
        if i > 0 and ask.quick:
            paths.append([first])  # rides: shown if it is a word already
            continue
        paths.append([first, *pool.greedy(ask.uri, [*ask.prompt, first], limits[i] - 1, should_stop)])
    riders = [1 << 30 if ask.quick else n for n in limits[1:]]  # a rider is finished only by its word's end
    return _build(model, paths, choice, ask, _finished(model, paths, done, limits[:1] + riders))


def from_memo(engine: Engine, ask: Ask) -> Answer | None:
    """The same answer as ``answer``, if the logits after the prompt are
    remembered (``Engine.tips``) and the memo knows every step of every item
    the ask waits for (all, or a quick ask's required ones: the others come
    as far as the memo knows them, as in ``answer``): no decode, no engine
    job, wherever the session is. Any thread. None when something is missing,
    or when the engine switched models meanwhile (the engine job then runs
    after the switch)."""
    model = engine.model
    try:
        got = _from_memo(engine, model, ask)
    except ModelError:  # freed under us by a switch
        return None
    return got if engine.model is model else None


def _from_memo(engine: Engine, model: Any, ask: Ask) -> Answer | None:
    memo = engine.exact_memo
    if memo is None or not ask.prompt or memo is not engine.memo:
        return None
    t0 = time.perf_counter()
    fitted = engine.fit(ask.prompt)
    prefix = GreedyMemo.prefix(fitted)
    logits = engine.tips.get(prefix.digest())
    if logits is None:
        return None
    choice = _choose(engine, logits, ask, model)
    if choice is None:
        return None
    done, limits = _stops(ask, len(choice.firsts))
    limits = item_limits(limits, engine.n_ctx - len(fitted), model.batch_rule)  # as ``extend`` caps them
    branches = walk_memo(model, memo, prefix, choice.firsts, done, limits, _rides(ask))
    if branches is None:
        return None
    got = _build(model, branches, choice, ask, _finished(model, branches, done, limits))
    _record(engine.stats.setdefault(ask.uri, DocStats()), 0, sum(len(b) - 1 for b in branches), t0, t0,
            time.perf_counter(), 0.0)
    return got


@dataclass(frozen=True)
class _Choice:
    """A completion's first tokens, from the logits after its prompt."""

    firsts: list[int]  # one per item, most likely first
    p_first: dict[int, float]
    spare: list[int]  # the next likely ones, for spare work


def _choose(engine: Engine, logits: np.ndarray, ask: Ask, model: Any = None) -> _Choice | None:
    """The best first tokens that start with the healed text (None: none does)."""
    model = model or engine.model
    allowed = model.tokens_starting_with(ask.healed) if ask.healed else None
    if allowed is not None and not len(allowed):
        return None
    ids, probs = top_tokens(logits, min(ask.items + SPARE_FIRSTS, engine.n_branches), allowed)
    usable = [i for i, t in enumerate(ids) if not model.is_eog(int(t))]
    keep = usable[: ask.items]
    return _Choice([int(ids[i]) for i in keep], {int(ids[i]): float(probs[i]) for i in keep},
                   [int(ids[i]) for i in usable[ask.items :]])


def _stops(ask: Ask, k: int) -> tuple[Callable[[int, bytes], bool], list[int]]:
    """When branch i's item is complete, and each item's token limit: whole
    words; the likeliest goes on to the end of the line."""
    skip = len(ask.healed)  # the healed text is already in the document
    lines = ask.line_tokens > 0

    def done(i: int, text: bytes) -> bool:
        rest = text[skip:]
        return (line_end(rest) if i == 0 and lines else word_end(rest, ask.mid_word)) is not None

    limits = [WORD_TOKENS] * k
    if lines and limits:
        limits[0] = max(ask.line_tokens, WORD_TOKENS)
    return done, limits


def _rides(ask: Ask) -> Rides | None:
    """In a quick ask only the first ``QUICK_ITEMS`` word items are waited
    for, and then those up to the first that shows something (after ``pri``
    the likeliest may be ``pri`` itself: an empty item). The others, and the
    likeliest branch past its word to the end of the line, grow only in the
    calls those need, and through the memo: a request pays for the likeliest
    words; idle work finishes the rest."""
    if not ask.quick:
        return None
    skip = len(ask.healed)

    def word(text: bytes) -> bytes | None:
        cut = word_end(text[skip:], ask.mid_word)
        return None if cut is None else text[skip:][:cut]

    def rides(i: int, texts: Sequence[bytes], n_tokens: int) -> bool:
        if i == 0:
            return ask.line_tokens > 0 and (n_tokens >= WORD_TOKENS or word(texts[0]) is not None)
        return i >= QUICK_ITEMS and any((word(texts[j]) or b"").strip() for j in range(i))

    return rides


def _finished(model: Any, branches: list[list[int]], done: Callable[[int, bytes], bool],
              limits: list[int]) -> list[bool]:
    """Which branches reached their item's end (a quick ask may leave some short)."""
    def end(i: int, toks: list[int]) -> bool:
        return model.is_eog(toks[-1]) or done(i, b"".join(map(model.piece, toks))) or len(toks) >= limits[i]

    return [end(i, toks) for i, toks in enumerate(branches)]


def _build(model: Any, branches: list[list[int]], choice: _Choice, ask: Ask,
           finished: list[bool] | None = None) -> Answer:
    """Items from the grown branches, distinct by what they show, leaving
    out those a quick ask did not finish (branch 0's word always is)."""
    skip = len(ask.healed)
    lines = ask.line_tokens > 0
    out: list[Candidate] = []
    words: list[int] = []
    seen: set[str] = set()

    def add(text: str, p: float, whole_line: bool = False) -> None:
        if text.strip() and text.strip() not in seen:
            seen.add(text.strip())
            out.append(Candidate(text, p, whole_line))

    for i, toks in enumerate(branches):
        pieces = [model.piece(t) for t in toks if not model.is_eog(t)]
        rest = b"".join(pieces)[skip:]
        p = choice.p_first[toks[0]]
        done = finished is None or finished[i]
        if i == 0 and lines and done:
            cut = line_end(rest)
            add(_decode(rest[:cut] if cut is not None else rest).rstrip(), p, whole_line=True)
        head = b"".join(pieces[:WORD_TOKENS])[skip:]
        cut = word_end(head, ask.mid_word)  # a word item has at most WORD_TOKENS tokens
        if done or i == 0:
            add(_decode(head[:cut] if cut is not None else head), p)
        words.append(_tokens_within(model, toks, skip + (len(head) if cut is None else cut)))
    return Answer(out, branches, words, finished is None or all(finished))


def _tokens_within(model: Any, toks: list[int], size: int) -> int:
    """How many of toks fit in their first size bytes (at least one)."""
    n, end = 0, 0
    for t in toks:
        end += len(model.piece(t))
        if end > size:
            break
        n += 1
    return max(1, n)


def _record(st: DocStats, generated: int, memo_steps: int, t0: float, t1: float, t2: float,
            decode_s: float) -> None:
    st.generated_total += generated
    st.generated_last = generated
    st.memo_steps_last = memo_steps
    st.feed_ms = (t1 - t0) * 1000
    st.generate_ms = (t2 - t1) * 1000
    st.decode_ms = decode_s * 1000
    st.last_ms = (time.perf_counter() - t0) * 1000
    st.requests_total += 1
    st.no_decode_total += decode_s == 0


# -- idle work: the next keystrokes -------------------------------------------
NEXT_CHARS = 3  # word items whose next character is prepared
DEPTH = 2  # words of the likeliest line prepared ahead


def next_keystrokes(engine: Engine, ask: Ask, got: Answer) -> list[IdleTask]:
    """Idle tasks that prepare the likeliest next completions, most likely
    first: the next character of the top items (same prompt, longer healed
    text), then the items a quick answer left out, then finishing
    the likeliest word and going on along its line (the prompt grows by the
    word; healed: the first character after it)."""
    tasks: list[IdleTask] = []
    model = engine.model
    words = [c for c in got.candidates if not c.whole_line][:NEXT_CHARS]
    for nxt in dict.fromkeys(c.text[:1].encode() for c in words):
        if nxt and _is_ident(nxt[0]):
            tasks.append(_task(engine, replace(ask, healed=ask.healed + nxt, mid_word=True)))
    if not got.complete:
        tasks.append(_task(engine, replace(ask, quick=False)))  # the line, for the keystrokes along it
    if got.paths:
        path, prompt = got.paths[0], ask.prompt
        cut = got.words[0]
        for _ in range(DEPTH):
            if cut >= len(path) or model.is_eog(path[cut]):
                break
            head = model.piece(path[cut])[:1]
            if not head:
                break
            prompt = prompt + path[:cut]
            tasks.append(_task(engine, replace(ask, prompt=prompt, healed=head, mid_word=_is_ident(head[0]))))
            path = path[cut:]
            cut = max(1, _tokens_within(model, path, word_end(b"".join(map(model.piece, path)), False) or 0))
    return tasks


def _task(engine: Engine, ask: Ask) -> IdleTask:
    def run(should_stop: ShouldStop) -> None:
        answer(engine, ask, should_stop)

    return run
