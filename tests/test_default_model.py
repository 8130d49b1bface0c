"""Bounded exactness checks on the embedded default model (Gemma 3 270M,
sliding window 512): edits, including a rewind deeper than the window,
give logits bit-identical to a fresh evaluation, and completion items do not
depend on what was typed before."""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path

import numpy as np

from lsp_llm.engine.calibrate import SAMPLE, branches_hold, rule_holds
from lsp_llm.engine.model import Model
from lsp_llm.engine.scheduler import Engine
from lsp_llm.engine.session import Session
from lsp_llm.features.completion import Ask, answer, from_memo, next_keystrokes
from lsp_llm.text.documents import Document, Vocab

SOURCE = Path(sysconfig.get_paths()["stdlib"]) / "sched.py"


def fresh(model: Model, tokens: list[int]) -> np.ndarray:
    s = Session(model, n_ctx=2048, n_branches=1)
    try:
        s.sync(tokens)
        return s.logits
    finally:
        s.close()


def test_calibrated_rule_is_exact(gemma: Model) -> None:
    assert gemma.batch_rule.exact
    assert rule_holds(gemma, gemma.batch_rule, gemma.tokenize(SAMPLE, True))
    assert branches_hold(gemma, gemma.batch_rule, gemma.tokenize(SAMPLE, True))


def test_edits_and_a_deep_rewind_match_a_fresh_run(gemma: Model) -> None:
    text = SOURCE.read_text()
    tokens = gemma.tokenize(text.encode(), True)[:1200]
    s = Session(gemma, n_ctx=2048, n_branches=1)
    try:
        s.sync(tokens[:1100])
        typed = ""
        for ch in "    return":  # typing, a character at a time
            typed += ch
            s.sync(tokens[:1100] + gemma.tokenize(typed.encode(), False))
        assert np.array_equal(s.logits, fresh(gemma, s.tokens))
        # an edit 600 tokens back: deeper than the 512-token sliding window
        deep = tokens[:500] + gemma.tokenize(b"# edited\n", False) + tokens[500:1100]
        r = s.sync(deep)
        assert r.reused <= 500 and r.fed >= 600
        assert np.array_equal(s.logits, fresh(gemma, deep))
    finally:
        s.close()


def test_a_saved_and_restored_document_goes_on_exactly(gemma: Model) -> None:
    """Saved (an evicted document) or moved to a bigger context, a session of
    1,100 tokens, twice the sliding window, goes on exactly: from its end, a
    few tokens back, and deeper than the window (see ``Session.restore``)."""
    tokens = gemma.tokenize(SOURCE.read_text().encode(), True)[:1300]
    s = Session(gemma, n_ctx=2048, n_branches=4)
    s.sync(tokens[:1100])
    state = s.save()
    s.close()
    tail = gemma.tokenize(b"    return self._queue\n", False)
    for depth in (0, 3, 700):
        back = Session(gemma, n_ctx=2048, n_branches=4)
        try:
            assert back.restore(state) and back.tokens == tokens[:1100]
            target = tokens[: 1100 - depth] + tail
            back.sync(target)
            assert np.array_equal(back.logits, fresh(gemma, target)), depth
            back.sync(tokens[: 1300 - depth])  # and on, past the old end
            assert np.array_equal(back.logits, fresh(gemma, tokens[: 1300 - depth])), depth
        finally:
            back.close()


def test_items_do_not_depend_on_edit_history(gemma: Model) -> None:
    """Typing a line keystroke by keystroke (memo, drafts, spare and idle
    work all in play, quick asks as the server makes them) shows the items
    a fresh engine computes on the same text, in the same order; the quick
    asks leave some out (idle work finishes them), never change one."""
    lines = SOURCE.read_text().splitlines(keepends=True)
    head, line = "".join(lines[:100]), lines[100]
    indent = line[: len(line) - len(line.lstrip())]
    vocab = Vocab(lambda b: gemma.tokenize(b, add_bos=False), gemma.piece, gemma.bos,
                  lambda b: len(gemma.tokens_starting_with(b)) > 0)

    def items(engine: Engine, text: str, idle: bool = False, quick: bool | None = None) -> list:
        """The items at the end of text; with idle, a quick ask, and the
        engine then prepares the next keystrokes (as the server does) before
        this returns."""
        doc = Document("u", text, 1, vocab)
        prompt, healed = doc.prompt()
        ask = Ask("u", prompt, healed, doc.word_start(len(doc.data)) < len(doc.data), 5, 12,
                  quick=idle if quick is None else quick)
        if idle:  # the document tells the engine its prompt, as the server's do (idle plans belong to it)
            engine.update("u", prompt, doc.n_tokens, healed)

        def job() -> list:
            got = answer(engine, ask)
            incomplete.append(not got.complete)
            if idle:
                engine.prepare("u", "completion", next_keystrokes(engine, ask, got), ask.prompt)
            return got.candidates

        quick = from_memo(engine, ask) if idle else None  # what the server answers with no job, if it can
        got = engine.submit(job).result()
        if quick is not None:
            answered_from_memo.append(1)
            assert quick.candidates == got, text
        while idle and engine.preparing():  # (polling with jobs would preempt the idle work it waits for)
            time.sleep(0.05)
        return got

    answered_from_memo: list[int] = []
    incomplete: list[bool] = []
    warm, fresh_engine = (Engine(max_sessions=1, n_ctx=2048, n_branches=16, headroom=64) for _ in range(2))
    try:
        for e in (warm, fresh_engine):
            e.submit(lambda e=e: e.set_model(gemma)).result()
        typed, steps_from_memo = line.strip(), 0
        for i in range(len(typed) + 1):
            text = head + indent + typed[:i]
            got = items(warm, text, idle=True)
            steps_from_memo += warm.stats["u"].memo_steps_last
            fresh_engine.memo.clear()
            fresh_engine.submit(lambda: fresh_engine.pool.drop("u")).result()
            fresh = items(fresh_engine, text)
            want = iter((c.text, c.probability) for c in fresh)
            assert got and all((c.text, c.probability) in want for c in got), typed[:i]  # in order
            if i in (3, 7, len(typed)):  # inside a word, after a space, at the end: waitFor all
                assert items(warm, text, quick=False) == fresh, typed[:i]
        assert steps_from_memo > 0
        assert warm.memo.prepared_used > 0 and warm.idle_rows_total > 0  # idle work was done, and used
        assert answered_from_memo  # some keystrokes needed no engine job at all
        assert any(incomplete)  # quick asks left items to idle work
    finally:
        warm.stop()
        fresh_engine.stop()
