"""Find a batch shape rule that makes logits independent of batching.

llama.cpp's CPU kernels may pick different code paths for different batch
sizes, so the same token can get slightly different values when evaluated
alone or inside a larger batch. At model load we try candidate rules (pad
every decode call to a multiple of m rows, at least k) and keep the first
that gives bit-identical logits for one big batch versus many small ones and
a rewind, and for completion branches batched together (several sequences in
one call) versus a fresh evaluation. The verdict is cached per model file,
library version, CPU, thread count and ``VERSION`` of this check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .branches import Row, decode_rows, drop_branch
from .model import CANDIDATE_RULES, BatchRule, Model
from .session import GROW_CELLS, Session

log = logging.getLogger(__name__)

SAMPLE = (
    b"def fibonacci(n: int) -> int:\n"
    b"    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    b"    a, b = 0, 1\n"
    b"    for _ in range(n):\n"
    b"        a, b = b, a + b\n"
    b"    return a\n"
)
VERSION = 2  # of the checks below: a new version calibrates again
# chunk sizes for the incremental evaluation; they cover 1..9 rows
PATTERN = [1, 2, 3, 5, 9, 1, 4, 7, 6, 8]


def rule_holds(model: Model, rule: BatchRule, tokens: list[int]) -> bool:
    model.batch_rule = rule
    with contextlib.ExitStack() as sessions:
        fresh = _session(sessions, model, 1)
        pieces = _session(sessions, model, 1)

        def same_as_fresh(prefix: list[int]) -> bool:
            fresh.reset()
            fresh.sync(prefix)  # BOS, then the rest in one batch
            return bool(np.array_equal(pieces.logits, fresh.logits))

        pos = 1
        for size in PATTERN:
            pos = min(pos + size, len(tokens))
            pieces.sync(tokens[:pos])
            if not same_as_fresh(tokens[:pos]):
                return False
        pieces.sync(tokens[: len(tokens) // 2])  # rewind, then re-feed the rest
        pieces.sync(tokens)
        return same_as_fresh(tokens)


def _session(sessions: contextlib.ExitStack, model: Model, n_branches: int) -> Session:
    """A small session, closed when ``sessions`` closes (even if a later one fails to open)."""
    s = Session(model, n_ctx=256, n_branches=n_branches)
    sessions.callback(s.close)
    return s


def branches_hold(model: Model, rule: BatchRule, tokens: list[int]) -> bool:
    """Completion branches batched together under ``rule`` (several sequences
    and rows in one call) give the logits of a fresh evaluation."""
    model.batch_rule = rule
    with contextlib.ExitStack() as sessions:
        s = _session(sessions, model, 6)
        fresh = _session(sessions, model, 1)
        s.sync(tokens)
        firsts = [int(t) for t in np.argsort(-s.logits)[:6]]
        for paths in ([[f] for f in firsts], [[firsts[0], *tokens[1:4]], [firsts[1]]], [[firsts[2], *tokens[1:10]]]):
            rows = [Row(i, j, t, j == len(path) - 1) for i, path in enumerate(paths) for j, t in enumerate(path)]
            got = decode_rows(s, rows, len(tokens), lambda row, logits: logits.copy(), s.branch_step)
            for i in range(len(paths)):
                drop_branch(s, i)
            for i, path in enumerate(paths):
                fresh.reset()
                fresh.sync(tokens + path)
                if not np.array_equal(got[(i, len(path) - 1)], fresh.logits):
                    return False
        return True


def calibrate(model: Model, cache: Path | None) -> BatchRule:
    """Set and return model.batch_rule."""
    key = f"v{VERSION}-{model.calibration_key()}"
    cached = _load(cache, key)
    if cached is not None:
        model.batch_rule = cached
        log.info("batch rule (cached): multiple of %d, at least %d rows, exact=%s",
                 cached.multiple, cached.minimum, cached.exact)
        keep_bos_logits(model)
        return cached
    start = time.perf_counter()
    tokens = model.tokenize(SAMPLE, add_bos=True)
    rule = BatchRule(4, 8, exact=False)
    for candidate in CANDIDATE_RULES:
        if rule_holds(model, candidate, tokens) and branches_hold(model, candidate, tokens):
            rule = candidate
            break
    model.batch_rule = rule
    took = time.perf_counter() - start
    if rule.exact:
        log.info("batch rule: multiple of %d, at least %d rows (bit-identical; checked in %.2fs)",
                 rule.multiple, rule.minimum, took)
    else:
        log.warning("no batch rule gave bit-identical logits on this CPU; completions may vary "
                    "slightly with edit history (checked in %.2fs)", took)
    _save(cache, key, rule)
    keep_bos_logits(model)
    return rule


def keep_bos_logits(model: Model) -> None:
    """The logits after BOS alone under the model's rule, for the model to
    keep (``Session._start``): from the first read on, BOS rides in the
    read's first call."""
    if not model.add_bos:
        return
    s = Session(model, n_ctx=GROW_CELLS, n_branches=1)
    try:
        s.sync([model.bos])
    finally:
        s.close()


def _load(cache: Path | None, key: str) -> BatchRule | None:
    if cache is None:
        return None
    try:
        data = json.loads((cache / "calibration.json").read_text()).get(key)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        return BatchRule(int(data["multiple"]), int(data["minimum"]), bool(data["exact"]))
    except (KeyError, TypeError, ValueError):
        return None


def _save(cache: Path | None, key: str, rule: BatchRule) -> None:
    if cache is None:
        return
    path = cache / "calibration.json"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = asdict(rule)
        path.write_text(json.dumps(data, indent=1))
    except OSError as e:
        log.warning("could not cache the batch rule in %s: %s", path, e)
