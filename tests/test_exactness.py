"""Branch-step exactness at the logit level (issue 17).

``branches.extend`` grows completion branches as extra sequences in the
document's context, several branches, drafts and spare rows per padded
decode call. Where a branch's cells land depends on how many rows shared the
earlier calls (the other branches, the drafts, the spare work, what the memo
skipped): on history. The claim (ARCHITECTURE, Exactness and Determinism) is
that every branch step's logits are nevertheless those of a fresh evaluation
of the same tokens, bit for bit.

Here the same document and path are grown on branch 0 alone, then beside 5
other branches with drafts and spare work (and, on the tiny model, once more
after a shorter run primed the memo), for every document length modulo 16 (so
the branch's cells start at every offset modulo 16), and every step's logits
are compared with ``np.array_equal`` against (a) the branch grown alone and
(b) a fresh session fed document + path.

What this found on this CPU (AVX2, llama.cpp's CPU kernels), by default (no
flash attention): branch 0 grown alone is exact at every offset. Beside other
branches a step may differ: with the default model from step 3-5 on at
offsets 0, 3 and 8, with the tiny model rarely (offset 8 after a warmed memo;
a neighbour at offset 11). The cases that fail are marked
``xfail(strict=True)``. Two causes (ARCHITECTURE, *Not exact by default*):
the softmax sums 8-cell SIMD blocks and the values accumulate in lanes by
cell index, so the same rows in other cells round differently (replaying the
failing tiny case with the neighbours' rows replaced by filler rows of
another sequence, same cells, still differs; with the neighbours gone it does
not); and the rows that want logits run the last layer alone, whose matrix
products take another kernel path from 8 rows on (default model: a row's
logits with 8-16 outputs in its call differ from with 1-7 at one document
length of 26 tried).

With ``exactItems`` (flash attention in calls under 64 rows, whose kernel
visits a row's cells one at a time in cell order; at most 7 logits rows a
branch call; plans that keep each sequence's cells in position order) every
case passes: the sweeps below with no marks, and random histories with every
row compared. ``plans_checked`` checks the order rule as plans are made.
"""

from __future__ import annotations

import json
import random
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_session import BASE

from lsp_llm.config import Settings
from lsp_llm.engine import branches
from lsp_llm.engine.branches import Spare, extend
from lsp_llm.engine.greedy import GreedyMemo
from lsp_llm.engine.model import FLASH_ROWS, OUTPUT_ROWS, Model
from lsp_llm.engine.session import Session
from lsp_llm.lsp import lifecycle

PATH = 12  # tokens of branch 0's path
LIMITS = [PATH, 3, 7, 5, 9, 2]  # branch 0 and 5 neighbours that finish at different steps
SPARE = 4  # spare first tokens, grown in the rows still free
TEXT = BASE * 2

Steps = dict[tuple[int, tuple[int, ...]], np.ndarray]  # (branch, its tokens) -> logits after them

REASON = ("issue 17: beside other branches a branch step rounds differently from a fresh evaluation "
          "(where its cells land and what shares its calls; see the module docstring)")
# measured on this machine: (model, offset) whose branch-0 steps beside the neighbours differ
FAILS_BRANCH0: dict[str, set[int]] = {"tiny": {8}, "gemma": {0, 3, 8}}
# (model, offset) where some row of the busy runs (branch 0, a neighbour, a draft, spare work) differs
FAILS_ANY: dict[str, set[int]] = {"tiny": {8, 11}}


def never(i: int, text: bytes) -> bool:
    return False


class Recorder:
    """Wraps ``branches.decode_rows`` (the real one runs): the logits of
    every row that wants them, keyed by the branch and the tokens it holds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = branches.decode_rows
        self.steps: Steps = {}
        self._tokens: dict[int, dict[int, int]] = {}
        monkeypatch.setattr(branches, "decode_rows", self)

    def __call__(self, session: Session, rows: list[branches.Row], n: int,
                 read: Callable[[branches.Row, np.ndarray], Any], step: int, *args: Any) -> dict:
        for row in rows:  # a branch's rows in one call follow what it holds
            self._tokens.setdefault(row.branch, {})[row.index] = row.token

        def keep(row: branches.Row, logits: np.ndarray) -> Any:
            i, j = row.branch, row.index
            self.steps[(i, tuple(self._tokens[i][m] for m in range(j + 1)))] = logits.copy()
            return read(row, logits)

        return self.real(session, rows, n, keep, step, *args)

    def grow(self, session: Session, firsts: Sequence[int], limits: Sequence[int],
             **kw: Any) -> tuple[list[list[int]], Steps]:
        self.steps, self._tokens = {}, {}
        paths, _ = extend(session, firsts, never, limits, **kw)
        return paths, self.steps


class Fresh:
    """Logits after doc + path as a fresh run has them: one session that
    rewinds and feeds, its cells laid out from 0 in position order (the
    session invariant, tested in test_session; checked once more here
    against a brand-new session)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.session = Session(model, n_ctx=1024, n_branches=1)
        self.cache: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, tokens: Sequence[int]) -> np.ndarray:
        key = tuple(tokens)
        if key not in self.cache:
            self.session.sync(list(tokens))
            assert self.session.logits is not None
            self.cache[key] = self.session.logits.copy()
        return self.cache[key]

    def new_session(self, tokens: Sequence[int]) -> np.ndarray:
        s = Session(self.model, n_ctx=1024, n_branches=1)
        try:
            s.sync(list(tokens))
            assert s.logits is not None
            return s.logits.copy()
        finally:
            s.close()


