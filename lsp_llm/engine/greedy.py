"""A memo of greedy steps: token sequence -> the model's most likely next token.

Greedy decoding is a pure function of the tokens so far, and with canonical
batch shapes (see ``calibrate``) the logits behind it do not depend on how the
tokens were batched. So a step computed once can be reused by any later
completion that reaches the same sequence: typing inside a word keeps the
prompt and re-asks for the same branches, and typing what the line item
predicted walks down a path that is already known. Using the memo never
changes an item; it only skips decode calls.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

Key = bytes
TOP_TOKENS = 48  # most likely next tokens remembered for some sequences


class GreedyMemo:
    """A bounded LRU map from a token sequence (by a 128-bit BLAKE2b digest) to
    its greedy next token, and for some sequences the most likely next tokens
    (the likely first tokens of completions once the document reaches it)."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._steps: OrderedDict[Key, tuple[int, array[int] | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        # steps put while ``preparing`` (idle work) count as prepared until a
        # get uses them: how much idle work paid off
        self.preparing = False
        self.prepared = 0
        self.prepared_used = 0
        self._unused: set[Key] = set()
        # the engine thread writes; a request answered on the event loop
        # straight from the memo reads (``completion.from_memo``)
        self._lock = threading.Lock()

    @staticmethod
    def prefix(tokens: Sequence[int]) -> hashlib.blake2b:
        """A hash state for a shared prefix; extend it with ``key``."""
        h = hashlib.blake2b(digest_size=16)
        h.update(array("i", tokens).tobytes())
        return h

    @staticmethod
    def key(prefix: hashlib.blake2b, tail: Sequence[int]) -> Key:
        h = prefix.copy()
        h.update(array("i", tail).tobytes())
        return h.digest()

    def get(self, key: Key, use: bool | None = None) -> int | None:
        """The greedy next token, if known. ``use`` says whether this lookup
        serves a request (default: unless idle work is preparing)."""
        with self._lock:
            step = self._steps.get(key)
            if step is None:
                self.misses += 1
                return None
            self._steps.move_to_end(key)
            self.hits += 1
            if key in self._unused and (not self.preparing if use is None else use):
                self._unused.discard(key)
                self.prepared_used += 1
            return step[0]

    def top(self, key: Key) -> Sequence[int]:
        """The most likely next tokens, most likely first (empty if unknown)."""
        with self._lock:
            step = self._steps.get(key)
        return step[1] if step is not None and step[1] is not None else ()

    def put(self, key: Key, token: int, top: Sequence[int] = ()) -> None:
        with self._lock:
            old = self._steps.get(key)
            kept = array("i", top) if top else (old[1] if old is not None else None)  # compact: 4 bytes a token
            if self.preparing and old is None:
                self.prepared += 1
                self._unused.add(key)
            self._steps[key] = (token, kept)
            self._steps.move_to_end(key)
            while len(self._steps) > self.capacity:
                self._unused.discard(self._steps.popitem(last=False)[0])

    def clear(self) -> None:
        with self._lock:
            self._steps.clear()
            self._unused.clear()

    def __len__(self) -> int:
        return len(self._steps)


class Tips:
    """The logits after a few recent prompts (by the digest of their tokens),
    whichever session computed them: with the memo they answer a request for
    one of those prompts with no decode, wherever the session is. Bounded
    LRU; 1 MB an entry with a 262k vocabulary."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._logits: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: Key, logits: np.ndarray) -> None:
        with self._lock:
            self._logits[key] = logits
            self._logits.move_to_end(key)
            while len(self._logits) > self.capacity:
                self._logits.popitem(last=False)

    def get(self, key: Key) -> np.ndarray | None:
        with self._lock:
            return self._logits.get(key)

    def clear(self) -> None:
        with self._lock:
            self._logits.clear()
