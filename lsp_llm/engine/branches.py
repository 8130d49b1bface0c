"""Completion branches: candidate first tokens extended greedily, together.

Each candidate gets its own sequence in the document's context
(``llama_memory_seq_cp`` shares the document's cells) and every step decodes
all growing branches in one canonical batch. What keeps steps cheap:

- **the greedy memo**: a step already computed for the same token sequence is
  taken without decoding (typing inside a word asks again for the same
  branches; typing what the line item predicted walks a known path);
- **drafts in the padding**: a canonical batch has at least ``rule.minimum``
  rows. Rather than throw-away copies, the free rows carry draft tokens from
  prompt lookup (what followed the same two tokens, or the last one, earlier
  in the document), and their logits verify the draft, so one call can take
  several steps;
- **spare work** in the rows still free: more first tokens, and every branch
  on to the end of the line, for the keystrokes to come (it only fills the
  memo; it never adds a call);
- on branch 0 (the likeliest path) each step also remembers its top tokens:
  when the document reaches that point, ``Engine.sync`` probes them.

The branches are removed afterwards: the document's sequence and cells are
untouched.

Every call has a canonical shape, so each step's logits are those of a fresh
evaluation of the same tokens: the memo, drafts and batching never change an
item, they only skip decode calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import llama_cpp as llama
import numpy as np

from .greedy import TOP_TOKENS, GreedyMemo
from .model import BatchRule, best_tokens, logits_view
from .session import DOC_SEQ, Cancelled, Session, ShouldStop


class Row(NamedTuple):
    """One row of a branch decode call."""

    branch: int  # its sequence is branch + 1 (DOC_SEQ is the document's)
    index: int  # of the token in the branch
    token: int
    wants_logits: bool


# (branch i, every item's text so far, branch i's tokens): may branch i stop
# here if no other item needs a call?
Rides = Callable[[int, Sequence[bytes], int], bool]


@dataclass(frozen=True)
class Spare:
    """Work for free rows: more first tokens, and where any branch may go on.
    A logits row costs about as much as a real one (the output projection),
    so with ``alone`` False spare rows only pad calls that carry two or more
    branches; a request then leaves the rest to idle work."""

    firsts: Sequence[int]
    done: Callable[[bytes], bool]
    max_tokens: int
    alone: bool = True


def _step(row: Row, logits: np.ndarray) -> tuple[int, tuple[int, ...]]:
    """The greedy token, and on branch 0 (the likeliest path) the top tokens."""
    if row.branch != 0:
        return int(np.argmax(logits)), ()
    top = best_tokens(logits, TOP_TOKENS)
    return top[0], top


def decode_rows(
    session: Session, rows: list[Row], n: int, read: Callable[[Row, np.ndarray], Any],
    step: int, should_stop: ShouldStop | None = None,
) -> dict[tuple[int, int], Any]:
    """Decode branch rows in calls of at most ``step`` rows (canonical
    sizes); a branch's first row (index 0) copies the document sequence into
    the branch's sequence. Returns ``read(row, logits)`` for each (branch,
    index) that wants logits."""
    out: dict[tuple[int, int], Any] = {}
    b = session.batch
    for c in range(0, len(rows), step):
        if c and should_stop is not None and should_stop():
            raise Cancelled()
        chunk = rows[c : c + step]
        for r, row in enumerate(chunk):
            if row.index == 0:
                llama.llama_memory_seq_cp(session.mem, DOC_SEQ, row.branch + 1, -1, -1)
            b.token[r], b.pos[r], b.n_seq_id[r], b.logits[r] = row.token, n + row.index, 1, row.wants_logits
            b.seq_id[r][0] = row.branch + 1
        last = chunk[-1]
        session.decode_padded(len(chunk), last.branch + 1, n + last.index + 1, last.token)
        for r, row in enumerate(chunk):
            if row.wants_logits:
                out[(row.branch, row.index)] = read(row, logits_view(session.ctx, r, session.model.n_vocab))
    return out


class DraftIndex:
    """Prompt lookup: where the last occurrence of each token, and of each
    pair of adjacent tokens, ends in the document (built on first use)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = tokens
        self._after: dict[tuple[int, ...], int] | None = None

    def draft(self, history: Sequence[int], room: int) -> list[int]:
        """Up to room tokens that followed history's last two tokens (or, if
        they never occurred together, its last token) in the document."""
        if room <= 0 or not history:
            return []
        if self._after is None:
            t = self.tokens
            after: dict[tuple[int, ...], int] = {(a,): i for i, a in enumerate(t[:-1], 1)}
            after.update(zip(zip(t[:-2], t[1:-1]), range(2, len(t))))
            self._after = after
        at = self._after.get(tuple(history[-2:])) or self._after.get((history[-1],))
        return [] if at is None else list(self.tokens[at : at + room])


