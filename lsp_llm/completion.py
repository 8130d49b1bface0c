"""Completion candidates from a session's logits.

The top-k next tokens are each extended greedily, all in one batch per step,
until they form a whole word (after ``pri``: ``print``, not ``nt``). The
most likely token is extended further, to the end of the line; its word item
is a prefix of that same greedy path. Decoding is greedy, so the same text
always gives the same candidates.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from .engine import DocStats, Engine

WORD_TOKENS = 8  # at most this many tokens to finish a word


@dataclass(frozen=True)
class Candidate:
    text: str  # what to insert at the cursor
    probability: float  # of the candidate's first token
    whole_line: bool = False


def _is_ident(b: int) -> bool:
    return b == 0x5F or 0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A or b >= 0x80


def word_end(text: bytes) -> int | None:
    """Where a candidate's word ends: after the first run of identifier bytes
    (any leading spaces or punctuation included), or at a line break."""
    seen = False
    for i, b in enumerate(text):
        if b in (0x0A, 0x0D):
            return i
        if _is_ident(b):
            seen = True
        elif seen:
            return i
    return None


def line_end(text: bytes) -> int | None:
    for i, b in enumerate(text):
        if b in (0x0A, 0x0D):
            return i
    return None


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "ignore")  # drops a multi-byte char cut in half


def top_tokens(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens (most likely first) and their probabilities."""
    idx = np.argpartition(logits, -k)[-k:]
    idx = idx[np.lexsort((idx, -logits[idx]))]  # by logit, ties by token id
    m = float(logits.max())
    z = float(np.exp(logits - m, dtype=np.float64).sum())
    return idx, np.exp(logits[idx].astype(np.float64) - m) / z


def candidates(
    engine: Engine,
    uri: str,
    target: list[int],
    items: int,
    line_tokens: int,
    cancel: threading.Event,
) -> list[Candidate]:
    """Engine thread: sync the document's session to target, then extend."""
    t0 = time.perf_counter()
    session = engine.sync(uri, target, cancel.is_set)
    t1 = time.perf_counter()
    model = engine.model
    k = min(items + 4, engine.n_branches)  # a few spares for empty/duplicate tokens
    ids, probs = top_tokens(session.logits, k)
    firsts = [int(t) for t in ids if model.piece(int(t)) and not model.is_eog(int(t))][: min(items, k)]
    probs_by_id = {int(t): float(p) for t, p in zip(ids, probs)}

    def done(i: int, text: bytes) -> bool:
        return (line_end(text) if i == 0 else word_end(text)) is not None

    branches, generated = session.extend(firsts, done, max(line_tokens, WORD_TOKENS), cancel.is_set)
    t2 = time.perf_counter()
    out: list[Candidate] = []
    seen: set[str] = set()
    for i, toks in enumerate(branches):
        raw = b"".join(model.piece(t) for t in toks if not model.is_eog(t))
        cut = word_end(raw)
        word = _decode(raw[:cut] if cut is not None else raw)
        p = probs_by_id[toks[0]]
        if word.strip() and word not in seen:
            seen.add(word)
            out.append(Candidate(word, p))
        if i == 0:
            cut = line_end(raw)
            line = _decode(raw[:cut] if cut is not None else raw).rstrip()
            if line.strip() and line not in seen:
                seen.add(line)
                out.insert(0, Candidate(line, p, whole_line=True))
    st = engine.stats.setdefault(uri, DocStats())
    st.generated_total += generated
    st.feed_ms = (t1 - t0) * 1000
    st.generate_ms = (t2 - t1) * 1000
    st.last_ms = (time.perf_counter() - t0) * 1000
    return out
