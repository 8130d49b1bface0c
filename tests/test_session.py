"""Exactness: after any sequence of edits the session's logits are
bit-identical to a fresh evaluation of the same text (tiny model)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp as llama
import numpy as np
import pytest
import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from lsp_llm.engine.calibrate import calibrate
from lsp_llm.engine.model import BatchRule, Model
from lsp_llm.engine.session import Session, common_prefix

BASE = (
    "def walk(crab, steps):\n    for i in range(steps):\n        crab.x += 1\n"
    "    return crab\n\nclass Crab:\n    x = 0\n"
) * 3


def fresh_logits(model: Model, tokens: list[int]) -> np.ndarray:
    s = Session(model, n_ctx=4096, n_branches=2)
    try:
        s.sync(tokens)
        assert s.logits is not None
        return s.logits
    finally:
        s.close()


def test_plan_keeps_every_call_canonical() -> None:
    rule = BatchRule(4, 8)
    for n in range(1, 600):
        sizes = rule.plan(n, 128)
        assert sum(sizes) == n
        for size in sizes[:-1]:
            assert size % 4 == 0 and size >= 8 and size <= 128
        assert rule.padded(sizes[-1]) <= 128


def test_base_is_deeper_than_the_sliding_window(tiny: Model) -> None:
    assert len(tiny.tokenize(BASE.encode(), True)) > 4 * tiny_model.SLIDING_WINDOW


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_logits_after_random_edits_equal_a_fresh_run(tiny: Model, data: st.DataObject) -> None:
    s = Session(tiny, n_ctx=1024, n_branches=2)
    try:
        text = BASE
        for _ in range(data.draw(st.integers(1, 5), "n_edits")):
            a = data.draw(st.integers(0, len(text)), "start")
            b = data.draw(st.integers(a, min(len(text), a + 30)), "end")
            ins = data.draw(st.text(st.sampled_from(list("crab x.()=\n ")), max_size=12), "insert")
            text = text[:a] + ins + text[b:]
            cursor = data.draw(st.integers(0, len(text)), "cursor")
            target = tiny.tokenize(text[:cursor].encode(), True)
            before = list(s.tokens)
            result = s.sync(target)
            assert s.tokens == target
            # only the tail after the common prefix is fed (less one token when the
            # target is a strict prefix: its last token is re-fed for its logits)
            keep = common_prefix(before, target)
            assert result.reused + result.fed == len(target)
            if before and target != before:
                assert result.reused in (keep, keep - 1)
            assert np.array_equal(s.logits, fresh_logits(tiny, target))
    finally:
        s.close()


def test_rewind_deeper_than_the_window_is_exact(tiny: Model) -> None:
    target = tiny.tokenize(BASE.encode(), True)
    s = Session(tiny, n_ctx=1024, n_branches=2)
    try:
        s.sync(target)
        depth = 5 * tiny_model.SLIDING_WINDOW
        edited = target[: len(target) - depth] + tiny.tokenize(b" crab", False) + target[len(target) - depth:]
        r = s.sync(edited)
        assert r.reused == len(target) - depth
        assert np.array_equal(s.logits, fresh_logits(tiny, edited))
        s.sync(target)  # and back
        assert np.array_equal(s.logits, fresh_logits(tiny, target))
    finally:
        s.close()


def test_one_token_append_feeds_one_token(tiny: Model) -> None:
    target = tiny.tokenize(BASE.encode(), True)
    s = Session(tiny, n_ctx=1024, n_branches=2)
    try:
        s.sync(target[:-1])
        r = s.sync(target)
        assert (r.reused, r.fed) == (len(target) - 1, 1)
        r = s.sync(target[:-1])  # backspace to a remembered tip: no decode
        assert (r.reused, r.fed) == (len(target) - 1, 0)
        assert np.array_equal(s.logits, fresh_logits(tiny, target[:-1]))
        r = s.sync(target[:-2])  # deeper: the last token is re-fed for its logits
        assert (r.reused, r.fed) == (len(target) - 3, 1)
    finally:
        s.close()


def test_never_rewinds_past_bos(tiny: Model) -> None:
    target = tiny.tokenize(BASE.encode(), True)
    s = Session(tiny, n_ctx=1024, n_branches=2)
    try:
        s.sync(target)
        r = s.sync(target[:1])  # empty document: only BOS
        assert s.tokens == [tiny.bos] and (r.reused, r.fed) == (1, 0)
        assert np.array_equal(s.logits, fresh_logits(tiny, target[:1]))
    finally:
        s.close()


def test_a_first_read_opens_one_context_and_feeds_bos_with_the_text(tiny: Model) -> None:
    """A first read costs its text's decode calls only: the context opens at
    the document's size (not a guess it replaces), and BOS rides in the first
    call, its logits those of BOS alone (the model keeps them)."""
    target = tiny.tokenize(BASE.encode(), True)
    warm = Session(tiny, n_ctx=1024, n_branches=2)
    warm.sync(target[:3])  # the model knows BOS's logits from here on
    warm.close()
    opened: list[int] = []
    new_context = tiny.new_context
    tiny.new_context = lambda cells, n_seq: opened.append(cells) or new_context(cells, n_seq)  # type: ignore[method-assign]
    s = Session(tiny, n_ctx=2048, n_branches=2)
    try:
        rows = Session.decoded_rows
        s.sync(target, doc_tokens=900)
        assert opened == [1536]  # one context, for 900 tokens and room to grow
        rule = tiny.batch_rule
        assert Session.decoded_rows - rows == sum(rule.padded(n) for n in rule.plan(len(target), s.rows))
        r = s.sync(target[:1])  # an empty document: served from the remembered BOS logits
        assert (r.reused, r.fed) == (1, 0)
        assert np.array_equal(s.logits, fresh_logits(tiny, target[:1]))
    finally:
        del tiny.new_context
        s.close()


def test_a_model_knows_bos_logits_once_loaded(tiny_model_path: Path, tmp_path: Path) -> None:
    """So that the first read after a load (a first visit) saves its call too,
    whether the batch rule was measured or cached."""
    for _ in ("measured", "cached"):
        model = Model(tiny_model_path, threads=2)
        try:
            calibrate(model, tmp_path)
            assert np.array_equal(model.bos_logits[model.batch_rule], fresh_logits(model, [model.bos]))
        finally:
            model.close()


def test_sync_rejects_targets_longer_than_the_context(tiny: Model) -> None:
    s = Session(tiny, n_ctx=64, n_branches=1)
    try:
        with pytest.raises(ValueError):
            s.sync([tiny.bos] * 65)
    finally:
        s.close()



@pytest.mark.parametrize("probes", [1, 3])  # with and without padding rows left over
def test_probes_in_the_padding_learn_the_next_step_exactly(tiny: Model, probes: int) -> None:
    target = tiny.tokenize(BASE.encode(), True)
    s = Session(tiny, n_ctx=1024, n_branches=4)
    try:
        s.sync(target[:-1])
        probe = [int(t) for t in np.argsort(-fresh_logits(tiny, target))[:probes]]
        r = s.sync(target, probe=probe)  # one token to feed: padding rows are free
        assert r.fed == 1 and set(r.probed) == set(probe)
        assert np.array_equal(s.logits, fresh_logits(tiny, target))  # the document is unaffected
        for tok, best in r.probed.items():
            after = fresh_logits(tiny, target + [tok])
            assert best[0] == int(np.argmax(after)) and len(best) > 1
            assert all(after[a] >= after[b] for a, b in zip(best, best[1:]))
        # probe rows leave no cells behind
        assert all(llama.llama_memory_seq_pos_max(s.mem, q) == -1 for q in range(1, 5))
        assert llama.llama_memory_seq_pos_max(s.mem, 0) == len(target) - 1
    finally:
        s.close()


def test_an_interrupted_call_leaves_no_cells_and_the_session_exact(tiny: Model) -> None:
    from lsp_llm.engine.branches import extend
    from lsp_llm.engine.session import Cancelled

    target = tiny.tokenize(BASE.encode(), True)
    s = Session(tiny, n_ctx=1024, n_branches=4)
    asked = []

    def midway() -> bool:  # llama.cpp asks between graph nodes: stop in the middle of the call
        asked.append(1)
        return len(asked) > 20

    try:
        s.sync(target[:-40])
        s.interrupt = midway
        with pytest.raises(Cancelled):
            s.sync(target)  # a feed, stopped inside its call
        asked.clear()
        with pytest.raises(Cancelled):
            extend(s, [int(np.argmax(s.logits))] * 1 + [5, 6], lambda i, t: False, [6, 6, 6])
        s.interrupt = None
        assert s.tokens == target[:-40]
        assert llama.llama_memory_seq_pos_max(s.mem, 0) == len(target) - 41  # nothing past the document
        assert all(llama.llama_memory_seq_pos_max(s.mem, q) == -1 for q in range(1, 5))
        s.sync(target)
        assert np.array_equal(s.logits, fresh_logits(tiny, target))
    finally:
        s.interrupt = None
        s.close()


@pytest.mark.parametrize("depth", [0, 1, 2, 5, tiny_model.SLIDING_WINDOW + 3, 100])
def test_a_restored_session_rewinds_exactly(tiny: Model, depth: int) -> None:
    """llama.cpp saves a sequence without the cells its sliding-window
    layers no longer attend to; a rewind of two tokens or more needs them
    (see ``Session.restore``)."""
    doc = tiny.tokenize(BASE.encode(), True)
    tail = tiny.tokenize(b"crab.x = walk(crab, 3)\n", False)
    s, back = Session(tiny, n_ctx=1024, n_branches=2), Session(tiny, n_ctx=1024, n_branches=2)
    try:
        s.sync(doc)
        assert back.restore(s.save()) and back.tokens == doc
        target = doc[: len(doc) - depth] + tail
        back.sync(target)
        assert np.array_equal(back.logits, fresh_logits(tiny, target))
        back.sync(doc[:40] + tail)  # and deeper still, from there
        assert np.array_equal(back.logits, fresh_logits(tiny, doc[:40] + tail))
    finally:
        s.close()
        back.close()


def test_a_context_sized_to_its_document_grows_exactly(tiny: Model) -> None:
    """A context starts at the document's size and grows as the text before
    the cursor does (the sequence moves to a bigger context, see
    ``Session._resize``); logits stay those of a fresh run."""
    from lsp_llm.engine.session import GROW_CELLS

    doc = tiny.tokenize((BASE * 20).encode(), True)
    assert len(doc) > 2 * GROW_CELLS
    s = Session(tiny, n_ctx=4096, n_branches=2)
    try:
        s.sync(doc[:300], doc_tokens=300)
        assert s.cells == 2 * GROW_CELLS
        for n in (600, 2 * GROW_CELLS + 40, len(doc)):  # each one grows the context
            before = s.cells
            s.sync(doc[:n])
            assert s.cells > before and s.cells >= n + GROW_CELLS
            assert np.array_equal(s.logits, fresh_logits(tiny, doc[:n]))
        edited = doc[:50] + tiny.tokenize(b"crab", False)  # a deep edit after the moves
        s.sync(edited)
        assert np.array_equal(s.logits, fresh_logits(tiny, edited))
        other = doc[:1] + tiny.tokenize(b"class Crab:\n", False)
        s.sync(other, doc_tokens=len(other))  # a fresh read fits the context to the document again
        assert s.cells == 2 * GROW_CELLS and np.array_equal(s.logits, fresh_logits(tiny, other))
    finally:
        s.close()


@pytest.mark.parametrize("n", [293, 300, 301, 302])
def test_a_restored_session_goes_on_exactly_whatever_its_length(tiny: Model, n: int) -> None:
    """Restored cells must sit where a fresh run has them: llama.cpp's sums
    over cells group them by SIMD lanes (restored as a sequence, the
    sliding-window cells shifted to cell 0 gave other logits 100 or 300
    tokens later at 293, 301 and 302 tokens)."""
    doc = tiny.tokenize((BASE * 8).encode(), True)
    s, back = Session(tiny, n_ctx=4096, n_branches=2), Session(tiny, n_ctx=4096, n_branches=2)
    try:
        s.sync(doc[:n])
        assert back.restore(s.save()) and back.tokens == doc[:n]
        for more in (10, 100, 300):
            back.sync(doc[: n + more])
            assert np.array_equal(back.logits, fresh_logits(tiny, doc[: n + more]))
    finally:
        s.close()
        back.close()
