"""What the engine runs next (``lsp_llm.engine.scheduler``), on the real
engine: the document the user types in goes first and other reads yield to
it within a call; idle plans belong to the prompt they were made for; a FIM
feed yields to a popup request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from test_engine import TEXT, wait_idle
from test_trust import Pipe, completion_at, did_open

from lsp_llm.engine.model import Model
from lsp_llm.engine.pool import PROGRESS_MIN_TOKENS
from lsp_llm.engine.scheduler import CALL_ROWS, Engine, Rank
from lsp_llm.engine.session import ShouldStop
from lsp_llm.tools.client import server_command


def test_the_focus_is_read_first_and_other_reads_yield_to_it_within_a_call(tiny: Model) -> None:
    e = Engine(max_sessions=8, n_ctx=1024, n_branches=2, headroom=8)
    try:
        e.submit(lambda: e.set_model(tiny)).result()
        calls: list[str] = []  # the document of each feed call of a long read, in order
        fed: dict[str, list[int]] = {}  # tokens fed so far, after each call, by document
        e.on_progress = lambda uri, done, total: (calls.append(uri), fed.setdefault(uri, []).append(done)) \
            if done > 0 else None
        text = tiny.tokenize(TEXT, True)  # over 512 tokens: a read of several calls, with progress
        assert len(text) > PROGRESS_MIN_TOKENS
        for i in range(7):  # an editor restores its tabs
            e.update(f"tab{i}", text[: len(text) - i], len(text), focus=False)
        while not calls:  # one of them is being read
            time.sleep(0.0005)
        before = len(calls)
        e.update("typed", text[: len(text) - 9], len(text))  # the user types in another one
        wait_idle(e)
        first = calls.index("typed")
        between = calls[before:first]
        assert set(between) <= {calls[0]}, f"another read went before the focus: {calls[:first + 1]}"
        assert len(between) <= 2, f"the running read went on for {len(between)} calls: {calls}"
        assert {f"tab{i}" for i in range(7)} <= set(calls[first:]) | set(calls[:first])  # all read, later
        tabs = [b - a for uri, done in fed.items() if uri != "typed" for a, b in zip([0, *done], done)]
        assert max(tabs) <= CALL_ROWS[Rank.READ], f"a read call of {max(tabs)} rows: the focus would wait for it"
    finally:
        e.stop()


def test_a_request_sent_with_the_opens_waits_for_no_other_read(tiny: Model) -> None:
    e = Engine(max_sessions=8, n_ctx=1024, n_branches=2, headroom=8)
    try:
        e.submit(lambda: e.set_model(tiny)).result()
        e.read_settle_s = 1.0  # (50 ms by default) wider than the gap below on a loaded machine
        calls: list[str] = []
        e.on_progress = lambda uri, done, total: calls.append(uri) if done > 0 else None
        text = tiny.tokenize(TEXT, True)
        for i in range(7):  # the opens of a tab restore, and a request, in one burst
            e.update(f"tab{i}", text[: len(text) - i], len(text), focus=False)
        time.sleep(0.1)  # the server parses the request
        e.update("typed", text[: len(text) - 9], len(text))
        wait_idle(e)
        assert calls[0] == "typed", f"a read started before the request's document: {calls[:3]}"
        assert {f"tab{i}" for i in range(7)} <= set(calls)  # the others read after it
    finally:
        e.stop()


def test_an_idle_plan_belongs_to_the_prompt_it_was_made_for(engine: Engine, tiny: Model) -> None:
    prompt = tiny.tokenize(b"def crab(x):\n    return", True)
    newer = tiny.tokenize(b"def crab(x):\n    return x", True)
    ran = threading.Event()

    def task(should_stop: ShouldStop) -> None:
        ran.set()

    engine.update("u", newer, len(newer))  # the user typed on while the request ran
    engine.prepare("u", "completion", [task], prompt)  # its plan: for the old prompt
    assert not engine.preparing()
    wait_idle(engine)
    assert not ran.is_set()
    engine.prepare("u", "completion", [task], newer)  # a plan for the prompt the document has
    assert ran.wait(30)


def test_the_waiting_rank_orders_work(engine: Engine, tiny: Model) -> None:
    gate, held = threading.Event(), threading.Event()
    engine.submit(lambda: (held.set(), gate.wait(30)))  # hold the engine while work piles up
    try:
        assert held.wait(30)
        text = tiny.tokenize(TEXT, True)
        engine.update("a", text, len(text), focus=False)
        assert engine._waiting == Rank.READ
        engine.update("b", text[:-3], len(text))
        assert engine._waiting == Rank.FOCUS
        engine.submit(lambda: None)
        assert engine._waiting == Rank.JOB
    finally:
        gate.set()
    wait_idle(engine)
    assert engine._waiting == Rank.NOTHING and engine.state("a").value == "live"


def test_a_fim_feed_yields_to_a_popup_request(tiny_fim_model_path: Path) -> None:
    p = Pipe(command=server_command(str(tiny_fim_model_path)))
    try:
        uri = "file:///tmp/fim.py"
        text = TEXT.decode() * 3  # the FIM prompt puts the suffix first: a new line re-feeds the prefix
        line = text.count("\n") // 2
        p.frames(did_open(uri, text))
        p.ask("textDocument/completion", completion_at(uri, line, 4))  # the document is read
        inline = p.request("textDocument/inlineCompletion", {**completion_at(uri, line, 4),
                                                              "context": {"triggerKind": 2}})
        popup = p.request("textDocument/completion", completion_at(uri, line + 2, 4))
        p.frames(inline, popup)
        p.answer(popup["id"])
        fim = p.ask("workspace/executeCommand", {"command": "lsp-llm.stats"})["result"]["documents"][uri + "#fim"]
        # the FIM prompt is the whole text (about 860 tokens): its feed stopped early for the popup
        assert fim["cached"] < len(text) // 8, fim
    finally:
        p.close()
