"""Token mirror of a byte string, kept current by local re-tokenization.

Tokenization is not local: an edit can change tokens before the edit point
(" crab" may be one token or two). On each edit we re-tokenize a window that
starts a few tokens before the edit and ends a few tokens after it, then check
the window is stable by re-tokenizing a wider one: if the wider window
reproduces the same tokens at the seams, the splice equals a full
tokenization. If not, the window grows; past a limit the whole text is
re-tokenized. The property tests pin splice == full tokenization.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from itertools import accumulate

log = logging.getLogger(__name__)

Tokenize = Callable[[bytes], list[int]]
Piece = Callable[[int], bytes]

MARGIN = 3  # tokens of context kept on each side of an edit
MAX_TRIES = 4


class TokenMirror:
    """``ids`` tokenize ``data`` (without BOS); ``ends[i]`` is the byte offset
    where token i ends. Requires a reversible tokenizer (pieces concatenate to
    the text); otherwise every edit re-tokenizes everything."""

    def __init__(self, tokenize: Tokenize, piece: Piece, data: bytes) -> None:
        self._tokenize = tokenize
        self._piece = piece
        self.ids: list[int] = []
        self.ends: list[int] = []
        self.full_retokenizations = 0
        self.reset(data)

    def reset(self, data: bytes) -> None:
        self.ids = self._tokenize(data)
        self.ends = self._ends(0, self.ids)
        self.reversible = (self.ends[-1] if self.ends else 0) == len(data)
        if not self.reversible:
            log.debug("tokenizer is not reversible on this text; using full re-tokenization")

    def _ends(self, start: int, ids: list[int]) -> list[int]:
        return list(accumulate((len(self._piece(t)) for t in ids), initial=start))[1:]

    def _start(self, i: int) -> int:
        return self.ends[i - 1] if i > 0 else 0

    def splice(self, data: bytes, start: int, old_end: int, new_end: int) -> None:
        """Update after bytes [start, old_end) were replaced so that the new
        text ``data`` holds the replacement in [start, new_end)."""
        if not self.reversible:
            self.full_retokenizations += 1
            self.reset(data)
            return
        delta = new_end - old_end
        n = len(self.ids)
        margin = MARGIN
        for _ in range(MAX_TRIES):
            i0 = max(0, bisect_right(self.ends, start) - margin)
            j0 = min(n, bisect_left(self.ends, old_end) + 1 + margin)
            lo, hi = self._start(i0), self._start(j0) if j0 < n else len(data) - delta
            window = self._tokenize(data[lo : hi + delta])
            if self._stable(data, i0, j0, delta, window, margin):
                ends = self._ends(lo, window)
                if (ends[-1] if ends else lo) != hi + delta:
                    break
                self.ids[i0:j0] = window
                self.ends[i0:] = ends + [e + delta for e in self.ends[j0:]]
                return
            margin *= 4
        self.full_retokenizations += 1
        self.reset(data)

    def _stable(self, data: bytes, i0: int, j0: int, delta: int, window: list[int], margin: int) -> bool:
        """A wider window must reproduce the neighbours and the window."""
        n = len(self.ids)
        a, b = max(0, i0 - margin), min(n, j0 + margin)
        if a == i0 and b == j0:
            return True  # the window already spans the whole text
        lo = self._start(a)
        hi = self._start(b) if b < n else len(data) - delta
        wide = self._tokenize(data[lo : hi + delta])
        return wide == self.ids[a:i0] + window + self.ids[j0:b]

    def prefix(self, data: bytes, pos: int) -> list[int]:
        """Tokens of data[:pos], as a full tokenization of it would give."""
        k = bisect_right(self.ends, pos)  # tokens that end at or before pos
        if k == len(self.ids) and (self.ends[-1] if self.ends else 0) == pos:
            return list(self.ids)
        if not self.reversible:
            return self._tokenize(data[:pos])
        margin = MARGIN
        for _ in range(MAX_TRIES):
            i0 = max(0, k - margin)
            lo = self._start(i0)
            tail = self._tokenize(data[lo:pos])
            a = max(0, i0 - margin)
            if a == i0 or self._tokenize(data[self._start(a) : pos]) == self.ids[a:i0] + tail:
                return self.ids[:i0] + tail
            margin *= 4
        return self._tokenize(data[:pos])
