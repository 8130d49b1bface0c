"""The engine thread: the only thread that calls into llama.cpp, and the one
place that decides what it runs next.

It owns the model sessions (an LRU pool of llama.cpp contexts, one document
per context, plus saved sequences in host memory). Work has a kind, and each
kind a rank (``Rank``); ``Engine._next`` takes the highest-ranked work
waiting, and any running work yields to waiting work of a higher rank
(``Engine._yields``) between decode calls, so a request waits at most one
call of lower work (idle calls are short).

- JOB: requests and engine operations (a model switch, a resize), first come
  first served; a request stops at its own cancel or a newer request's;
- FOCUS: the document the user edits or asks about, brought to its newest
  text (it may evict a live session);
- SYNC: another live document edited (a rename, a formatter);
- IDLE: the plans that requests leave (``prepare``): the next keystrokes,
  the rest of a suggestion; a plan belongs to the prompt it was made for;
- READ: documents not live (opened and never read, or saved to host
  memory): read or restored, most recently edited first, only when nothing
  else waits.

Documents' states (``DocState``): unread, live (a context), saved (host
memory); a document whose text is no longer trusted (stale) never gets
here (``documents.DocumentStore.trusted``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

from .pool import SAVED_MB, DocState, DocStats, LongRead, SessionPool
from .session import Cancelled, Session, ShouldStop

log = logging.getLogger(__name__)

T = TypeVar("T")
IdleTask = Callable[[ShouldStop], None]  # engine thread; raises Cancelled when told to stop


READ_SETTLE_S = 0.05  # reads start this long after the last open or edit (``Engine._settle_left``)


class Rank(IntEnum):
    """Kinds of engine work, highest first in ``Engine._next``; running work
    yields to waiting work of a higher rank (``Engine._yields``)."""

    NOTHING = 0
    READ = 1  # a document not live: read or restored, in idle time only
    IDLE = 2  # idle plans: what the next keystrokes will ask for
    SYNC = 3  # a live document other than the focus, edited
    FOCUS = 4  # the document the user edits or asks about
    JOB = 5  # requests and engine operations, first come first served


# Rows per decode call of lower-ranked work: whatever outranks it waits at
# most one such call (a read's 32 rows take ~70 ms on 2 cores; an idle
# plan's 8 branch rows, each with logits over the vocabulary, ~50 ms).
# JOB and FOCUS work feeds in the context's full batch.
CALL_ROWS = {Rank.READ: 32, Rank.SYNC: 32, Rank.IDLE: 8}


@dataclass(frozen=True)
class DocTarget:
    """What a document asks of its session: its prompt, the healed text the
    next completion starts with, and the document's length in tokens."""

    prompt: list[int]
    healed: bytes
    doc_tokens: int


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: Future
    cancel: threading.Event = field(default_factory=threading.Event)
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class _Plan:
    """Idle work for one document, made for one of its targets (the prompt
    of the request that left it)."""

    target: list[int]
    tasks: dict[str, deque[IdleTask]] = field(default_factory=dict)  # by kind, in order

    def next(self) -> tuple[str, IdleTask] | None:
        for kind, queue in self.tasks.items():
            if queue:
                return kind, queue[0]
        return None


@dataclass
class _Sync:
    uri: str
    target: list[int]
    rank: Rank  # FOCUS, SYNC or READ


@dataclass
class _Idle:
    uri: str
    plan: _Plan
    kind: str
    task: IdleTask


def _pooled(name: str, settable: bool = False) -> property:
    """An attribute of the engine's backend, read (and set) through the engine."""

    def get(self: Engine) -> Any:
        return getattr(self.pool, name)

    def put(self: Engine, value: Any) -> None:
        setattr(self.pool, name, value)

    return property(get, put if settable else None)