def drop_branch(session: Session, i: int) -> None:
    llama.llama_memory_seq_rm(session.mem, i + 1, -1, -1)


def walk_memo(
    model: Any, memo: GreedyMemo, prefix: Any, firsts: Sequence[int], done: Callable[[int, bytes], bool],
    limits: Sequence[int], rides: Rides | None = None,
) -> list[list[int]] | None:
    """Each branch as ``extend`` would grow it, taken from the memo alone;
    None if some item needs a step the memo does not know (a branch that
    ``rides`` stops where the memo's knowledge ends)."""
    out: list[list[int]] = []
    texts = [model.piece(t) for t in firsts]
    for i, (first, limit) in enumerate(zip(firsts, limits)):
        toks, text = [first], texts[i]
        while not (model.is_eog(toks[-1]) or done(i, text) or len(toks) >= limit):
            tok = memo.get(GreedyMemo.key(prefix, toks), use=True)
            if tok is None and rides is not None and rides(i, texts, len(toks)):
                break
            if tok is None:
                return None
            toks.append(tok)
            text += model.piece(tok)
            texts[i] = text
        out.append(toks)
    return out


def item_limits(max_tokens: Sequence[int], free_cells: int, rule: BatchRule) -> list[int]:
    """Each item's token limit: its own, cut near a full context so that all
    items fit the free cells together, padding included. It depends only on
    the room, never on what else the context holds (spare work, drafts, what
    the memo skipped), so near a full context the items stay the same
    whatever the history. The first token of a branch takes no cell until the
    branch grows, and the last one none at all."""
    left = free_cells - 1 - (rule.padded(1) - 1)  # a call's padding is at most padded(1) - 1 rows
    out = []
    for i, m in enumerate(max_tokens):
        cells = max(0, min(m - 1, left // (len(max_tokens) - i)))  # a fair share of what is left
        out.append(1 + cells)
        left -= cells
    return out


@dataclass
class Branch:
    tokens: list[int]
    text: bytes
    limit: int  # at most this many tokens, spare work included
    item: int | None  # tokens of the finished item; None while it still grows
    in_kv: int = 0  # how many of its tokens its sequence holds


def _all_ride(rides: Rides, items: list[Branch], need: list[int]) -> bool:
    """Whether every item still growing may stop here."""
    texts = [br.text for br in items]
    return all(rides(i, texts, len(items[i].tokens)) for i in need)


def _pending(i: int, br: Branch) -> list[Row]:
    """Rows for the tokens of branch i that its sequence does not hold yet."""
    last = len(br.tokens) - 1
    return [Row(i, j, br.tokens[j], j == last) for j in range(br.in_kv, last + 1)]


def extend(
    session: Session,
    firsts: Sequence[int],
    done: Callable[[int, bytes], bool],
    max_tokens: Sequence[int],
    should_stop: ShouldStop | None = None,
    memo: GreedyMemo | None = None,
    drafts: bool = True,
    spare: Spare | None = None,
    call_rows: int | None = None,
    rides: Rides | None = None,
) -> tuple[list[list[int]], int]:
    """Greedily extend each first token in its own branch until
    ``done(i, text)`` or branch i has max_tokens[i] tokens.

    With a memo, rows that a call has free after the branches and their
    drafts do spare work for later keystrokes: the ``spare`` first tokens,
    and finished branches going on to ``spare.done``. Spare work never adds a
    decode call and never changes an item; it only fills the memo.
    ``call_rows`` caps the rows of one call (idle work keeps its calls short:
    a request that arrives waits for the one running). A branch that
    ``rides`` grows only in calls that another item needs and through the
    memo; it may come back unfinished (short of ``done`` and its limit).

    Returns each branch's tokens and the number of rows decoded.
    """
    model = session.model
    k = len(firsts)
    extra = list(spare.firsts) if spare is not None and memo is not None else []
    if k + len(extra) > session.n_branches:
        extra = extra[: max(0, session.n_branches - k)]
        if k > session.n_branches:
            raise ValueError(f"at most {session.n_branches} branches")
    n = len(session.tokens)
    limits = item_limits(max_tokens, session.n_ctx - n, session.rule)
    session.make_room(n + sum(limits) + session.rule.padded(1) + 1)  # the items always fit
    room = session.cells - n - 1
    spare_limit = min(spare.max_tokens, room) if spare is not None else 0
    branches = [Branch([t], model.piece(t), m, None) for t, m in zip(firsts, limits)]
    branches += [Branch([t], model.piece(t), spare_limit, 0) for t in extra]
    prefix = GreedyMemo.prefix(session.tokens) if memo is not None else None
    sparing = spare is not None and memo is not None  # spare work only fills the memo
    index = DraftIndex(session.tokens) if drafts else None
    step = session.branch_step if call_rows is None else min(call_rows, session.branch_step)

    def check(i: int) -> None:
        """Settle branch i's item once it is complete."""
        br = branches[i]
        if br.item is None and (model.is_eog(br.tokens[-1]) or done(i, br.text) or len(br.tokens) >= br.limit):
            br.item = len(br.tokens)
            if sparing:
                br.limit = max(br.limit, spare_limit)

    def growing(i: int) -> bool:
        br = branches[i]
        if br.item is None:
            return True
        return (sparing and spare is not None and not model.is_eog(br.tokens[-1])
                and not spare.done(br.text) and len(br.tokens) < br.limit)

    def grow(i: int, tok: int) -> None:
        branches[i].tokens.append(tok)
        branches[i].text += model.piece(tok)
        check(i)

    for i in range(k):
        check(i)
    decoded = 0

    def fits(rows: int) -> bool:
        """Whether the context has free cells for rows more rows (with padding)."""
        return n + sum(br.in_kv for br in branches) + session.rule.padded(rows) < session.cells

    def give_way(need: list[int]) -> None:
        """Free the cells of every branch but the items still growing, and
        end its spare work: the items' room must not depend on it."""
        for i, br in enumerate(branches):
            if i not in need:
                if br.in_kv:
                    drop_branch(session, i)
                br.in_kv, br.limit = 0, len(br.tokens)

    try:
        while True:
            if memo is not None and prefix is not None:
                for i in range(len(branches)):
                    while growing(i) and (tok := memo.get(GreedyMemo.key(prefix, branches[i].tokens))) is not None:
                        grow(i, tok)
            need = [i for i in range(len(branches)) if branches[i].item is None]  # items to finish
            if not need or (rides is not None and _all_ride(rides, branches[:k], need)):
                break
            if should_stop is not None and should_stop():
                raise Cancelled()
            rows = [row for i in need for row in _pending(i, branches[i])]
            if not fits(len(rows)):
                give_way(need)  # the item limits leave room for the items alone
            if not fits(len(rows)):  # cannot happen (item_limits); a safeguard
                break
            guess: dict[int, list[int]] = {}
            free = session.rule.padded(len(rows)) - len(rows) if len(rows) <= step else 0
            for i in need:  # drafts can save a call
                if index is None or free <= 0:
                    break
                br = branches[i]
                most = min(free, br.limit - len(br.tokens) - 1)
                while most > 0 and not fits(len(rows) + most):
                    most -= 1
                guess[i] = index.draft([*session.tokens[-1:], *br.tokens], most)
                rows += [Row(i, len(br.tokens) + m, t, True) for m, t in enumerate(guess[i])]
                free -= len(guess[i])
            working = list(need)
            if spare is not None and not spare.alone and len(need) < 2:
                free = 0
            # spare work fills what is left, shortest branches first
            for i in sorted(range(len(branches)), key=lambda i: len(branches[i].tokens)):
                more = _pending(i, branches[i])
                if i not in need and growing(i) and len(more) <= free and fits(len(rows) + len(more)):
                    rows += more
                    working.append(i)
                    free -= len(more)
            out = decode_rows(session, rows, n, _step, step, should_stop)
            decoded += len(rows)
            for i in working:
                br = branches[i]
                size, g = len(br.tokens), guess.get(i, [])
                if memo is not None and prefix is not None:
                    for m in range(len(g) + 1):  # rows after a wrong draft are exact for their own text
                        memo.put(GreedyMemo.key(prefix, br.tokens + g[:m]), *out[(i, size - 1 + m)])
                m, tok = 0, out[(i, size - 1)][0]
                while True:
                    grow(i, tok)
                    if not growing(i) or m == len(g) or tok != g[m]:
                        break
                    tok = out[(i, size + m)][0]
                    m += 1
                br.in_kv = size + m
                if len(g) > m:  # forget the rejected drafts
                    llama.llama_memory_seq_rm(session.mem, i + 1, n + br.in_kv, -1)
    except BaseException:
        for i in range(len(branches)):
            drop_branch(session, i)
        raise
    for i, br in enumerate(branches):
        if br.in_kv:  # only decoded branches hold cells
            drop_branch(session, i)
    return [br.tokens[: br.item] for br in branches[:k]], decoded  # (a branch that rides may be unfinished)
