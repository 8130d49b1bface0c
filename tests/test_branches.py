"""Completion branches on the tiny model: they leave the document as it was,
follow the greedy path exactly, and the memo and drafts only skip work."""

from __future__ import annotations

from collections.abc import Iterator

import llama_cpp as llama
import numpy as np
import pytest
from test_session import BASE, fresh_logits

from lsp_llm.engine.branches import DraftIndex, Spare, extend
from lsp_llm.engine.greedy import GreedyMemo
from lsp_llm.engine.model import Model
from lsp_llm.engine.session import Session


def long_text(i: int, text: bytes) -> bool:
    return len(text) > 12


def never(i: int, text: bytes) -> bool:
    return False


@pytest.fixture
def doc(tiny: Model) -> Iterator[Session]:
    s = Session(tiny, n_ctx=1024, n_branches=4)
    s.sync(tiny.tokenize(BASE.encode(), True))
    yield s
    s.close()


def top(s: Session, k: int) -> list[int]:
    return [int(t) for t in np.argsort(-s.logits)[:k]]


def test_branches_leave_the_document_as_it_was(tiny: Model, doc: Session) -> None:
    target, before = list(doc.tokens), doc.logits.copy()
    firsts = top(doc, 4)
    first, n1 = extend(doc, firsts, long_text, [6] * 4)
    again, n2 = extend(doc, firsts, long_text, [6] * 4)
    assert first == again and n1 == n2 > 0  # deterministic
    assert doc.tokens == target and np.array_equal(doc.logits, before)
    # no branch cell is left: the document's next cells follow its last one
    assert all(llama.llama_memory_seq_pos_max(doc.mem, i) == -1 for i in range(1, 5))
    # the next token after the document is computed as if no branch existed
    doc.sync(target + [firsts[0]])
    assert np.array_equal(doc.logits, fresh_logits(tiny, target + [firsts[0]]))


def test_every_branch_step_is_the_greedy_step_of_a_fresh_run(tiny: Model, doc: Session) -> None:
    target = list(doc.tokens)
    paths, _ = extend(doc, top(doc, 3), long_text, [6] * 3)
    for path in paths:
        for j in range(1, len(path)):
            assert int(np.argmax(fresh_logits(tiny, target + path[:j]))) == path[j]


def test_the_memo_skips_known_steps_and_changes_nothing(doc: Session) -> None:
    firsts, memo = top(doc, 4), GreedyMemo()
    plain, decoded = extend(doc, firsts, never, [6] * 4, drafts=False)
    cold, cold_decoded = extend(doc, firsts, never, [6] * 4, memo=memo, drafts=False)
    warm, warm_decoded = extend(doc, firsts, never, [6] * 4, memo=memo, drafts=False)
    assert plain == cold == warm
    assert cold_decoded == decoded > 0 and warm_decoded == 0 and memo.hits > 0
    # a later prompt that typed part of a path walks the rest from the memo
    path = cold[0]
    doc.sync(doc.tokens + path[:2])
    rest, walked = extend(doc, [path[2]], never, [4], memo=memo, drafts=False)
    assert rest == [path[2:]] and walked == 0


def test_drafts_change_nothing(doc: Session) -> None:
    firsts = top(doc, 2)
    assert extend(doc, firsts, long_text, [10, 4], drafts=True)[0] == extend(doc, firsts, long_text, [10, 4],
                                                                                drafts=False)[0]


def test_draft_index_finds_what_followed_the_last_tokens() -> None:
    index = DraftIndex([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 8, 3, 1])
    assert index.draft([8, 2, 3], 2) == [5, 6]  # the last occurrence of the pair wins
    assert index.draft([4, 9], 9) == [2, 3, 5, 6, 7, 8, 3, 1]
    assert index.draft([0, 3], 3) == [1]  # no such pair: the last occurrence of the token
    assert index.draft([6, 1], 2) == [2, 3]
    assert index.draft([5, 0], 3) == []  # never seen
    assert index.draft([7, 1], 3) == [2, 3, 4]  # the document's own end has no follower
    assert index.draft([2, 3], 0) == [] and index.draft([], 3) == []


def test_branches_stop_when_the_context_is_full(tiny: Model) -> None:
    s = Session(tiny, n_ctx=256, n_branches=4)  # llama.cpp rounds contexts up to 256 cells
    try:
        target = tiny.tokenize((BASE * 3).encode(), True)[:240]
        s.sync(target)
        paths, decoded = extend(s, top(s, 4), never, [20] * 4, memo=GreedyMemo())
        assert decoded > 0 and all(1 <= len(p) < 20 for p in paths)
        assert s.tokens == target and np.array_equal(s.logits, fresh_logits(tiny, target))
    finally:
        s.close()


def test_items_near_a_full_context_do_not_depend_on_spare_work_or_the_memo(tiny: Model) -> None:
    s = Session(tiny, n_ctx=256, n_branches=8)  # llama.cpp rounds contexts up to 256 cells
    try:
        s.sync(tiny.tokenize((BASE * 3).encode(), True)[:216])
        firsts, extra = top(s, 8)[:3], top(s, 8)[3:]
        plain, _ = extend(s, firsts, never, [20] * 3, drafts=False)
        memo, spare = GreedyMemo(), Spare(extra, lambda text: False, 20)
        cold, _ = extend(s, firsts, never, [20] * 3, memo=memo, spare=spare)
        warm, _ = extend(s, firsts, never, [20] * 3, memo=memo, spare=spare)  # steps from the memo
        assert plain == cold == warm
        assert all(1 < len(p) < 20 for p in plain)  # the context, not the limit, stopped them
        assert all(llama.llama_memory_seq_pos_max(s.mem, i) == -1 for i in range(1, 9))
    finally:
        s.close()
