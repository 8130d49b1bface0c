"""Completion candidates: whole words, healing, determinism (tiny model for
the engine parts; the word rules are pure)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lsp_llm.engine.model import Model
from lsp_llm.engine.scheduler import Engine
from lsp_llm.features.completion import candidates, line_end, top_tokens, word_end
from lsp_llm.text.documents import Document, Vocab


@pytest.mark.parametrize(("text", "mid", "end"), [
    (b"nt(x)", True, 2),  # pri|nt( -> print
    (b"(x)", True, 0),  # the word is complete
    (b" self.x", False, 5),  # a space, then one identifier
    (b"(self", False, 1),  # one run of punctuation
    (b"):\n    ", False, 2),
    (b"abc", True, None),  # not finished yet
    (b"ab\ncd", True, 2),
])
def test_word_end(text: bytes, mid: bool, end: int | None) -> None:
    assert word_end(text, mid) == end


def test_line_end() -> None:
    assert line_end(b"x = 1\ny") == 5 and line_end(b"x = 1") is None


def test_top_tokens_renormalize_over_the_allowed_set() -> None:
    logits = np.array([0.0, 3.0, 1.0, 2.0], dtype=np.float32)
    ids, p = top_tokens(logits, 2, None)
    assert list(ids) == [1, 3] and p[0] > p[1]
    ids, p = top_tokens(logits, 5, np.array([0, 2]))
    assert list(ids) == [2, 0] and abs(p.sum() - 1.0) < 1e-9


def complete(engine: Engine, tiny: Model, text: str, line_tokens: int = 16) -> list:
    vocab = Vocab(lambda b: tiny.tokenize(b, add_bos=False), tiny.piece, tiny.bos)
    doc = Document("u", text, 1, vocab)
    prompt, healed = doc.prompt()
    mid = doc.word_start(len(doc.data)) < len(doc.data)
    return engine.submit(lambda: candidates(engine, "u", prompt, healed, mid, 5, line_tokens,
                                            threading.Event().is_set)).result()


def test_items_extend_the_typed_word_and_are_deterministic(engine: Engine, tiny: Model) -> None:
    text = "def crab(x):\n    return x + 1\n\nprint(cra"
    first = complete(engine, tiny, text)
    assert first and all(c.probability > 0 for c in first)
    assert len({c.text.strip() for c in first}) == len(first)  # no duplicates
    # the session holds the prompt only (the healed tokens are regenerated), and no branch is left
    s = engine.sessions["u"]
    target = tiny.tokenize(text.encode(), True)
    assert s.tokens == target[: len(s.tokens)] and len(s.tokens) < len(target)
    assert complete(engine, tiny, text) == first  # same text, same items


def test_line_tokens_zero_means_no_line_item(engine: Engine, tiny: Model) -> None:
    text = "def crab(x):\n    return x + 1\n\nprint("
    assert not any(c.whole_line for c in complete(engine, tiny, text, line_tokens=0))


def test_an_answer_from_the_memo_equals_the_engine_s_wherever_the_session_is(engine: Engine, tiny: Model) -> None:
    from lsp_llm.features.completion import Ask, answer, from_memo

    vocab = Vocab(lambda b: tiny.tokenize(b, add_bos=False), tiny.piece, tiny.bos)
    asks = []
    for text in ("def crab(x):\n    return x + 1\n\nprint(cra", "def crab(x):\n    return x + 1\n\nx = "):
        doc = Document("u", text, 1, vocab)
        prompt, healed = doc.prompt()
        asks.append(Ask("u", prompt, healed, doc.word_start(len(doc.data)) < len(doc.data), 5, 16))
    assert from_memo(engine, asks[0]) is None  # nothing known yet
    first = engine.submit(lambda: answer(engine, asks[0])).result()
    engine.submit(lambda: answer(engine, asks[1])).result()  # the session moves elsewhere
    quick = from_memo(engine, asks[0])
    assert quick is not None and quick.candidates == first.candidates and quick.paths == first.paths


def test_a_quick_answer_shows_only_finished_items_and_idle_work_completes_it(tiny: Model) -> None:
    """A quick ask (the server's default, ``waitFor: top``) waits for the
    first word item that shows something; the items it shows are the full
    answer's, in order; once the full ask ran, the quick one is complete."""
    from dataclasses import replace

    from lsp_llm.features.completion import Answer, Ask, answer, from_memo

    def run(e: Engine, ask: Ask) -> Answer:
        return e.submit(lambda: answer(e, ask)).result()

    vocab = Vocab(lambda b: tiny.tokenize(b, add_bos=False), tiny.piece, tiny.bos)
    saved = 0
    for text in ("def crab(x):\n    return x + 1\n\nprint(cra", "def crab(x):\n    return x + 1\n\nx = ",
                 "def crab(x):\n    return x + 1\n\ndef ", "import os\n\nos.pa"):
        doc = Document("u", text, 1, vocab)
        prompt, healed = doc.prompt()
        full = Ask("u", prompt, healed, doc.word_start(len(doc.data)) < len(doc.data), 5, 16)
        quick = replace(full, quick=True)
        engines = [Engine(max_sessions=1, n_ctx=512, n_branches=16, headroom=64) for _ in range(2)]
        try:
            for e in engines:
                e.submit(lambda e=e: e.set_model(tiny)).result()
            want = run(engines[0], full)
            e = engines[1]
            got = run(e, quick)
            saved += engines[0].stats["u"].generated_last - e.stats["u"].generated_last
            shown = iter((c.text, c.probability) for c in want.candidates)  # (a word item may equal the line)
            assert all((c.text, c.probability) in shown for c in got.candidates), \
                f"{got.candidates}\n{want.candidates}"  # in order
            assert got.candidates and got.complete == (got.candidates == want.candidates)
            # the memo now knows every step the quick answer took, and the tips its prompt's
            # logits: the same ask is answered from them, exactly as the engine did
            assert from_memo(e, quick) == got
            run(e, full)  # what idle work does for an incomplete answer
            again = run(e, quick)
            assert again.candidates == want.candidates and again.complete
            assert e.stats["u"].generated_last == 0  # all from the memo
            assert from_memo(e, quick) == again and from_memo(e, full) == want
        finally:
            for e in engines:
                e.stop()
    assert saved > 0  # quick answers decoded fewer rows
