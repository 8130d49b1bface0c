"""Completion branches: candidate first tokens extended greedily, together.

Each candidate gets its own sequence in the document's context
(``llama_memory_seq_cp`` shares the document's cells) and every step decodes
all growing branches in one canonical batch. Three things keep steps cheap:

- **the greedy memo**: a step already computed for the same token sequence is
  taken without decoding (typing inside a word asks again for the same
  branches; typing what the line item predicted walks a known path);
- **drafts in the padding**: a canonical batch has at least ``rule.minimum``
  rows. Rather than throw-away copies, the free rows carry draft tokens from
  prompt lookup (what followed the same two tokens earlier in the document),
  and their logits verify the draft, so one call can take several steps;
- the branches are removed afterwards: the document's sequence is untouched.

Every call has a canonical shape, so each step's logits are those of a fresh
evaluation of the same tokens: the memo, drafts and batching never change an
item, they only skip decode calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp as llama
import numpy as np

from .greedy import GreedyMemo
from .model import logits_view
from .session import DOC_SEQ, Cancelled, Session, ShouldStop

Row = tuple[int, int, int, bool]  # (branch, index in the branch, token, wants logits)


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def decode_rows(
    session: Session, rows: list[Row], n: int, read: Callable[[np.ndarray], Any] = _argmax
) -> dict[tuple[int, int], Any]:
    """Decode branch rows in as few canonical calls as fit; a branch's first
    row (index 0) copies the document sequence into the branch's sequence.
    Returns ``read(logits)`` for each (branch, index) that wants logits."""
    rule = session.rule
    step = session.rows - session.rows % rule.multiple
    out: dict[tuple[int, int], Any] = {}
    b = session.batch
    for c in range(0, len(rows), step):
        chunk = rows[c : c + step]
        for r, (i, j, token, want) in enumerate(chunk):
            if j == 0:
                llama.llama_memory_seq_cp(session.mem, DOC_SEQ, i + 1, -1, -1)
            b.token[r], b.pos[r], b.n_seq_id[r], b.logits[r] = token, n + j, 1, want
            b.seq_id[r][0] = i + 1
        real, total = len(chunk), rule.padded(len(chunk))
        last_i, last_j, last_token, _ = chunk[-1]
        for r in range(real, total):  # throw-away rows after the last one, as in Session
            b.token[r], b.pos[r], b.n_seq_id[r], b.logits[r] = last_token, n + last_j + 1 + r - real, 1, False
            b.seq_id[r][0] = last_i + 1
        b.n_tokens = total
        session.decode(total)
        if total > real:
            llama.llama_memory_seq_rm(session.mem, last_i + 1, n + last_j + 1, -1)
        for r, (i, j, _, want) in enumerate(chunk):
            if want:
                out[(i, j)] = read(logits_view(session.ctx, r, session.model.n_vocab))
    return out


class DraftIndex:
    """Prompt lookup: for each pair of adjacent tokens in the document, where
    its last occurrence ends (built on first use)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = tokens
        self._after: dict[tuple[int, int], int] | None = None

    def draft(self, history: Sequence[int], room: int) -> list[int]:
        """Up to room tokens that followed history's last two tokens before."""
        if room <= 0 or len(history) < 2:
            return []
        if self._after is None:
            t = self.tokens
            self._after = dict(zip(zip(t[:-2], t[1:-1]), range(2, len(t))))
        at = self._after.get((history[-2], history[-1]))
        return [] if at is None else list(self.tokens[at : at + room])


def drop_branch(session: Session, i: int) -> None:
    llama.llama_memory_seq_rm(session.mem, i + 1, -1, -1)


def extend(
    session: Session,
    firsts: Sequence[int],
    done: Callable[[int, bytes], bool],
    max_tokens: Sequence[int],
    should_stop: ShouldStop | None = None,
    memo: GreedyMemo | None = None,
    drafts: bool = True,
) -> tuple[list[list[int]], int]:
    """Greedily extend each first token in its own branch until
    ``done(i, text)`` or branch i has max_tokens[i] tokens. Branch 0 gets the
    drafts first (it is the most likely, and the longest).

    Returns the token lists and the number of rows decoded (drafts included).
    """
    model = session.model
    k = len(firsts)
    if k > session.n_branches:
        raise ValueError(f"at most {session.n_branches} branches")
    n = len(session.tokens)
    limit = [min(m, session.n_ctx - n - 1) for m in max_tokens]
    branches = [[t] for t in firsts]
    texts = [model.piece(t) for t in firsts]
    in_kv = [0] * k  # how many of branch i's tokens its sequence holds
    prefix = GreedyMemo.prefix(session.tokens) if memo is not None else None
    index = DraftIndex(session.tokens) if drafts else None
    step = session.rows - session.rows % session.rule.multiple

    def growing(i: int) -> bool:
        return not model.is_eog(branches[i][-1]) and not done(i, texts[i]) and len(branches[i]) < limit[i]

    def grow(i: int, tok: int) -> None:
        branches[i].append(tok)
        texts[i] += model.piece(tok)

    active = [i for i in range(k) if growing(i)]
    decoded = 0
    try:
        while active:
            if memo is not None and prefix is not None:
                for i in active:
                    while growing(i) and (tok := memo.get(GreedyMemo.key(prefix, branches[i]))) is not None:
                        grow(i, tok)
            need = [i for i in active if growing(i)]  # steps not in the memo
            if not need:
                break
            if should_stop is not None and should_stop():
                raise Cancelled()
            rows: list[Row] = [(i, j, branches[i][j], j == len(branches[i]) - 1)
                               for i in need for j in range(in_kv[i], len(branches[i]))]
            guess: dict[int, list[int]] = {i: [] for i in need}
            free = session.rule.padded(len(rows)) - len(rows) if len(rows) <= step else 0
            for i in need:
                if index is None or free <= 0:
                    break
                room = min(free, limit[i] - len(branches[i]) - 1)
                guess[i] = index.draft([*session.tokens[-1:], *branches[i]], room)
                rows += [(i, len(branches[i]) + m, t, True) for m, t in enumerate(guess[i])]
                free -= len(guess[i])
            out = decode_rows(session, rows, n)
            decoded += len(rows)
            for i in need:
                size, g = len(branches[i]), guess[i]
                if memo is not None and prefix is not None:
                    for m in range(len(g) + 1):  # rows after a wrong draft are exact for their own text
                        memo.put(GreedyMemo.key(prefix, branches[i] + g[:m]), out[(i, size - 1 + m)])
                m, tok = 0, out[(i, size - 1)]
                while True:
                    grow(i, tok)
                    if not growing(i) or m == len(g) or tok != g[m]:
                        break
                    tok = out[(i, size + m)]
                    m += 1
                in_kv[i] = size + m
                if len(g) > m:  # forget the rejected drafts
                    llama.llama_memory_seq_rm(session.mem, i + 1, n + in_kv[i], -1)
            active = [i for i in need if growing(i)]
    finally:
        for i in range(k):
            drop_branch(session, i)
    return branches, decoded