def document(model: Model, offset: int, base: int) -> list[int]:
    """The tokens of a document whose length is ``offset`` modulo 16 (at
    least ``base``): branch cells start right after it."""
    tokens = model.tokenize(TEXT.encode(), True)
    return tokens[: base + (offset - base) % 16]


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max())


def branch0_report(doc: list[int], alone: list[int], alone_steps: Steps, paths: list[list[int]],
                   steps: Steps, fresh: Fresh) -> list[str]:
    """Where branch 0's steps beside the neighbours differ from alone and fresh."""
    bad = []
    if paths[0] != alone:
        bad.append(f"path beside {paths[0]} != alone {alone}")
    for j in range(1, len(alone) + 1):
        key = (0, tuple(alone[:j]))
        want = fresh(doc + alone[:j])
        if key in alone_steps and not np.array_equal(alone_steps[key], want):
            bad.append(f"alone step {j} != fresh (by {differ(alone_steps[key], want):.3g})")
        if key in steps:
            if not np.array_equal(steps[key], alone_steps[key]):
                bad.append(f"beside step {j} != alone (by {differ(steps[key], alone_steps[key]):.3g})")
            if not np.array_equal(steps[key], want):
                bad.append(f"beside step {j} != fresh (by {differ(steps[key], want):.3g})")
    return bad


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    return Recorder(monkeypatch)


def fresh_of(model: Model) -> Iterator[Fresh]:
    f = Fresh(model)
    yield f
    f.session.close()


@pytest.fixture(scope="module")
def tiny_fresh(tiny: Model) -> Iterator[Fresh]:
    yield from fresh_of(tiny)


@pytest.fixture(scope="module")
def gemma_fresh(gemma: Model) -> Iterator[Fresh]:
    yield from fresh_of(gemma)


def sweep(model: Model, fresh: Fresh, recorder: Recorder, offset: int, base: int,
          warm: bool, neighbours: bool) -> tuple[list[str], list[str]]:
    """Branch 0 alone, then beside 5 branches, drafts and spare work (and,
    with ``warm``, again after a shorter run primed the memo). Returns what
    differs on branch 0, and (with ``neighbours``) which other rows differ
    from a fresh run."""
    doc = document(model, offset, base)
    s = Session(model, n_ctx=1024, n_branches=16)
    try:
        s.sync(doc)
        assert s.logits is not None
        top = [int(t) for t in np.argsort(-s.logits, kind="stable")[: len(LIMITS) + SPARE]]
        (alone,), alone_steps = recorder.grow(s, top[:1], [PATH], drafts=False)
        assert len(alone) == PATH and len(alone_steps) == PATH - 1  # one row a step, every step decoded
        assert np.array_equal(alone_steps[(0, tuple(alone[:-1]))], fresh.new_session(doc + alone[:-1]))
        spare = Spare(top[len(LIMITS):], lambda text: False, 10)
        histories = [("beside", recorder.grow(s, top[: len(LIMITS)], LIMITS, memo=GreedyMemo(), spare=spare))]
        if warm:
            memo = GreedyMemo()
            recorder.grow(s, top[: len(LIMITS)], [4, 2, 3, 2, 5, 1], memo=memo)  # knows the first steps
            histories.append(("warm memo", recorder.grow(s, top[: len(LIMITS)], LIMITS, memo=memo, spare=spare)))
        bad0, others = [], []
        for name, (paths, steps) in histories:
            assert any(i for i, _ in steps), "the neighbours took rows"
            bad0 += [f"{name}: {b}" for b in branch0_report(doc, alone, alone_steps, paths, steps, fresh)]
            for (i, toks), logits in sorted(steps.items(), key=lambda kv: kv[0]) if neighbours else ():
                want = fresh(doc + list(toks))
                if not np.array_equal(logits, want):
                    others.append(f"{name}: branch {i} step {len(toks)} (by {differ(logits, want):.3g})")
        # the document's own cells and logits are untouched
        assert s.tokens == doc and np.array_equal(s.logits, fresh(doc))
        return bad0, others
    finally:
        s.close()


