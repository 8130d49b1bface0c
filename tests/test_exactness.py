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

What this found on this CPU (AVX2, llama.cpp's CPU kernels, no flash
attention): branch 0 grown alone is exact at every offset (its cells follow
the document: cell = position, as in a fresh run). Beside other branches its
cells land elsewhere, and then a step may differ: with the default model from
step 3-5 on at offsets 0, 3 and 8 (up to 1.5 in a logit; at offset 0 the
greedy path itself changes), with the tiny model rarely (offset 8 after a
warmed memo; a neighbour at offset 11). Placing one branch by hand shows the
rule: cells shifted from cell = position by a multiple of 8 (or with gaps of
8 or 16 cells) were exact at every step; shifts of 1, 3 or 4 differed (the
attention's sums over the cells round differently when a value moves to
another SIMD lane). The cases that fail are marked ``xfail(strict=True)``:
the claim is narrowed visibly, and a fix makes them XPASS (fail) until the
marks go. The sets are measured on this machine and this llama.cpp build;
another CPU (AVX-512: lanes of 16) may fail elsewhere.

The claim is narrowed accordingly (README, ARCHITECTURE "Not exact"): the
document's logits and every item's first token are exact after any history,
a branch grown alone is exact, later steps beside other branches are not
guaranteed. A placement fix was tried and did not make these pass: every
branch's rows in KV cells congruent to their positions modulo 8 (and 32),
in blocks of cells per branch with filler rows of a scratch sequence between
them (llama.cpp puts a call's rows in the lowest free cells, in row order;
it worked as laid out). All three marks stayed failing; on the test model
offset 8 still differed at branch 0's step 11 by the same 0.0745 even with
branch 0's cells exactly at cell = position (period 32), so cells are not the
whole cause. Nor is the number of rows that want logits alone (llama.cpp
runs the last layer for those only): a lone branch whose padding rows all
wanted logits stayed exact (test model, n = 96, 104, 107, 12 steps). Open.
One branch probed by hand at n = 64 and 67 (Gemma): cells shifted by 3
differed from step 1 on, by 8, 16 and 32 were exact for 7 steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from test_session import BASE

from lsp_llm.engine import branches
from lsp_llm.engine.branches import Spare, extend
from lsp_llm.engine.greedy import GreedyMemo
from lsp_llm.engine.model import Model
from lsp_llm.engine.session import Session

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


@pytest.fixture(scope="module")
def tiny_fresh(tiny: Model) -> Iterator[Fresh]:
    f = Fresh(tiny)
    yield f
    f.session.close()


@pytest.fixture(scope="module")
def gemma_fresh(gemma: Model) -> Iterator[Fresh]:
    f = Fresh(gemma)
    yield f
    f.session.close()


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
