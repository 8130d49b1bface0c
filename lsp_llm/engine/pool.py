"""The in-process backend: llama.cpp contexts for the documents, behind the
scheduler (``scheduler.py``), which alone decides when any of this runs.

An LRU pool of contexts (``maxSessions``), one document per context, and
the sequences of documents evicted from it, saved in host memory within
``savedMb`` and restored, exactly, when they come back. Also the model, the
greedy memo and the remembered logits, all of which only the engine thread
touches. ``sync`` is the one way a document's context moves to new tokens.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .greedy import GreedyMemo, Tips
from .session import Cancelled, SavedState, Session, ShouldStop, SyncResult, common_prefix

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (uri, done, total)
PROGRESS_MIN_TOKENS = 512  # feeds this long (about a second) report progress
SAVED_MB = 256  # default host-memory budget for saved sequences


@dataclass
class DocStats:
    tokens: int = 0  # tokens of the whole document
    cached: int = 0
    reused_last: int = 0
    fed_last: int = 0
    fed_total: int = 0
    generated_total: int = 0
    generated_last: int = 0  # rows decoded for the last completion's candidates
    probed_last: int = 0  # first tokens stepped in the padding of the latest feed
    memo_steps_last: int = 0  # greedy steps the last completion took from the memo
    syncs: int = 0
    last_ms: float = 0.0  # the last completion, end to end on the engine
    feed_ms: float = 0.0  # ... of which bringing the session up to date
    generate_ms: float = 0.0  # ... of which extending the candidates
    decode_ms: float = 0.0  # ... of which inside llama_decode (the rest is overhead)
    window_start: int = 0
    requests_total: int = 0  # completions answered
    no_decode_total: int = 0  # ... of which with no decode call at all
    restored: int = 0  # times the session came back from host memory

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


class DocState(str, Enum):
    UNREAD = "unread"  # opened, no context holds it, nothing saved
    LIVE = "live"  # a context holds its tokens
    SAVED = "saved"  # its sequence is kept in host memory (restored on return)


class LongRead(Exception):
    """A request's read of its document outlasted its deadline; the read goes
    on in the background."""


def _until(deadline: float, should_stop: Callable[[], bool] | None) -> Callable[[], bool]:
    return lambda: time.monotonic() >= deadline or (should_stop is not None and should_stop())


def window(target: list[int], n_ctx: int, headroom: int, has_bos: bool) -> tuple[list[int], int]:
    """Fit a target into a context, leaving ``headroom`` for generation.

    The kept tail starts at a multiple of a stride so that typing does not
    shift the window (which would force a full re-feed) on every keystroke.
    Returns the windowed target and the index of its first kept token.
    """
    limit = n_ctx - headroom
    if len(target) <= limit:
        return target, 0
    head = target[:1] if has_bos else []
    body = target[1:] if has_bos else target
    room = limit - len(head)
    stride = max(1, room // 4)
    start = -(-(len(body) - room) // stride) * stride
    return head + body[start:], start

class SessionPool:
    """The documents' contexts: live (at most ``max_sessions``, LRU) and
    saved (host memory, within ``saved_bytes``). Engine thread only, but for
    ``state`` and the counters."""

    remote = False  # llama.cpp in this process (see ``remote.RemotePool``)

    def __init__(self, max_sessions: int, n_ctx: int, n_branches: int, headroom: int, saved_mb: int,
                 interrupt: Callable[[], bool], is_open: Callable[[str], bool],
                 armed: Callable[[], bool] | None = None) -> None:
        self.max_sessions = max_sessions
        self.saved_bytes = saved_mb << 20  # budget for sequences saved in host memory
        self.n_ctx = n_ctx
        self.n_branches = n_branches
        self.headroom = headroom
        self.interrupt = interrupt  # the scheduler's: stop a decode call midway (set on each context)
        self.armed = armed  # the scheduler's: whether a call may be stopped midway at all
        self.is_open = is_open  # whether a document is still open (only those are saved)
        self.model: Any = None  # lsp_llm.engine.model.Model once loaded
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.saved: OrderedDict[str, SavedState] = OrderedDict()  # LRU, within saved_bytes
        self._saved_total = 0  # bytes of self.saved
        self.stats: dict[str, DocStats] = {}
        self.memo = GreedyMemo()  # greedy steps of the current model
        self.tips = Tips()  # logits after recent prompts
        self.on_progress: ProgressFn | None = None

    @property
    def exact_memo(self) -> GreedyMemo | None:
        """The memo, if this CPU's batch rule is exact (else reuse could
        change items)."""
        return self.memo if self.model is not None and self.model.batch_rule.exact else None

    def fit(self, target: list[int]) -> list[int]:
        """The target as a session holds it (windowed to the context)."""
        return window(target, self.n_ctx, self.headroom, bool(self.model.add_bos))[0]

    def state(self, uri: str) -> DocState:
        """Any thread (membership tests only)."""
        if uri in self.sessions:
            return DocState.LIVE
        return DocState.SAVED if uri in self.saved else DocState.UNREAD

    def evictable(self, focus: str | None) -> str | None:
        """The live session to evict next: the least recently used one that
        is not the focus. Any thread."""
        return next((u for u in list(self.sessions) if u != focus), None)  # (list: atomic under the GIL)

    def can_read(self, focus: str | None) -> bool:
        """Whether a document not live may be read now: a context is free, or
        one can be evicted and saved within the budget. Any thread."""
        return len(self.sessions) < self.max_sessions or (
            self.evictable(focus) is not None and self._saved_total < self.saved_bytes)

    def describe(self) -> dict[str, Any]:
        """For ``lsp-llm.stats``: which engine serves, and whether it is exact."""
        rule = self.model.batch_rule if self.model is not None else None
        return {"engine": "in-process", "model": getattr(self.model, "name", None), "slots": self.max_sessions,
                "slots_in_use": len(self.sessions), "exact": bool(rule and rule.exact),
                "exact_items": bool(getattr(self.model, "flash_attention", False))}

    @property
    def decode_ms_total(self) -> float:
        """Time spent inside llama_decode since the process started."""
        return Session.decode_seconds * 1000

    def session(self, uri: str, focus: str | None = None) -> Session:
        """The document's session, creating or recycling one (LRU). An
        evicted document's sequence is saved in host memory (within
        ``saved_bytes``) and restored when it comes back."""
        s = self.sessions.get(uri)
        if s is not None:
            self.sessions.move_to_end(uri)
            return s
        if len(self.sessions) >= self.max_sessions:  # (the focus too, when it is the only one)
            old_uri = self.evictable(focus) or next(iter(self.sessions))
            s = self.sessions.pop(old_uri)
            log.debug("evicting the session of %s for %s", old_uri, uri)
            self._save(old_uri, s)
        else:
            s = Session(self.model, self.n_ctx, self.n_branches, self.interrupt, self.armed)
        self.sessions[uri] = s
        saved = self._unkeep(uri)
        if saved is not None and s.restore(saved):
            st = self.stats.setdefault(uri, DocStats())
            st.cached, st.restored = len(s.tokens), st.restored + 1
        return s

    def _save(self, uri: str, s: Session) -> None:
        """Keep an evicted session's sequence in host memory, if it fits."""
        if self.is_open(uri) and s.tokens and self.saved_bytes > 0:
            self._keep(uri, s.save())
            while self.saved and self._saved_total > self.saved_bytes:
                self._unkeep(next(iter(self.saved)))
        if uri in self.stats:
            self.stats[uri].cached = 0
        s.reset()

    def _keep(self, uri: str, state: SavedState) -> None:
        self._unkeep(uri)
        self.saved[uri] = state
        self._saved_total += state.nbytes

    def _unkeep(self, uri: str) -> SavedState | None:
        state = self.saved.pop(uri, None)
        if state is not None:
            self._saved_total -= state.nbytes
        return state

    @property
    def saved_mb(self) -> float:
        return self._saved_total / (1 << 20)

    def sync(self, uri: str, target: list[int], should_stop: ShouldStop | None, healed: bytes,
             deadline: float | None = None, rows: int | None = None, focus: str | None = None) -> Session:
        """Bring the document's session to (the window of) target. The feed
        probes the likely first tokens that start with ``healed``. A long read
        (PROGRESS_MIN_TOKENS or more) still going at ``deadline``
        (time.monotonic) raises LongRead. ``rows`` caps the rows of a feed
        call. A session to evict is not the focus's."""
        fitted, start = window(target, self.n_ctx, self.headroom, bool(self.model.add_bos))
        s = self.session(uri, focus)
        st = self.stats.setdefault(uri, DocStats())
        progress = None
        todo = len(fitted) - common_prefix(s.tokens, fitted)  # tokens to feed again
        if deadline is not None and todo >= PROGRESS_MIN_TOKENS:
            should_stop = _until(deadline, should_stop)
        if self.on_progress is not None and todo >= PROGRESS_MIN_TOKENS:
            report = self.on_progress

            def progress(done: int, total: int) -> None:
                report(uri, done, total)

            report(uri, 0, todo)
        fed_before = s.fed_count
        # the first tokens most likely asked for next ride in the feed's padding
        memo = self.exact_memo
        start_key = GreedyMemo.prefix(fitted) if memo is not None else None
        probe: list[int] = []
        if memo is not None and start_key is not None:
            probe = [t for t in memo.top(start_key.digest()) if self.model.piece(t).startswith(healed)]
        try:
            # (a fresh read sizes the context for the whole document, windowed)
            doc_tokens = min(st.tokens, self.n_ctx - self.headroom)
            result: SyncResult = s.sync(fitted, should_stop, progress, probe, rows, doc_tokens)
        except Cancelled:
            if deadline is None or time.monotonic() < deadline:
                raise
            raise LongRead() from None
        finally:
            st.cached = len(s.tokens)
            st.fed_total += s.fed_count - fed_before
            if progress is not None:
                report(uri, -1, todo)  # done
        if memo is not None and start_key is not None:
            for tok, after in result.probed.items():
                memo.put(GreedyMemo.key(start_key, [tok]), after[0], after)
            if s.logits is not None:
                self.tips.put(start_key.digest(), s.logits)
        st.window_start = start
        if not self.memo.preparing:  # idle work guesses; the *_last counters are what the user got
            st.reused_last, st.fed_last, st.probed_last = result.reused, result.fed, len(result.probed)
            st.syncs += 1
        return s

    def resize(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        while len(self.sessions) > max_sessions:
            uri, s = self.sessions.popitem(last=False)
            self._save(uri, s)
            s.close()

    def drop(self, uri: str) -> None:
        self._unkeep(uri)
        s = self.sessions.pop(uri, None)
        if s is not None:
            s.close()

    def close_all(self) -> None:
        for s in self.sessions.values():
            s.close()
        self.sessions.clear()
        self.saved.clear()
        self._saved_total = 0

    def read_ahead(self, model: Any, n_ctx: int, target: list[int]) -> Session:
        """A document read on a model not yet serving (any thread: the
        session is its own until ``adopt``), so that the first request after
        the switch does not read it again. Calls stop midway only when the
        engine stops (they are not the engine thread's to preempt)."""
        s = Session(model, n_ctx, self.n_branches, self.interrupt, self.armed)
        try:
            s.sync(window(target, n_ctx, self.headroom, bool(model.add_bos))[0])
        except BaseException:
            s.close()
            raise
        return s

    def adopt(self, uri: str, s: Session) -> None:
        """Engine thread: a session read ahead (``read_ahead``) on the model
        now serving joins the pool; closed if it cannot (another model, no
        free context, the document live already)."""
        if s.model is not self.model or uri in self.sessions or len(self.sessions) >= self.max_sessions:
            s.close()
            return
        self.sessions[uri] = s
        self.stats.setdefault(uri, DocStats()).cached = len(s.tokens)

    def set_model(self, model: Any, n_ctx: int | None = None) -> None:
        """Engine thread only: switch models, dropping every session and
        freeing the old model."""
        self.close_all()
        self.memo.clear()
        self.tips.clear()
        if n_ctx is not None:
            self.n_ctx = n_ctx
        for st in self.stats.values():
            st.cached = 0
        old, self.model = self.model, model
        if old is not None and old is not model:
            old.close()

