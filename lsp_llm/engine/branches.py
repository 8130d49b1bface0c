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

from collections.abc import Callable, Iterator, Sequence
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


def chunks(rows: list[Row], step: int, outputs: int | None) -> Iterator[list[Row]]:
    """Rows in calls of at most ``step`` rows and ``outputs`` rows that want
    logits (None: any number; see ``model.OUTPUT_ROWS``)."""
    chunk: list[Row] = []
    for row in rows:
        full = len(chunk) == step or (
            outputs is not None and row.wants_logits and sum(r.wants_logits for r in chunk) == outputs)
        if full:
            yield chunk
            chunk = []
        chunk.append(row)
    if chunk:
        yield chunk


def decode_rows(
    session: Session, rows: list[Row], n: int, read: Callable[[Row, np.ndarray], Any],
    step: int, should_stop: ShouldStop | None = None,
) -> dict[tuple[int, int], Any]:
    """Decode branch rows in calls of at most ``step`` rows (canonical
    sizes, and at most the model's ``max_outputs`` logits rows); a branch's
    first row (index 0) copies the document sequence into the branch's
    sequence. Returns ``read(row, logits)`` for each (branch, index) that
    wants logits."""
    out: dict[tuple[int, int], Any] = {}
    b = session.batch
    for c, chunk in enumerate(chunks(rows, step, session.model.max_outputs)):
        if c and should_stop is not None and should_stop():
            raise Cancelled()
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
    k = len(firsts)
    g = _Growth.start(session, firsts, done, max_tokens, memo, drafts, spare, call_rows)
    try:
        while True:
            g.from_memo()
            need = [i for i in range(len(g.branches)) if g.branches[i].item is None]  # items to finish
            if not need or (rides is not None and _all_ride(rides, g.branches[:k], need)):
                break
            if should_stop is not None and should_stop():
                raise Cancelled()
            call = g.plan(need)
            if call is None:  # cannot happen (item_limits); a safeguard
                break
            out = decode_rows(session, call.rows, g.n, _step, g.step, should_stop)
            g.take(call, out)
    except BaseException:
        for i in range(len(g.branches)):
            drop_branch(session, i)
        raise
    for i, br in enumerate(g.branches):
        if br.in_kv:  # only decoded branches hold cells
            drop_branch(session, i)
    return [br.tokens[: br.item] for br in g.branches[:k]], g.decoded  # (a branch that rides may be unfinished)


@dataclass
class _Call:
    """One decode call of ``extend``: its rows, the branches it grows, and
    the drafts it checks (by branch)."""

    rows: list[Row]
    working: list[int]
    guess: dict[int, list[int]]