_results: dict[tuple[str, int], tuple[list[str], list[str]]] = {}


def measured(model: Model, name: str, fresh: Fresh, recorder: Recorder, offset: int, base: int,
             warm: bool, neighbours: bool) -> tuple[list[str], list[str]]:
    """``sweep``, once per model and offset (two tests read it)."""
    if (name, offset) not in _results:
        _results[(name, offset)] = sweep(model, fresh, recorder, offset, base, warm, neighbours)
    return _results[(name, offset)]


def cases(model: str, offsets: Sequence[int], fails: dict[str, set[int]]) -> list[Any]:
    return [pytest.param(o, marks=pytest.mark.xfail(strict=True, reason=REASON) if o in fails[model] else ())
            for o in offsets]


@pytest.mark.parametrize("offset", cases("tiny", range(16), FAILS_BRANCH0))
def test_tiny_branch0_steps_beside_others_equal_alone_and_fresh(
        tiny: Model, tiny_fresh: Fresh, recorder: Recorder, offset: int) -> None:
    bad, _ = measured(tiny, "tiny", tiny_fresh, recorder, offset, base=96, warm=True, neighbours=True)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("offset", cases("tiny", range(16), FAILS_ANY))
def test_tiny_every_row_beside_others_equals_fresh(
        tiny: Model, tiny_fresh: Fresh, recorder: Recorder, offset: int) -> None:
    """Every logits row of the busy runs (the neighbours, drafts, spare
    work): the memo keeps each as the greedy step of its token sequence."""
    _, others = measured(tiny, "tiny", tiny_fresh, recorder, offset, base=96, warm=True, neighbours=True)
    assert not others, "\n".join(others)


GEMMA_OFFSETS = (0, 3, 8, 13)


@pytest.mark.parametrize("offset", cases("gemma", GEMMA_OFFSETS, FAILS_BRANCH0))
def test_gemma_branch0_steps_beside_others_equal_alone_and_fresh(
        gemma: Model, gemma_fresh: Fresh, recorder: Recorder, offset: int) -> None:
    bad, _ = measured(gemma, "gemma", gemma_fresh, recorder, offset, base=64, warm=False, neighbours=False)
    assert not bad, "\n".join(bad)


# -- exact items: flash attention in short calls ------------------------------
# With ``exactItems`` every row is exact wherever its cells land (only their
# order counts; see ``model.FLASH_ROWS``): the same sweeps with no marks.

@pytest.fixture(scope="module")
def tiny_exact_fresh(tiny_exact: Model) -> Iterator[Fresh]:
    yield from fresh_of(tiny_exact)


@pytest.fixture(scope="module")
def gemma_exact_fresh(gemma_exact: Model) -> Iterator[Fresh]:
    yield from fresh_of(gemma_exact)


@pytest.mark.parametrize("offset", range(16))
def test_tiny_exact_items_every_row_beside_others_equals_fresh(
        tiny_exact: Model, tiny_exact_fresh: Fresh, recorder: Recorder, offset: int) -> None:
    bad, others = sweep(tiny_exact, tiny_exact_fresh, recorder, offset, base=96, warm=True, neighbours=True)
    assert not bad + others, "\n".join(bad + others)


@pytest.mark.parametrize("offset", GEMMA_OFFSETS)
def test_gemma_exact_items_every_row_beside_others_equals_fresh(
        gemma_exact: Model, gemma_exact_fresh: Fresh, recorder: Recorder, offset: int) -> None:
    bad, others = sweep(gemma_exact, gemma_exact_fresh, recorder, offset, base=64, warm=False, neighbours=True)
    assert not bad + others, "\n".join(bad + others)


