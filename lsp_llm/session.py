"""A model session: one llama.cpp context holding one token sequence.

The session keeps ``tokens`` (what its KV cache holds, BOS first) and the
logits after the last of them. ``sync`` brings it to a target sequence by
rewinding to the common prefix and feeding only the tail. Every decode call
has a canonical shape (``BatchRule``) so the result for a token never depends
on how it was batched: after any sequence of syncs the logits are
bit-identical to a fresh evaluation of the same tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import llama_cpp as llama
import numpy as np

from .model import BatchRule, Model, logits_view

log = logging.getLogger(__name__)

DOC_SEQ = 0
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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """One context, one document sequence (seq 0) plus branch sequences used
    while extending completion candidates."""

    decode_seconds = 0.0  # time inside llama_decode, all sessions (engine thread only)

    def __init__(self, model: Model, n_ctx: int, n_branches: int) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.n_branches = n_branches
        self.ctx = model.new_context(n_ctx, n_branches + 1)
        self.mem = llama.llama_get_memory(self.ctx)
        self.rows = model.n_ubatch
        self.batch = llama.llama_batch_init(self.rows, 0, 1)
        self.tokens: list[int] = []
        self.logits: np.ndarray | None = None
        self.fed_count = 0  # document tokens decoded, ever (cancelled feeds included)
        self._bos_logits: np.ndarray | None = None

    @property
    def rule(self) -> BatchRule:
        return self.model.batch_rule

    def close(self) -> None:
        if self.ctx:
            llama.llama_batch_free(self.batch)
            llama.llama_free(self.ctx)
            self.ctx = None

    def reset(self) -> None:
        llama.llama_memory_clear(self.mem, True)
        self.tokens = []
        self.logits = None

    # -- the document sequence ---------------------------------------------
    def sync(
        self,
        target: Sequence[int],
        should_stop: ShouldStop | None = None,
        progress: Progress | None = None,
    ) -> SyncResult:
        """Make the session hold ``target`` with its last logits ready."""
        if not target:
            raise ValueError("a session needs at least one token")
        if len(target) > self.n_ctx:
            raise ValueError(f"{len(target)} tokens do not fit a context of {self.n_ctx}")
        bos = self.model.bos if self.model.add_bos else None
        fed_bos = 0
        if bos is not None and target[0] == bos and not self.tokens:
            # BOS goes alone so its logits can be cached: the session then
            # never has to rewind past it.
            self._decode_doc([bos], want_logits=True)
            self._bos_logits = self.logits
            fed_bos = 1
        keep = common_prefix(self.tokens, target)
        if keep == len(target):  # target is a prefix of what we hold
            if keep == len(self.tokens) and self.logits is not None:
                return SyncResult(reused=keep - fed_bos, fed=fed_bos)
            if keep == 1 and target[0] == bos and self._bos_logits is not None:
                self._rewind(1)
                self.logits = self._bos_logits
                return SyncResult(reused=1 - fed_bos, fed=fed_bos)
            keep -= 1  # the logits of the last token are needed: re-feed it
        self._rewind(keep)
        fed = self._feed(list(target[keep:]), should_stop, progress)
        return SyncResult(reused=keep - fed_bos, fed=fed + fed_bos)

    def _rewind(self, n: int) -> None:
        if n < len(self.tokens):
            if n == 0:
                llama.llama_memory_clear(self.mem, True)
            elif not llama.llama_memory_seq_rm(self.mem, DOC_SEQ, n, -1):
                raise DecodeError("llama.cpp refused to remove tokens from the sequence")
            del self.tokens[n:]
            self.logits = None

    def _feed(self, tail: list[int], should_stop: ShouldStop | None, progress: Progress | None) -> int:
        fed = 0
        plan = self.rule.plan(len(tail), self.rows)
        for i, size in enumerate(plan):
            if should_stop is not None and should_stop():
                raise Cancelled()
            chunk = tail[fed : fed + size]
            last = i == len(plan) - 1
            self._decode_doc(chunk, want_logits=last)
            fed += size
            if progress is not None:
                progress(fed, len(tail))
        return fed

    def _decode_doc(self, chunk: list[int], want_logits: bool) -> None:
        start = len(self.tokens)
        n = len(chunk)
        rows = self.rule.padded(n)
        b = self.batch
        for i in range(rows):
            # padding rows repeat the last token after the real ones: the
            # causal mask hides them from real rows; they are removed below.
            b.token[i] = chunk[i] if i < n else chunk[-1]
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = DOC_SEQ
            b.logits[i] = want_logits and i == n - 1
        b.n_tokens = rows
        self.decode(rows)
        if rows > n:
            llama.llama_memory_seq_rm(self.mem, DOC_SEQ, start + n, -1)
        self.tokens.extend(chunk)
        self.fed_count += n
        if want_logits:
            self.logits = logits_view(self.ctx, n - 1, self.model.n_vocab).copy()
        else:
            self.logits = None

    def decode(self, rows: int) -> None:
        """Decode the first ``rows`` rows of ``self.batch``."""
        t = time.perf_counter()
        rc = llama.llama_decode(self.ctx, self.batch)
        Session.decode_seconds += time.perf_counter() - t
        if rc != 0:
            # the cache may now be partly written: start over next time
            self.reset()
            raise DecodeError(f"llama_decode failed with code {rc} on {rows} rows")