@dataclass
class _Growth:
    """The state of one ``extend``: its branches (the items, then the spare
    first tokens), and how each decode call is planned and taken."""

    session: Session
    branches: list[Branch]
    done: Callable[[int, bytes], bool]
    memo: GreedyMemo | None
    spare: Spare | None
    spare_limit: int
    index: DraftIndex | None
    step: int  # rows per call at most
    n: int  # the document's tokens
    prefix: Any  # the memo's key of the document (None without a memo)
    decoded: int = 0

    @classmethod
    def start(cls, session: Session, firsts: Sequence[int], done: Callable[[int, bytes], bool],
              max_tokens: Sequence[int], memo: GreedyMemo | None, drafts: bool, spare: Spare | None,
              call_rows: int | None) -> _Growth:
        k = len(firsts)
        extra = list(spare.firsts) if spare is not None and memo is not None else []
        if k + len(extra) > session.n_branches:
            extra = extra[: max(0, session.n_branches - k)]
            if k > session.n_branches:
                raise ValueError(f"at most {session.n_branches} branches")
        n = len(session.tokens)
        limits = item_limits(max_tokens, session.n_ctx - n, session.rule)
        session.make_room(n + sum(limits) + session.rule.padded(1) + 1)  # the items always fit
        spare_limit = min(spare.max_tokens, session.cells - n - 1) if spare is not None else 0
        piece = session.model.piece
        branches = [Branch([t], piece(t), m, None) for t, m in zip(firsts, limits)]
        branches += [Branch([t], piece(t), spare_limit, 0) for t in extra]
        step = session.branch_step if call_rows is None else min(call_rows, session.branch_step)
        index = DraftIndex(session.tokens) if drafts else None
        prefix = GreedyMemo.prefix(session.tokens) if memo is not None else None
        g = cls(session, branches, done, memo, spare, spare_limit, index, step, n, prefix)
        for i in range(k):
            g.check(i)
        return g

    @property
    def sparing(self) -> bool:
        """Spare work only fills the memo."""
        return self.spare is not None and self.memo is not None

    def check(self, i: int) -> None:
        """Settle branch i's item once it is complete."""
        br, model = self.branches[i], self.session.model
        if br.item is None and (model.is_eog(br.tokens[-1]) or self.done(i, br.text) or len(br.tokens) >= br.limit):
            br.item = len(br.tokens)
            if self.sparing:
                br.limit = max(br.limit, self.spare_limit)

    def growing(self, i: int) -> bool:
        br = self.branches[i]
        if br.item is None:
            return True
        return (self.sparing and self.spare is not None and not self.session.model.is_eog(br.tokens[-1])
                and not self.spare.done(br.text) and len(br.tokens) < br.limit)

    def grow(self, i: int, tok: int) -> None:
        self.branches[i].tokens.append(tok)
        self.branches[i].text += self.session.model.piece(tok)
        self.check(i)

    def from_memo(self) -> None:
        """Every branch grown as far as the memo knows its steps."""
        if self.memo is None:
            return
        for i, br in enumerate(self.branches):
            while self.growing(i) and (tok := self.memo.get(GreedyMemo.key(self.prefix, br.tokens))) is not None:
                self.grow(i, tok)

    def fits(self, rows: int) -> bool:
        """Whether the context has free cells for rows more rows (with padding)."""
        s = self.session
        return self.n + sum(br.in_kv for br in self.branches) + s.rule.padded(rows) < s.cells

    def give_way(self, need: list[int]) -> None:
        """Free the cells of every branch but the items still growing, and
        end its spare work: the items' room must not depend on it."""
        for i, br in enumerate(self.branches):
            if i not in need:
                if br.in_kv:
                    drop_branch(self.session, i)
                br.in_kv, br.limit = 0, len(br.tokens)

    def plan(self, need: list[int]) -> _Call | None:
        """The next call: the rows the unfinished items need, spare work in
        what padding leaves, then drafts. Rows land in the lowest free cells,
        in row order, and the only cells freed before ``extend`` ends are the
        padding's and a rejected draft's: last in the call (with exact items
        one item's draft only), so every later row lands above the cells kept
        and each sequence's cells stay in position order (exact items rely on
        it, see ``model.FLASH_ROWS``). None: no room."""
        rows = [row for i in need for row in _pending(i, self.branches[i])]
        if not self.fits(len(rows)):
            self.give_way(need)  # the item limits leave room for the items alone
        if not self.fits(len(rows)):
            return None
        call = _Call(rows, list(need), {})
        free = self.session.rule.padded(len(rows)) - len(rows) if len(rows) <= self.step else 0
        outputs = self.session.model.max_outputs
        if outputs is not None:  # extra rows must not add a call
            free = max(0, min(free, outputs - sum(row.wants_logits for row in rows)))
        draft = self._draft(call, need, free)
        free -= len(draft)
        if self.spare is not None and not self.spare.alone and len(need) < 2:
            free = 0
        self._add_spare(call, need, free, len(draft))
        call.rows += draft
        return call

    def _draft(self, call: _Call, need: list[int], free: int) -> list[Row]:
        """Drafts (prompt lookup) for the free rows: a right one saves a
        call. With exact items one item's only: a rejected draft must free
        no cell below a row kept."""
        rows: list[Row] = []
        for i in need:
            if self.index is None or free <= len(rows):
                break
            br = self.branches[i]
            most = min(free - len(rows), br.limit - len(br.tokens) - 1)
            while most > 0 and not self.fits(len(call.rows) + len(rows) + most):
                most -= 1
            guess = self.index.draft([*self.session.tokens[-1:], *br.tokens], most)
            if guess:
                call.guess[i] = guess
                rows += [Row(i, len(br.tokens) + m, t, True) for m, t in enumerate(guess)]
                if self.session.model.flash_attention:
                    break
        return rows

    def _add_spare(self, call: _Call, need: list[int], free: int, drafted: int) -> None:
        """Spare work fills what is left, shortest branches first, in the
        cells the items will not need (so that ``give_way`` does not run:
        its freed cells would sit below the items' next rows)."""
        items_left = sum(self.branches[i].limit - len(self.branches[i].tokens) for i in need)
        for i in sorted(range(len(self.branches)), key=lambda i: len(self.branches[i].tokens)):
            more = _pending(i, self.branches[i])
            rows = len(call.rows) + drafted + len(more)
            if (i not in need and self.growing(i) and len(more) <= free
                    and self.fits(rows + items_left + self.session.rule.padded(1))):
                call.rows += more
                call.working.append(i)
                free -= len(more)

    def take(self, call: _Call, out: dict[tuple[int, int], Any]) -> None:
        """Each branch the call worked on grows by its greedy token, and by
        its draft as far as the draft was right; every step goes to the memo."""
        self.decoded += len(call.rows)
        for i in call.working:
            br = self.branches[i]
            size, g = len(br.tokens), call.guess.get(i, [])
            if self.memo is not None:
                for m in range(len(g) + 1):  # rows after a wrong draft are exact for their own text
                    self.memo.put(GreedyMemo.key(self.prefix, br.tokens + g[:m]), *out[(i, size - 1 + m)])
            m, tok = 0, out[(i, size - 1)][0]
            while True:
                self.grow(i, tok)
                if not self.growing(i) or m == len(g) or tok != g[m]:
                    break
                tok = out[(i, size + m)][0]
                m += 1
            br.in_kv = size + m
            if len(g) > m:  # forget the rejected drafts
                llama.llama_memory_seq_rm(self.session.mem, i + 1, self.n + br.in_kv, -1)
