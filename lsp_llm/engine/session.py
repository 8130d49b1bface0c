"""A model session: one llama.cpp context holding one token sequence.

The session keeps ``tokens`` (what its KV cache holds, BOS first) and the
logits after the last of them. ``sync`` brings it to a target sequence by
rewinding to the common prefix and feeding only the tail. Every decode call
has a canonical shape (``BatchRule``) so the result for a token never depends
on how it was batched: after any sequence of syncs the logits are
bit-identical to a fresh evaluation of the same tokens.

A feed's last call is padded anyway; ``probe`` tokens can take the padding
rows, each as a one-token branch after the target, to learn the greedy token
after it in the same call (see ``Engine.sync``).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import llama_cpp as llama
import numpy as np

from .greedy import TOP_TOKENS
from .model import OUTPUT_ROWS, BatchRule, Model, best_tokens, logits_view

log = logging.getLogger(__name__)

DOC_SEQ = 0
LOGITS_KEPT = 4  # tips whose logits a session remembers (BOS's is kept besides)
# rows of a branch call: every one wants logits (1 MB each with a 262k
# vocabulary, twice: the compute buffer's result and the output buffer), and
# llama.cpp keeps the largest buffers a context ever needed, so this bounds
# each context's memory; short calls also let a request preempt idle work
# sooner
BRANCH_ROWS = 16
# a context is sized to its document (about 18 KB a cell with the default
# model): it grows in steps of this many cells, keeping as many to spare for
# branches, drafts and probes; ``n_ctx`` stays the limit every rule sees
GROW_CELLS = 512
ShouldStop = Callable[[], bool]
Progress = Callable[[int, int], None]


class Cancelled(Exception):
    """Raised when should_stop() asked a session to stop between decode calls."""


class DecodeError(RuntimeError):
    pass


@dataclass
class SyncResult:
    reused: int
    fed: int
    # probe token -> the most likely tokens after it (the greedy one first)
    probed: dict[int, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class SavedState:
    """A document sequence kept in host memory while its context serves
    another document: its tokens, the KV cells (``llama_state_seq_get_data``)
    and the logits it remembers. Restoring it is a copy, not a re-read."""

    tokens: list[int]
    kv: ctypes.Array
    logits_at: dict[int, np.ndarray]

    @property
    def nbytes(self) -> int:
        return len(self.kv) + sum(a.nbytes for a in self.logits_at.values())


def _cells_for(tokens: int, n_ctx: int) -> int:
    """A context size for ``tokens`` tokens: rounded up, with GROW_CELLS to spare."""
    return min(n_ctx, -(-(tokens + GROW_CELLS) // GROW_CELLS) * GROW_CELLS)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


_NO_ABORT = llama.ggml_abort_callback()  # a NULL callback: llama.cpp asks nothing


class Session:
    """One context, one document sequence (seq 0) plus branch sequences used
    while extending completion candidates."""

    decode_seconds = 0.0  # time inside llama_decode, all sessions
    decoded_rows = 0  # rows decoded, padding included, all sessions

    def __init__(self, model: Model, n_ctx: int, n_branches: int,
                 interrupt: Callable[[], bool] | None = None, armed: Callable[[], bool] | None = None) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.n_branches = n_branches
        # the engine's: whether a call should stop midway (idle work when a
        # request waits); checked inside llama_decode, so cheap and never raising
        self.interrupt = interrupt
        self.armed = armed  # the engine's: whether the next call may be stopped midway at all
        self.rows = model.n_ubatch
        # llama.cpp asks this between graph nodes: a call for idle work stops
        # within a millisecond or two when a request arrives (see ``decode``)
        self._abort = llama.ggml_abort_callback(lambda _data: self._interrupted())
        self.ctx: llama.llama_context_p | None = None  # None: see ``_free``
        self.mem: llama.llama_memory_t | None = None
        self.tokens: list[int] = []
        self.logits: np.ndarray | None = None
        self.fed_count = 0  # document tokens decoded, ever (cancelled feeds included)
        # logits after tokens[:n], for a few n (BOS, recent tips): syncing
        # back to such a prefix (a backspace, a guess that missed) is free
        self._logits_at: dict[int, np.ndarray] = {}
        self._closed = False
        self.cells = 0  # the context's KV cells (``n_ctx`` is what limits see); none yet
        # the context opens at its first use, sized for it (a first read: the
        # document), not at a guess that the read would replace
        self.batch = llama.llama_batch_init(self.rows, 0, n_branches + 1)

    @property
    def rule(self) -> BatchRule:
        return self.model.batch_rule

    @property
    def branch_step(self) -> int:
        """The most rows one branch call takes (a canonical size)."""
        rows = min(self.rows, BRANCH_ROWS)
        return rows - rows % self.rule.multiple

    def _interrupted(self) -> bool:
        return self.model.aborted or (self.interrupt is not None and self.interrupt())

    def _armed(self) -> bool:
        """Whether this call may be stopped midway (the abort callback is set):
        as the engine says (``armed``: only while it stops), always for a
        session of its own (calibration, tests)."""
        return self.model.aborted or self.armed is None or self.armed()

    def close(self) -> None:
        """Free the context and the batch (once; a closed session refuses work)."""
        if not self._closed:
            self._closed = True
            llama.llama_batch_free(self.batch)
            self._free()

    # -- the context's size --------------------------------------------------
    def _open(self, cells: int) -> None:
        """A new, empty context of ``cells`` cells, for a session that holds
        none. ModelError if llama.cpp cannot make one (out of memory)."""
        assert self.ctx is None
        if self._closed:
            raise DecodeError("the session is closed")
        ctx = self.model.new_context(cells, self.keeper + 1)
        llama.llama_set_abort_callback(ctx, self._abort, None)
        self.ctx, self.mem = ctx, llama.llama_get_memory(ctx)
        self.cells = cells

    def _free(self) -> None:
        """Free the context: the session holds nothing, and no pointer to
        freed memory. Its next use (``_context``) opens a context again."""
        ctx, self.ctx, self.mem = self.ctx, None, None
        self.tokens, self.logits, self._logits_at = [], None, {}
        if ctx:
            llama.llama_free(ctx)

    def _context(self, tokens: int = 0) -> None:
        """A new session, or one whose context could not be replaced (see
        ``_resize``), opens one, empty, for ``tokens`` tokens; a closed one
        refuses."""
        if self.ctx is None:
            self._open(_cells_for(tokens, self.n_ctx) if tokens else min(self.n_ctx, GROW_CELLS))

    def _fit(self, tokens: int, doc_tokens: int) -> None:
        """Size the context for a target of ``tokens`` tokens: grow it, or fit
        it to the document (``doc_tokens``, so that the cursor can move
        anywhere in it) when the session holds no more than BOS (a fresh
        read)."""
        fresh = len(self.tokens) <= 1
        cells = _cells_for(max(tokens, doc_tokens) if fresh else tokens, self.n_ctx)
        if cells > self.cells or (fresh and cells < self.cells):
            self._resize(cells)

    def make_room(self, cells: int) -> None:
        """Make sure the context has at least ``cells`` cells (within n_ctx)."""
        self._context()
        if cells > self.cells and self.cells < self.n_ctx:
            self._resize(_cells_for(cells, self.n_ctx))

    def _resize(self, cells: int) -> None:
        """A context of another size takes the sequence over (saved and
        restored: exact, see ``restore``). The old context is freed first
        (never two at once: memory peaks stay those of one context); if the
        new one cannot be made (out of memory), the error is raised and the
        session is left empty, with no context: its next use opens one and
        reads the document again."""
        state = self.save() if self.tokens else None
        self._free()
        self._open(cells)
        if state is not None and not self.restore(state):
            raise DecodeError("llama.cpp could not move the sequence to a bigger context")

    def reset(self) -> None:
        self._context()
        llama.llama_memory_clear(self.mem, True)
        self.tokens = []
        self.logits = None
        self._logits_at = {}

    @property
    def keeper(self) -> int:
        """A sequence that holds every document cell while the document is
        saved and after it is restored (see ``restore``)."""
        return self.n_branches + 1

    def save(self) -> SavedState:
        """The document sequence as host memory (see ``SavedState``). The
        session is reset or moved right after (the keeper holds its cells)."""
        if self.ctx is None:
            raise DecodeError("the session holds no context to save")
        llama.llama_memory_seq_cp(self.mem, DOC_SEQ, self.keeper, -1, -1)
        size = llama.llama_state_seq_get_size(self.ctx, -1)
        kv = (ctypes.c_uint8 * size)()
        if llama.llama_state_seq_get_data(self.ctx, kv, size, -1) != size:
            raise DecodeError("llama.cpp could not save the sequence")
        return SavedState(list(self.tokens), kv, dict(self._logits_at))

    def restore(self, state: SavedState) -> bool:
        """Hold a saved sequence again, its cells where they were: laid out
        from 0 as in a fresh run (the context grows to hold them).

        Two llama.cpp facts shape this; tests that compare with a fresh run
        fail without either. A saved *sequence* leaves out the cells its
        sliding-window layers no longer attend to, which a rewind needs: so
        the whole memory is saved (there is no other sequence in it then).
        A restored memory starts looking for free cells at cell 0, and takes
        a sliding-window cell no longer attended to as free when one
        sequence alone holds it: so every document cell is held by the
        keeper sequence too, and new tokens go where a fresh run puts them.
        A rewind frees both (``_rewind``)."""
        self.reset()
        if not state.tokens:
            return True
        self.make_room(len(state.tokens))
        if llama.llama_state_seq_set_data(self.ctx, state.kv, len(state.kv), -1) != len(state.kv):
            self.reset()
            return False
        self.tokens = list(state.tokens)
        self._logits_at = dict(state.logits_at)
        self.logits = self._logits_at.get(len(self.tokens))
        return True

    # -- the document sequence ---------------------------------------------
    def sync(
        self,
        target: Sequence[int],
        should_stop: ShouldStop | None = None,
        progress: Progress | None = None,
        probe: Sequence[int] = (),
        rows: int | None = None,
        doc_tokens: int = 0,
    ) -> SyncResult:
        """Make the session hold ``target`` with its last logits ready. If
        that takes a decode call, the probe tokens ride in its padding.
        ``rows`` caps the rows of a feed call (default: the context's batch);
        any cap gives the same logits (canonical calls). ``doc_tokens``: the
        whole document's length, if known (see ``_fit``)."""
        if not target:
            raise ValueError("a session needs at least one token")
        if len(target) > self.n_ctx:
            raise ValueError(f"{len(target)} tokens do not fit a context of {self.n_ctx}")
        self._context(max(len(target), doc_tokens))
        keep = common_prefix(self.tokens, target)
        if keep == len(target):  # target is a prefix of what we hold
            if keep == len(self.tokens) and self.logits is not None:
                return SyncResult(reused=keep, fed=0)
            remembered = self._logits_at.get(keep)
            if remembered is not None:
                self._rewind(keep)
                self.logits = remembered
                return SyncResult(reused=keep, fed=0)
            keep -= 1  # the logits of the last token are needed: re-feed it
        self._rewind(keep)
        self._fit(len(target), doc_tokens)
        fed_bos = 0
        if keep == 0 and self.model.add_bos and target[0] == self.model.bos:
            keep = fed_bos = self._start(target)
        probed: dict[int, tuple[int, ...]] = {}
        fed = self._feed(list(target[keep:]), should_stop, progress, probe, probed, rows)
        return SyncResult(reused=keep - fed_bos, fed=fed + fed_bos, probed=probed)

    def _start(self, target: Sequence[int]) -> int:
        """A session starting at BOS remembers BOS's logits, so it never has
        to rewind past it. They are the same in every context (BOS alone, a
        canonical call at position 0), so the model keeps them: the first
        session decodes BOS alone, later ones feed it with the text (a first
        read saves a decode call). Returns the tokens fed here."""
        known = self.model.bos_logits.get(self.rule)
        if known is None or len(target) == 1:
            self._decode_doc([target[0]], want_logits=True)
            assert self.logits is not None
            known = self.logits.copy()
            known.setflags(write=False)  # shared by every session of the model
            self.model.bos_logits[self.rule] = known
            return 1
        self._logits_at[1] = known  # (kept by ``_rewind``: the session never goes below 1 token)
        return 0

    def _rewind(self, n: int) -> None:
        if n < len(self.tokens):
            if n == 0:
                llama.llama_memory_clear(self.mem, True)
            elif not llama.llama_memory_seq_rm(self.mem, -1, n, -1):  # the keeper's too (no branch is alive)
                raise DecodeError("llama.cpp refused to remove tokens from the sequence")
            del self.tokens[n:]
            self.logits = None
            self._logits_at = {k: v for k, v in self._logits_at.items() if k <= n}

    def _remember(self) -> None:
        """Keep the logits of the current tip (and BOS's, and a few more)."""
        assert self.logits is not None
        self._logits_at[len(self.tokens)] = self.logits
        extra = sorted(k for k in self._logits_at if k > 1)
        for k in extra[: max(0, len(extra) - LOGITS_KEPT)]:
            del self._logits_at[k]

    def _feed(
        self,
        tail: list[int],
        should_stop: ShouldStop | None,
        progress: Progress | None,
        probe: Sequence[int] = (),
        probed: dict[int, tuple[int, ...]] | None = None,
        rows: int | None = None,
    ) -> int:
        fed = 0
        plan = self.rule.plan(len(tail), min(rows or self.rows, self.rows))
        for i, size in enumerate(plan):
            if should_stop is not None and should_stop():
                raise Cancelled()
            chunk = tail[fed : fed + size]
            last = i == len(plan) - 1
            self._decode_doc(chunk, want_logits=last, probe=probe if last else (), probed=probed)
            fed += size
            if progress is not None:
                progress(fed, len(tail))
        return fed

    def _decode_doc(
        self,
        chunk: list[int],
        want_logits: bool,
        probe: Sequence[int] = (),
        probed: dict[int, tuple[int, ...]] | None = None,
    ) -> None:
        start = len(self.tokens)
        n = len(chunk)
        rows = self.rule.padded(n)
        # probes want logits too: with the document's row, at most OUTPUT_ROWS a call
        probe = list(dict.fromkeys(probe))[: min(rows - n, self.n_branches, OUTPUT_ROWS - 1)]
        b = self.batch
        for i in range(n):
            b.token[i], b.pos[i], b.logits[i] = chunk[i], start + i, want_logits and i == n - 1
            b.n_seq_id[i] = 1 + len(probe)  # probe sequences see the new tokens too
            for s in range(1 + len(probe)):
                b.seq_id[i][s] = DOC_SEQ + s
        for q, tok in enumerate(probe):  # probe q: branch sequence q + 1, after the chunk
            llama.llama_memory_seq_cp(self.mem, DOC_SEQ, q + 1, -1, -1)
            b.token[n + q], b.pos[n + q], b.n_seq_id[n + q], b.logits[n + q] = tok, start + n, 1, True
            b.seq_id[n + q][0] = q + 1
        try:
            self.decode_padded(n + len(probe), DOC_SEQ, start + n, chunk[-1])
        finally:
            for q in range(len(probe)):
                llama.llama_memory_seq_rm(self.mem, q + 1, -1, -1)
        self.tokens.extend(chunk)
        self.fed_count += n
        if want_logits:
            self.logits = logits_view(self.ctx, n - 1, self.model.n_vocab).copy()
            self._remember()
        else:
            self.logits = None
        if probed is not None:
            for q, tok in enumerate(probe):
                # the top tokens too: what to probe when the document gets there
                probed[tok] = best_tokens(logits_view(self.ctx, n + q, self.model.n_vocab), TOP_TOKENS)

    def decode_padded(self, real: int, seq: int, pos: int, token: int) -> None:
        """Decode the first ``real`` rows of ``self.batch``, padded to the
        canonical shape with throw-away rows of ``seq`` at ``pos`` on: after
        that sequence's last row, so the causal mask hides them from real
        rows and positions stay continuous. They are removed right after."""
        total = self.rule.padded(real)
        b = self.batch
        for r in range(real, total):
            b.token[r], b.pos[r], b.n_seq_id[r], b.logits[r] = token, pos + r - real, 1, False
            b.seq_id[r][0] = seq
        b.n_tokens = total
        self.decode(total)
        if total > real:
            llama.llama_memory_seq_rm(self.mem, seq, pos, -1)

    def decode(self, rows: int) -> None:
        """Decode the first ``rows`` rows of ``self.batch``."""
        if self.ctx is None:
            raise DecodeError("the session holds no context")
        t = time.perf_counter()
        # the abort callback is Python: llama.cpp asks it between graph nodes, and
        # each ask waits for the GIL (milliseconds while the event loop runs), so
        # it is armed only for calls that may be stopped midway
        llama.llama_set_abort_callback(self.ctx, self._abort if self._armed() else _NO_ABORT, None)
        rc = llama.llama_decode(self.ctx, self.batch)
        Session.decode_seconds += time.perf_counter() - t
        Session.decoded_rows += rows
        if rc == 2:  # interrupted: llama.cpp rolls the call back; make sure no cell of it stays
            llama.llama_memory_seq_rm(self.mem, -1, min(self.batch.pos[r] for r in range(rows)), -1)
            raise Cancelled()
        if rc != 0:
            # the cache may now be partly written: start over next time
            self.reset()
            raise DecodeError(f"llama_decode failed with code {rc} on {rows} rows")
