"""Bounded exactness check on the embedded default model (Gemma 3 270M,
sliding window 512): edits, including a rewind deeper than the window,
give logits bit-identical to a fresh evaluation."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from lsp_llm.calibrate import SAMPLE, rule_holds
from lsp_llm.model import Model
from lsp_llm.session import Session

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