class Engine:
    """The scheduler: the engine thread, its queues, and the one decision of
    what runs next. It drives its backend, the in-process ``SessionPool``,
    only through ``sync``, ``state``, ``can_read``, ``drop``, ``resize``,
    ``set_model`` and ``close_all``; jobs and idle tasks (the features' code)
    use the backend as they need."""

    def __init__(self, max_sessions: int, n_ctx: int, n_branches: int, headroom: int,
                 saved_mb: int = SAVED_MB) -> None:
        self.pool: Any = self.local_pool(max_sessions, n_ctx, n_branches, headroom, saved_mb)
        self.focus: str | None = None  # the document at the cursor
        self.idle_ms_total = 0.0
        self.job_wait_ms = 0.0  # how long the last job waited to start
        self.idle_rows_total = 0
        self._targets: dict[str, list[int]] = {}
        self._healed: dict[str, bytes] = {}
        self._dirty: OrderedDict[str, None] = OrderedDict()
        self._plans: dict[str, _Plan] = {}
        self._jobs: deque[_Job] = deque()
        self._running: _Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._waiting = Rank.NOTHING  # the highest rank of waiting work (lock-free reads)
        self._running_rank = Rank.NOTHING  # of the work running now (engine thread)
        self._touched = 0.0  # time.monotonic() of the last update: reads settle after it
        self.read_settle_s = READ_SETTLE_S
        self._thread = threading.Thread(target=self._run, name="lsp-llm-engine", daemon=True)
        self._thread.start()

    # -- the backend's state, as the features read it ------------------------------
    model = _pooled("model")
    stats = _pooled("stats")
    memo = _pooled("memo")
    tips = _pooled("tips")
    sessions = _pooled("sessions")
    saved = _pooled("saved")
    n_ctx = _pooled("n_ctx")
    n_branches = _pooled("n_branches")
    headroom = _pooled("headroom", settable=True)
    saved_bytes = _pooled("saved_bytes", settable=True)
    max_sessions = _pooled("max_sessions")
    on_progress = _pooled("on_progress", settable=True)
    exact_memo = _pooled("exact_memo")
    saved_mb = _pooled("saved_mb")
    decode_ms_total = _pooled("decode_ms_total")

    def local_pool(self, max_sessions: int, n_ctx: int, n_branches: int, headroom: int,
                   saved_mb: int = SAVED_MB) -> SessionPool:
        """A new in-process backend, whose calls this engine can stop midway."""
        return SessionPool(max_sessions, n_ctx, n_branches, headroom, saved_mb, interrupt=self._interrupted,
                           is_open=lambda uri: uri in self._targets, armed=self._armed)

    def fit(self, target: list[int]) -> list[int]:
        return self.pool.fit(target)

    def session(self, uri: str) -> Session:
        return self.pool.session(uri, self.focus)

    # -- called from any thread ----------------------------------------------
    def update(self, uri: str, target: list[int], doc_tokens: int, healed: bytes = b"", focus: bool = True) -> None:
        """The document's newest prompt, and the text the next completion's
        first token must start with (it picks what the feed probes). An edit
        or a request puts the document in focus. A new target drops the
        document's idle plan (it was made for the old one)."""
        with self._cond:
            old = self._targets.get(uri)
            if old != target:
                self._targets[uri] = target
                self._dirty[uri] = None
                self._dirty.move_to_end(uri)
                self._plans.pop(uri, None)
            self._healed[uri] = healed
            self.stats.setdefault(uri, DocStats()).tokens = doc_tokens
            if focus:
                self.focus = uri
            self._touched = time.monotonic()
            self._refresh()

    def forget(self, uri: str) -> None:
        with self._cond:
            self._targets.pop(uri, None)
            self._healed.pop(uri, None)
            self._dirty.pop(uri, None)
            self._plans.pop(uri, None)
            self.stats.pop(uri, None)
            if self.focus == uri:
                self.focus = None
            self._refresh()
        self.submit(lambda: self.pool.drop(uri))

    def prepare(self, uri: str, kind: str, tasks: list[IdleTask], prompt: list[int]) -> None:
        """Idle work left by a request made for ``prompt`` (the document's
        prompt at the request), replacing earlier tasks of the same kind.
        Nothing when the document has moved on since (a plan for an old
        prompt would move the session back and drop the new tip's logits);
        dropped when its target changes."""
        with self._cond:
            target = self._targets.get(uri)
            if target is None or target != prompt:
                return
            plan = self._plans.get(uri)
            if plan is None or plan.target is not target:
                plan = self._plans[uri] = _Plan(target)
            plan.tasks[kind] = deque(tasks)
            self._refresh()

    def submit(self, fn: Callable[[], T], cancel: threading.Event | None = None) -> Future:
        job = _Job(fn, Future(), cancel or threading.Event())
        with self._cond:
            if self._stopping:
                job.future.set_exception(RuntimeError("the engine is shutting down"))
                return job.future
            self._jobs.append(job)
            self._refresh()
        return job.future

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the engine thread: the running job stops at its next decode
        boundary (it is cancelled), queued jobs fail, contexts are freed.
        Returns whether the thread ended within timeout (a model load is not
        cancellable; the thread is a daemon, it does not keep the process)."""
        with self._cond:
            self._stopping = True
            for job in self._jobs:
                job.cancel.set()
            running = self._running
            if running is not None:
                running.cancel.set()
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def swap_model(self, model: Any, n_ctx: int, targets: dict[str, DocTarget], pool: Any = None,
                   ahead: dict[str, Session] | None = None) -> Future:
        """Any thread: switch to model once the jobs already queued have run
        (their token ids are the old vocabulary's). The documents' targets in
        the new vocabulary replace the old ones in the same step, so no old id
        reaches the new model and no new one the old model. The old model is
        freed on the engine thread, by then unused. See ``lifecycle.swap``.
        With ``pool``, the engine moves to that backend too (a remote engine,
        whose model ``model`` is, or a new in-process pool). ``ahead``:
        sessions read on the new model already (``SessionPool.read_ahead``),
        which the pool adopts after the switch."""
        ahead = ahead or {}
        job = _Job(lambda: self._switch(model, n_ctx, pool, ahead), Future())
        job.future.add_done_callback(lambda f: _discard(model, ahead) if f.cancelled() or f.exception() else None)
        with self._cond:
            if self._stopping:
                job.future.set_exception(RuntimeError("the engine is shutting down"))
                return job.future
            self._targets = {uri: d.prompt for uri, d in targets.items()}
            self._healed = {uri: d.healed for uri, d in targets.items()}
            self._dirty = OrderedDict.fromkeys(targets)
            self._plans.clear()  # idle work made of old ids
            for uri, d in targets.items():
                self.stats.setdefault(uri, DocStats()).tokens = d.doc_tokens
            self._jobs.append(job)
            self._refresh()
        return job.future

    # -- what runs next: the one place -------------------------------------------
    def state(self, uri: str) -> DocState:
        return self.pool.state(uri)

    def _refresh(self) -> None:
        """Under the lock, after any queue changed: the rank of the highest
        waiting work, which running work compares its own with."""
        self._waiting = self._waiting_rank()
        self._cond.notify()

    def _waiting_rank(self) -> Rank:
        if self._jobs:
            return Rank.JOB
        if self.model is None:
            return Rank.NOTHING
        if self.focus in self._dirty:
            return Rank.FOCUS
        if any(self.pool.state(u) is DocState.LIVE for u in self._dirty):
            return Rank.SYNC
        if any(plan.next() is not None for plan in self._plans.values()):
            return Rank.IDLE
        return Rank.READ if self._next_read() is not None else Rank.NOTHING

    def _yields(self, rank: Rank) -> bool:
        """Whether work of this rank should stop now: the engine stops, or
        work of a higher rank waits. The one stop check (lock-free: it reads
        one value that ``_refresh`` writes)."""
        return self._stopping or self._waiting > rank

    def _interrupted(self) -> bool:
        """Inside an armed decode call (the sessions' abort callback)."""
        return self._stopping

    def _armed(self) -> bool:
        """Whether the next decode call may be stopped midway: only while the
        engine stops. An armed call asks the abort callback, which is Python,
        between graph nodes, and each ask waits for the GIL: under load that
        made an idle call of 8 rows take 20-44 s and a first read seem stuck
        at 100% of a core. Calls of work that yields are short instead (``CALL_ROWS``)."""
        return self._stopping

    def _next(self) -> _Job | _Sync | _Idle | None:
        """What the engine does next (under the lock): the highest-ranked
        work waiting."""
        work = self._pick()
        if isinstance(work, _Sync):
            del self._dirty[work.uri]
        self._refresh()
        return work

    def _pick(self) -> _Job | _Sync | _Idle | None:
        if self._jobs:
            return self._jobs.popleft()
        if self.model is None:
            return None
        if self.focus in self._dirty:
            return _Sync(self.focus, self._targets[self.focus], Rank.FOCUS)
        edited = next((u for u in reversed(self._dirty) if self.pool.state(u) is DocState.LIVE), None)
        if edited is not None:
            return _Sync(edited, self._targets[edited], Rank.SYNC)
        idle = self._next_idle()
        if idle is not None:
            return idle
        uri = self._next_read()
        if uri is None or self._settle_left() is not None:
            return None
        return _Sync(uri, self._targets[uri], Rank.READ)

    def _settle_left(self) -> float | None:
        """Seconds until a waiting read may start, or None. A read waits for
        a burst of messages to settle (an editor restoring its tabs sends
        the opens, then the request; a read started at the first open would
        hold the request for a call)."""
        left = self.read_settle_s - (time.monotonic() - self._touched)
        return left if left > 0 and self._waiting == Rank.READ else None

    @property
    def in_idle(self) -> bool:
        """Whether the work running now is idle work (engine thread): a
        guess at what the user will ask, not a request."""
        return self._running_rank is Rank.IDLE

    def call_rows(self) -> int | None:
        """Rows per decode call for the work running now (engine thread):
        short calls for work that yields, None (the full batch) otherwise."""
        return CALL_ROWS.get(self._running_rank)

    def _next_read(self) -> str | None:
        """A document not live, the most recently edited first, when a
        context is free, or one can be evicted (not the focus's) and the
        saved states are within their budget (a first visit then costs a
        restore, not a read)."""
        if not self.pool.can_read(self.focus):
            return None
        return next((u for u in reversed(self._dirty) if self.pool.state(u) is not DocState.LIVE), None)

    def preparing(self) -> bool:
        """Whether idle work is left (any thread)."""
        with self._cond:
            return any(plan.next() is not None for plan in self._plans.values())

    def busy(self) -> bool:
        """Whether any work waits (any thread)."""
        with self._cond:
            return self._waiting_rank() > Rank.NOTHING

    @property
    def jobs_waiting(self) -> bool:
        """Whether a job waits behind the running one (a job that can answer
        with less may stop early for it: ghost text for a popup request)."""
        return self._waiting == Rank.JOB

    def idle_stats(self) -> dict[str, Any]:
        """Idle work so far: time, rows decoded, greedy steps prepared and
        how many of them a later request used; sequences kept in host memory."""
        return {
            "idle_ms_total": round(self.idle_ms_total, 3),
            "job_wait_ms_last": round(self.job_wait_ms, 3),
            "idle_rows_total": self.idle_rows_total,
            "idle_steps": self.memo.prepared,
            "idle_steps_used": self.memo.prepared_used,
            "saved_documents": len(self.saved),
            "saved_mb": round(self.saved_mb, 1),
            "waiting": self._waiting.name.lower(),
        }

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread -----------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (work := self._next()) is None:
                    self._cond.wait(self._settle_left())
                if self._stopping:
                    break
            try:  # the engine thread must outlive any one piece of work
                if isinstance(work, _Job):
                    self._running_rank = Rank.JOB
                    self._run_job(work)
                elif isinstance(work, _Sync):
                    self._running_rank = work.rank
                    self._background_sync(work)
                else:
                    self._running_rank = Rank.IDLE
                    self._run_idle(work)
            except Exception:
                log.exception("engine: %s failed", type(work).__name__)
            finally:
                self._running_rank = Rank.NOTHING
        self.pool.close_all()
        with self._cond:
            self._plans.clear()
            pending = list(self._jobs)
            self._jobs.clear()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the engine is shutting down"))

    def _next_idle(self) -> _Idle | None:
        order = [self.focus] if self.focus in self._plans else []
        order += [u for u in self._plans if u != self.focus]
        for uri in order:
            plan = self._plans[uri]
            step = plan.next()
            if step is not None:
                return _Idle(uri, plan, *step)
            del self._plans[uri]  # done: nothing likely is left to prepare
        return None

    def _run_job(self, job: _Job) -> None:
        self._running = job  # stop() cancels it
        try:
            if self._stopping:
                job.cancel.set()
            self._run_job_now(job)
        finally:
            self._running = None

    def _run_job_now(self, job: _Job) -> None:
        # a future its request cancelled (asyncio.wrap_future passes the
        # client's cancel on) takes no result: never touch it again
        if not job.future.set_running_or_notify_cancel():
            return
        if job.cancel.is_set():  # superseded, or over its budget, before it ran
            job.future.set_exception(Cancelled())
            return
        self.job_wait_ms = (time.perf_counter() - job.queued) * 1000  # behind the work it preempted
        try:
            job.future.set_result(job.fn())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request
            job.future.set_exception(e)

    def _background_sync(self, work: _Sync) -> None:
        uri, target = work.uri, work.target

        def superseded() -> bool:
            return self._yields(work.rank) or self._targets.get(uri) is not target

        try:
            self.sync(uri, target, superseded, rows=self.call_rows())
        except Cancelled:
            with self._cond:  # try again later unless a newer target replaced it
                if uri in self._targets and uri not in self._dirty:
                    self._dirty[uri] = None
                    self._dirty.move_to_end(uri, last=False)  # not ahead of what the user edited since
                    self._refresh()
        except Exception:
            log.exception("%s: background sync failed", uri)

    def _run_idle(self, work: _Idle) -> None:
        """Run one idle task; jobs, edits and newer plans preempt it."""

        def preempted() -> bool:
            return self._yields(Rank.IDLE) or self._plans.get(work.uri) is not work.plan

        t0, rows0 = time.perf_counter(), Session.decoded_rows
        self.memo.preparing = True
        try:
            work.task(preempted)
            done = True
        except Cancelled:
            done = False  # tried again when the engine is free, if the plan still holds
        except Exception:
            log.exception("%s: idle work failed", work.uri)
            done = True
        finally:
            self.memo.preparing = False
            self.idle_ms_total += (time.perf_counter() - t0) * 1000
            self.idle_rows_total += Session.decoded_rows - rows0
        if done:
            with self._cond:
                queue = work.plan.tasks.get(work.kind)
                if queue and queue[0] is work.task:
                    queue.popleft()
                self._refresh()

    def sync(self, uri: str, target: list[int], should_stop: ShouldStop | None = None, healed: bytes | None = None,
             deadline: float | None = None, rows: int | None = None) -> Session:
        """Engine thread: the backend's ``sync`` (the feed probes for
        ``healed``, by default what the document said last). A long read
        still going at ``deadline`` raises LongRead and goes on as a
        background sync."""
        typed = self._healed.get(uri, b"") if healed is None else healed
        try:
            return self.pool.sync(uri, target, should_stop, typed, deadline, rows, self.focus)
        except LongRead:
            with self._cond:  # the background takes the read over
                if uri in self._targets:
                    self._dirty[uri] = None
                    self._refresh()
            raise

    def resize(self, max_sessions: int) -> None:
        self.pool.resize(max_sessions)

    def set_model(self, model: Any, n_ctx: int | None = None) -> None:
        """Engine thread only: switch models, dropping every session and
        freeing the old model. The targets must already be the new model's
        (``swap_model`` sees to it)."""
        self.pool.set_model(model, n_ctx)
        with self._cond:
            self._plans.clear()
            for uri in self._targets:
                self._dirty[uri] = None
            self._refresh()

    def _switch(self, model: Any, n_ctx: int, pool: Any, ahead: dict[str, Session]) -> None:
        """Engine thread: the backend (if a new one comes), the model, and
        the sessions read ahead for documents still open."""
        if pool is not None and pool is not self.pool:
            old, self.pool = self.pool, pool
            old.close_all()
            if old.model is not None:
                old.model.close()
        self.set_model(model, n_ctx)
        for uri, session in ahead.items():
            try:
                if uri in self._targets and hasattr(self.pool, "adopt"):
                    self.pool.adopt(uri, session)
                    continue
            except Exception:  # the model serves now: the document is read again instead
                log.exception("%s: the session read ahead was not adopted", uri)
            session.close()


def _discard(model: Any, ahead: dict[str, Session]) -> None:
    """A switch that never happened: its model and sessions are freed."""
    for session in ahead.values():
        session.close()
    model.close()
