"""The engine thread: LRU sessions, windows, coalesced background syncs,
cancellation (tiny model, real engine)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lsp_llm.engine.branches import extend
from lsp_llm.engine.greedy import GreedyMemo
from lsp_llm.engine.model import Model
from lsp_llm.engine.pool import window
from lsp_llm.engine.scheduler import Engine
from lsp_llm.engine.session import Cancelled, Session

TEXT = b"def crab(x):\n    return x + 1\n\n" * 40


def _busy(e: Engine) -> bool:
    return e.busy()


def wait_idle(e: Engine, timeout: float = 30) -> None:
    end = time.time() + timeout
    while time.time() < end:
        busy = _busy(e)  # (polling with jobs would preempt the idle work it waits for)
        if not busy and not e.submit(lambda: _busy(e)).result():
            return
        time.sleep(0.01)
    raise AssertionError("engine never went idle")


def test_window_is_stable_while_typing() -> None:
    target = list(range(1, 1001))
    fitted, start = window(target, n_ctx=256, headroom=16, has_bos=True)
    assert len(fitted) <= 240 and fitted[0] == 1 and fitted[-1] == 1000
    # typing moves the window only once per stride (a quarter of the room)
    starts = {window(target + [7] * extra, 256, 16, True)[1] for extra in range(120)}
    assert len(starts) <= 3
    assert window(target[:100], 256, 16, True) == (target[:100], 0)


def test_background_sync_brings_the_session_up_to_date(engine: Engine, tiny: Model) -> None:
    target = tiny.tokenize(TEXT, True)
    engine.update("a", target, len(target), focus=False)  # (not the focus: short feed calls)
    wait_idle(engine)
    s = engine.submit(lambda: engine.sessions["a"]).result()
    assert s.tokens == target and s.logits is not None
    st = engine.stats["a"]
    assert st.cached == len(target) and st.fed_total == len(target)
    fresh = Session(tiny, 1024, 1)  # (fed in 128-row calls)
    fresh.sync(target)
    assert np.array_equal(s.logits, fresh.logits)
    fresh.close()


def test_bursts_are_coalesced(engine: Engine, tiny: Model) -> None:
    base = tiny.tokenize(TEXT, True)
    gate = threading.Event()
    engine.submit(gate.wait)  # hold the engine busy while edits pile up
    targets = [base + tiny.tokenize(b"x" * i, False) for i in range(1, 30)]
    for tgt in targets:
        engine.update("a", tgt, len(tgt))
    gate.set()
    wait_idle(engine)
    # only the newest target was ever fed
    assert engine.stats["a"].fed_total == len(targets[-1])
    assert engine.stats["a"].syncs == 1


def test_lru_eviction_saves_and_restores_exactly(engine: Engine, tiny: Model) -> None:
    docs = {u: tiny.tokenize(TEXT[: 200 + 50 * i], True) for i, u in enumerate("abc")}
    for u, tgt in docs.items():
        engine.update(u, tgt, len(tgt), focus=u == "a")  # "b" and "c" are opened, not typed in
        wait_idle(engine)
    # max_sessions=2: "c" was read in the background by moving "b" (not the focus) to host memory
    assert list(engine.sessions) == ["a", "c"] and list(engine.saved) == ["b"]
    assert engine.stats["b"].cached == 0
    fed = engine.stats["b"].fed_total
    s = engine.submit(lambda: engine.sync("b", docs["b"])).result()  # a first visit: "c" is saved
    assert s.tokens == docs["b"] and engine.stats["b"].fed_total == fed and engine.stats["b"].restored == 1
    assert list(engine.sessions) == ["a", "b"] and list(engine.saved) == ["c"]
    engine.update("b", docs["b"], len(docs["b"]))  # the focus moves to "b"
    fed = engine.stats["a"].fed_total
    s = engine.submit(lambda: engine.sync("c", docs["c"])).result()  # "a" goes now
    assert list(engine.sessions) == ["b", "c"] and list(engine.saved) == ["a"]
    s = engine.submit(lambda: engine.sync("a", docs["a"])).result()
    # coming back restores the saved sequence: nothing is re-fed, and it is exact
    assert s.tokens == docs["a"] and engine.stats["a"].fed_total == fed and engine.stats["a"].restored == 1
    assert list(engine.sessions) == ["b", "a"] and list(engine.saved) == ["c"]  # (the focus stays)
    more = docs["a"] + tiny.tokenize(b"x = crab(2)", False)
    s = engine.submit(lambda: engine.sync("a", more)).result()
    fresh = Session(tiny, 1024, 1)
    fresh.sync(more)
    assert np.array_equal(s.logits, fresh.logits)
    # an edit deeper than the sliding window after a restore feeds only what follows it, exactly
    edited = more[:20] + tiny.tokenize(b"crab", False) + more[20:]
    fed = engine.stats["a"].fed_total
    s = engine.submit(lambda: engine.sync("a", edited)).result()
    assert engine.stats["a"].fed_total - fed == len(edited) - 20
    fresh.sync(edited)
    assert np.array_equal(s.logits, fresh.logits)
    fresh.close()
    more = edited
    # switching between live documents re-evaluates nothing
    before = {u: engine.stats[u].fed_total for u in "ba"}
    for u in "bababa":
        engine.submit(lambda u=u: engine.sync(u, docs[u] if u == "b" else more)).result()
    assert {u: engine.stats[u].fed_total for u in "ba"} == before


def test_without_a_budget_an_evicted_document_is_read_again(tiny: Model) -> None:
    e = Engine(max_sessions=1, n_ctx=1024, n_branches=2, headroom=8, saved_mb=0)
    try:
        e.submit(lambda: e.set_model(tiny)).result()
        a, b = tiny.tokenize(TEXT[:200], True), tiny.tokenize(TEXT[:300], True)
        for u, tgt in (("a", a), ("b", b), ("a", a)):
            e.submit(lambda u=u, tgt=tgt: e.sync(u, tgt)).result()
        assert not e.saved and e.stats["a"].fed_total == 2 * len(a)
    finally:
        e.stop()


def test_background_syncs_serve_the_focus_first_and_never_evict_it(engine: Engine, tiny: Model) -> None:
    gate = threading.Event()
    engine.submit(gate.wait)  # edits pile up while the engine is busy
    docs = {u: tiny.tokenize(TEXT[: 100 + 30 * i], True) for i, u in enumerate("abcd")}
    engine.update("typed", tiny.tokenize(TEXT[:150], True), 0)  # the user types here...
    for u, tgt in docs.items():
        engine.update(u, tgt, len(tgt), focus=False)  # ...while files open in the background
    gate.set()
    wait_idle(engine)
    assert "typed" in engine.sessions  # served first, and not evicted by the others
    assert engine.stats["typed"].syncs == 1 and len(engine.sessions) == 2


def test_cancel_stops_between_decode_calls(engine: Engine, tiny: Model) -> None:
    target = tiny.tokenize(TEXT * 3, True)[:500]
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        engine.submit(lambda: engine.sync("a", target, stop)).result()
    s = engine.sessions["a"]
    assert 0 < len(s.tokens) < len(target)
    # the session stays consistent: finishing later is exact
    engine.submit(lambda: engine.sync("a", target)).result()
    fresh = Session(tiny, 512, 1)
    fresh.sync(target)
    assert np.array_equal(s.logits, fresh.logits)
    fresh.close()


def test_stop_fails_pending_jobs(tiny: Model) -> None:
    e = Engine(max_sessions=1, n_ctx=256, n_branches=2, headroom=8)
    gate = threading.Event()
    e.submit(gate.wait)
    pending = e.submit(lambda: 1)
    threading.Timer(0.1, gate.set).start()
    e.stop()
    assert not e.alive
    with pytest.raises(RuntimeError):
        pending.result(timeout=5)


def test_a_feed_probes_the_likely_next_tokens(engine: Engine, tiny: Model) -> None:
    prompt = tiny.tokenize(TEXT, True)[:200]

    def steps() -> tuple[int, int]:
        s = engine.sync("u", prompt)
        (path,), _ = extend(s, [int(np.argmax(s.logits))], lambda i, t: False, [4], memo=engine.memo)
        s = engine.sync("u", prompt + path[:1])  # you typed the first predicted token
        assert engine.stats["u"].probed_last > 1
        second = engine.memo.top(GreedyMemo.prefix(s.tokens).digest())[1]  # not on the path
        _, decoded = extend(s, [second], lambda i, t: False, [2], memo=engine.memo)
        return second, decoded

    second, decoded = engine.submit(steps).result()
    assert decoded == 0  # its next step came with the feed


def test_a_job_its_request_cancelled_leaves_the_engine_serving(engine: Engine) -> None:
    gate = threading.Event()
    engine.submit(gate.wait)
    cancel = threading.Event()
    fut = engine.submit(lambda: 1, cancel)
    fut.cancel()  # what asyncio.wrap_future does when the client cancels
    cancel.set()
    gate.set()
    assert engine.submit(lambda: 2).result(timeout=10) == 2 and engine.alive