def random_histories(model: Model, fresh: Fresh, recorder: Recorder, seed: int, trials: int) -> list[str]:
    """Extends on random documents (lengths, item counts and limits, spare
    work, drafts, a memo kept across runs): every row that differs from a
    fresh evaluation. Plans are checked as they are made: a rejected draft
    may free only cells above every row kept."""
    rnd = random.Random(seed)
    texts = [TEXT, Path(textwrap.__file__).read_text()[:3000], Path(json.__file__).read_text()[:2000]]
    bad = []
    for trial in range(trials):
        toks = model.tokenize(rnd.choice(texts).encode(), True)
        doc = toks[: rnd.randint(40, min(len(toks) - 1, 300))]
        s = Session(model, n_ctx=1024, n_branches=16)
        try:
            s.sync(doc)
            assert s.logits is not None
            k = rnd.randint(2, 6)
            top = [int(t) for t in np.argsort(-s.logits, kind="stable")[: k + SPARE]]
            memo = GreedyMemo()
            for run in range(rnd.randint(1, 3)):
                limits = [rnd.randint(2, 14) for _ in range(k)]
                spare = Spare(top[k:], lambda text: False, rnd.randint(2, 12))
                _, steps = recorder.grow(s, top[:k], limits, memo=memo, spare=spare)
                for (i, toks_i), logits in steps.items():
                    if not np.array_equal(logits, fresh(doc + list(toks_i))):
                        bad.append(f"trial {trial} run {run}: branch {i} step {len(toks_i)}")
        finally:
            s.close()
    return bad


@pytest.fixture
def plans_checked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every plan of ``extend``: drafts (rows past a branch's tokens) come
    last, with exact items from one branch. Returns the number of drafts
    seen."""
    plan, drafts = branches._Growth.plan, [0]

    def checked(self: Any, need: list[int]) -> Any:
        call = plan(self, need)
        if call is not None:
            kinds = [row.index >= len(self.branches[row.branch].tokens) for row in call.rows]
            first = kinds.index(True) if True in kinds else len(kinds)
            assert all(kinds[first:]), f"a row after a draft: {call.rows}"
            if self.session.model.flash_attention:
                assert len({row.branch for row in call.rows[first:]}) <= 1, f"drafts of two branches: {call.rows}"
            drafts[0] += len(kinds) - first
        return call

    monkeypatch.setattr(branches._Growth, "plan", checked)
    return drafts


def test_tiny_exact_items_random_histories_equal_fresh(
        tiny_exact: Model, tiny_exact_fresh: Fresh, recorder: Recorder, plans_checked: list[int]) -> None:
    bad = random_histories(tiny_exact, tiny_exact_fresh, recorder, seed=7, trials=25)
    assert plans_checked[0] > 0, "drafts were tried"
    assert not bad, "\n".join(bad)


def test_gemma_exact_items_random_histories_equal_fresh(
        gemma_exact: Model, gemma_exact_fresh: Fresh, recorder: Recorder, plans_checked: list[int]) -> None:
    bad = random_histories(gemma_exact, gemma_exact_fresh, recorder, seed=3, trials=6)
    assert not bad, "\n".join(bad)


def test_the_exact_items_setting_loads_a_model_that_keeps_to_its_rules(tiny_model_path: Path, tmp_path: Path) -> None:
    s, errors = Settings(model=str(tiny_model_path), threads=2).update({"exactItems": True})
    assert not errors and "exact_items" in Settings.RELOAD
    exact, plain = lifecycle.load(s, tmp_path), lifecycle.load(replace(s, exact_items=False), tmp_path)
    try:
        assert exact.flash_attention and exact.n_ubatch <= FLASH_ROWS and exact.max_outputs == OUTPUT_ROWS
        assert not plain.flash_attention and plain.max_outputs is None
        assert exact.calibration_key() != plain.calibration_key()  # a rule calibrated for one is not the other's
    finally:
        exact.close()
        plain.close()
    assert Settings().update({"exactItems": "yes"})[1]


def test_chunks_keep_rows_in_order_within_the_row_and_logits_limits() -> None:
    rows = [branches.Row(i % 3, i, 0, i % 2 == 0) for i in range(20)]
    got = list(branches.chunks(rows, 8, 3))
    assert [r for c in got for r in c] == rows
    assert all(len(c) <= 8 and sum(r.wants_logits for r in c) <= 3 for c in got)
    assert [len(c) for c in got] == [6, 6, 6, 2]
    assert [len(c) for c in branches.chunks(rows, 8, None)] == [8, 8, 4]


def test_gemma_document_logits_stay_exact_with_probes_in_the_feed(gemma: Model, gemma_fresh: Fresh) -> None:
    """Probes (likely next tokens) ride in a keystroke's padding and want
    logits. At 8 logits rows a call the last layer takes another kernel path:
    at this length (found by a scan of 40-400) the document's own logits then
    differed from a fresh evaluation's, by 0.0033."""
    toks = gemma.tokenize((TEXT + Path(textwrap.__file__).read_text()).encode(), True)[:350]
    s = Session(gemma, n_ctx=1024, n_branches=16)
    try:
        s.sync(toks[:-1])
        assert s.logits is not None
        probe = [int(t) for t in np.argsort(-s.logits)[:8]]
        s.sync(toks, None, None, probe)
        assert np.array_equal(s.logits, gemma_fresh(toks))
    finally:
        s.close()
