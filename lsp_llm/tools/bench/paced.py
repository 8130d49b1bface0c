"""Replay a trace at a human pace (see pace.py) against one engine.

Every keystroke happens at its time on the trace's clock, answered or not.
An editor sends ``didChange`` and at once a completion request; a request
still running when the next keystroke comes is cancelled (``$/cancelRequest``,
as VS Code and Neovim do). Engines that answer one request at a time in
process (naive, floor, llama-cpp-python, llama-server) get, when free, the
newest text only: the keystrokes typed meanwhile are never asked for.

**Latency of a keystroke**: from the keystroke to the first *fresh* answer
after it, an answer being fresh when no newer keystroke happened before it
arrived (a stale answer is for text the user has already changed, so an
editor cannot show it). A keystroke typed while the engine was still busy
therefore waits for the next fresh answer, and its wait is counted.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import asdict, dataclass

from ..client import Request, StdioServer, completion_items
from .engines import Engine
from .pace import schedule
from .traces import Keystroke, Trace, apply_edit, offset_of

NO_DECODE_KEYS = ("no_decode_total", "requests_total")  # per document, when the server has them
IDLE_KEYS = ("idle_rows_total", "idle_ms_total", "idle_steps", "idle_steps_used")  # global


@dataclass
class Answer:
    key: int  # the keystroke whose text the request was for
    sent: float  # seconds from the start of the run
    answered: float | None  # None: cancelled or failed
    items: int = 0


@dataclass
class KeyResult:
    i: int
    doc: int
    kind: str
    at: float  # the keystroke's time on the trace clock
    latency_ms: float | None  # None: no fresh answer came after it
    switch_back: bool  # first keystroke after coming back to a document typed in before


def fresh_times(times: list[float], answers: list[Answer]) -> list[float]:
    """Arrival times of the fresh answers, sorted."""
    out = []
    for a in answers:
        if a.answered is None:
            continue
        latest = bisect.bisect_right(times, a.answered) - 1  # the newest keystroke when it arrived
        if latest == a.key:
            out.append(a.answered)
    return sorted(out)


def key_latencies(times: list[float], answers: list[Answer]) -> list[float | None]:
    """Milliseconds from each keystroke to the first fresh answer after it."""
    fresh = fresh_times(times, answers)
    out: list[float | None] = []
    for at in times:
        j = bisect.bisect_left(fresh, at)
        out.append((fresh[j] - at) * 1000 if j < len(fresh) else None)
    return out


def switch_backs(keys: list[Keystroke]) -> list[bool]:
    """True at the first keystroke after switching to a document typed in before."""
    seen: set[int] = set()
    out = []
    prev = None
    for k in keys:
        out.append(prev is not None and k.doc != prev and k.doc in seen)
        seen.add(k.doc)
        prev = k.doc
    return out


def key_results(trace: Trace, times: list[float], answers: list[Answer]) -> list[KeyResult]:
    lat = key_latencies(times, answers)
    back = switch_backs(trace.keys)
    return [KeyResult(i, k.doc, k.kind, round(at, 4), ms, b)
            for i, (k, at, ms, b) in enumerate(zip(trace.keys, times, lat, back))]


@dataclass
class Step:
    """A keystroke, with the texts an engine may need."""

    key: Keystroke
    uri: str
    old: str  # its document before the edit
    new: str  # ... after it
    prefix: str  # the text before the cursor


def steps(trace: Trace) -> list[Step]:
    texts = [d.text for d in trace.docs]
    out = []
    for k in trace.keys:
        old = texts[k.doc]
        new = apply_edit(old, k.start, k.end, k.text)
        texts[k.doc] = new
        out.append(Step(k, trace.docs[k.doc].uri, old, new, new[: offset_of(new, k.cursor)]))
    return out


def warm_texts(trace: Trace) -> list[str]:
    """Each document's text before its first cursor (read before the clock starts)."""
    warm = []
    for i, d in enumerate(trace.docs):
        first = next((k for k in trace.keys if k.doc == i), None)
        warm.append(d.text[: offset_of(d.text, first.start)] if first else d.text)
    return warm


# -- engines in this process: one request at a time, the newest text ----------------------------


def run_sync(engine: Engine, trace: Trace, delays: list[float]) -> list[Answer]:
    times = schedule(delays)
    todo = steps(trace)
    answers: list[Answer] = []
    start = time.perf_counter()
    done = -1  # keystrokes already typed
    while done < len(todo) - 1:
        now = time.perf_counter() - start
        newest = bisect.bisect_right(times, now) - 1
        if newest <= done:
            time.sleep(times[done + 1] - now)
            continue
        done = newest
        s = todo[newest]
        sent = time.perf_counter() - start
        engine.key(s.key, s.old, s.new, s.prefix, s.uri)
        answers.append(Answer(newest, sent, time.perf_counter() - start, 1))
    return answers


# -- lsp-llm through pygls's LanguageClient -------------------------------------------------


async def open_documents(editor: StdioServer, trace: Trace, timeout: float) -> None:
    """Open every document and read it up to its first cursor (untimed)."""
    for d in trace.docs:
        editor.open(d.uri, d.text)
    for d, text in zip(trace.docs, warm_texts(trace)):
        line = text.count("\n")
        col = len(text) - (text.rfind("\n") + 1)
        await asyncio.wait_for(editor.complete(d.uri, d.text, (line, col)).future, timeout)


async def run_lsp(editor: StdioServer, trace: Trace, delays: list[float], timeout: float) -> list[Answer]:
    times = schedule(delays)
    answers: list[Answer] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    running: tuple[Request, asyncio.Task] | None = None
    tasks = []
    for i, s in enumerate(steps(trace)):
        await asyncio.sleep(max(0.0, start + times[i] - loop.time()))
        if running is not None:
            running[0].cancel()
        editor.change(s.uri, s.old, s.key.start, s.key.end, s.key.text)
        request = editor.complete(s.uri, s.new, s.key.cursor)
        answer = Answer(i, loop.time() - start, None)
        answers.append(answer)
        task = asyncio.ensure_future(_await_answer(request, answer, start))
        running = (request, task)
        tasks.append(task)
    # editors wait for the newest answer only; a cancelled request may never be answered
    try:
        await asyncio.wait_for(asyncio.shield(tasks[-1]), min(timeout, 60.0))
    except asyncio.TimeoutError:
        raise TimeoutError(f"the server did not answer the last keystroke's request in {min(timeout, 60.0):.0f} s; "
                           f"{sum(a.answered is not None for a in answers)} of {len(answers)} requests "
                           "were answered") from None
    await asyncio.wait(tasks, timeout=2.0)
    for task in tasks:
        task.cancel()
    return answers


async def _await_answer(request: Request, answer: Answer, start: float) -> None:
    try:
        result = await request.future
    except Exception:  # noqa: BLE001 - cancelled (RequestCancelled) or failed: no answer
        return
    answer.answered = asyncio.get_running_loop().time() - start
    answer.items = len(completion_items(result))


def server_counters(before: dict, after: dict) -> dict:
    """What the server's stats say about the run; None where it does not count it."""
    docs0, docs1 = before.get("documents", {}), after.get("documents", {})
    out: dict = {}
    for key in NO_DECODE_KEYS:
        have = [d for d in docs1.values() if key in d]
        out[key] = (sum(d[key] for d in have) - sum(d.get(key, 0) for d in docs0.values())) if have else None
    for key in IDLE_KEYS:
        out[key] = after[key] - before.get(key, 0) if key in after else None
    return out


def as_records(items: list) -> list[dict]:
    return [asdict(x) for x in items]

