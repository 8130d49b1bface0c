"""The benchmark: traces are deterministic and valid; the pipeline runs end
to end on the tiny model (lsp-llm over stdio, naive, floor)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lsp_llm.bench import main as bench_main
from lsp_llm.bench import report, traces
from lsp_llm.bench.lspclient import change_event, utf16_col
from lsp_llm.bench.worker import sample_indices

SOURCES = traces.default_sources()[:3]


def _multi(seed: int, keystrokes: int = 240, cfg: traces.TraceConfig | None = None) -> traces.Trace:
    return traces.multi_file_trace(SOURCES, 600, keystrokes, seed, cfg=cfg)


def test_default_sources_are_stdlib_files() -> None:
    assert len(SOURCES) == 3
    assert all(p.is_file() and p.suffix == ".py" for p in SOURCES)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    a, b, c = _multi(7), _multi(7), _multi(8)
    assert a.to_json() == b.to_json()
    assert a.keys != c.keys
    # and it survives the JSON round trip used to hand traces to workers
    again = traces.Trace.from_json(json.loads(json.dumps(a.to_json())))
    assert again.keys == a.keys and [d.text for d in again.docs] == [d.text for d in a.docs]


@pytest.mark.parametrize("seed", range(6))
def test_edits_apply_and_give_the_expected_text(seed: int) -> None:
    t = _multi(seed)
    assert len(t.keys) == 240
    # a second, line-list based model of the text agrees with the generator's
    assert traces.replay(t) == t.meta["expected_final"]
    texts = [d.text for d in t.docs]
    for k, new, prefix in traces.iter_prefixes(t):
        old = texts[k.doc]
        texts[k.doc] = new
        assert k.start <= k.end
        traces.offset_of(old, k.end)  # the range is inside the old text
        assert new.startswith(prefix)
        if k.kind in ("type", "typo"):
            assert len(k.text) == 1 and prefix.endswith(k.text) and k.start == k.end
        if k.kind == "backspace":
            assert k.text == "" and k.end == (k.start[0], k.start[1] + 1) and k.cursor == k.start
        # the region before the spot is never touched
        head = t.docs[k.doc].text.split("\n")[: t.docs[k.doc].region_line]
        assert new.split("\n")[: len(head)] == head


def test_trace_has_every_kind_of_edit_and_switches_files() -> None:
    t = _multi(3, keystrokes=400)
    kinds = {k.kind for k in t.keys}
    assert {"type", "typo", "backspace", "enter", "open_above", "jump_line"} <= kinds
    switches = sum(1 for a, b in zip(t.keys, t.keys[1:]) if a.doc != b.doc)
    assert {k.doc for k in t.keys} == {0, 1, 2}
    assert 400 / 40 <= switches <= 400 / 8  # about every 20 keystrokes
    # typos are always backspaced: as many backspaces as wrong characters
    assert sum(k.kind == "typo" for k in t.keys) >= sum(k.kind == "backspace" for k in t.keys) - 2


def test_typing_without_detours_retypes_the_real_lines() -> None:
    quiet = traces.TraceConfig(typo_rate=0, open_above_every=0, jump_every=0)
    t = _multi(1, keystrokes=300, cfg=quiet)
    final = traces.replay(t)
    for doc, text, hole in zip(t.docs, final, t.meta["holes"]):
        before = doc.text.split("\n")
        after = text.split("\n")
        n_typed = len(after) - len(before) + 1
        typed = "\n".join(after[hole["line"] : hole["line"] + n_typed])
        assert hole["text"].startswith(typed)
        assert after[: hole["line"]] == before[: hole["line"]]
        assert after[hole["line"] + n_typed :] == before[hole["line"] + 1 :]


def test_size_sweep_types_the_same_keystrokes_into_bigger_documents() -> None:
    sweep = traces.size_sweep_traces(max(SOURCES, key=lambda p: p.stat().st_size), [300, 1200, 2400], 80, 5)
    sizes = [t.meta["tokens_before_cursor"] for t in sweep]
    assert sizes == sorted(sizes) and sizes[0] >= 250 and sizes[-1] >= 2000

    def relative(t: traces.Trace) -> list:
        off = t.docs[0].region_line
        return [(k.start[0] - off, k.start[1], k.end[0] - off, k.end[1], k.text, k.kind) for k in t.keys]

    assert relative(sweep[0]) == relative(sweep[1]) == relative(sweep[2])
    for t in sweep:
        assert traces.replay(t) == t.meta["expected_final"]


def test_apply_edit_rejects_bad_positions() -> None:
    assert traces.apply_edit("ab\ncd", (1, 1), (1, 2), "X") == "ab\ncX"
    assert traces.apply_edit("ab\ncd", (0, 2), (1, 0), "") == "abcd"
    with pytest.raises(ValueError):
        traces.apply_edit("ab\ncd", (0, 3), (0, 3), "x")
    with pytest.raises(ValueError):
        traces.apply_edit("ab", (1, 0), (1, 0), "x")


def test_lsp_positions_are_utf16() -> None:
    assert utf16_col("abc", 2) == 2
    assert utf16_col("a😀b", 2) == 3  # the emoji is two UTF-16 units
    ev = change_event("x = '😀'\ny", (0, 6), (0, 7), "!")
    assert ev["range"]["start"] == {"line": 0, "character": 7}
    assert ev["range"]["end"] == {"line": 0, "character": 8}


def test_sample_indices_spread_over_the_trace() -> None:
    assert sample_indices(10, 0) == set(range(10))
    assert sample_indices(10, 3) == {0, 4, 9} or sample_indices(10, 3) == {0, 5, 9}
    assert sample_indices(5, 50) == set(range(5))


def test_percentiles() -> None:
    assert report.pct([3, 1, 2], 50) == 2
    assert report.pct([1, 2, 3, 4], 50) == 2.5
    assert math.isnan(report.pct([], 50))


def test_bench_smoke_on_the_tiny_model(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rc = bench_main([
        "--model", str(tiny_model_path), "--engines", "lsp-llm,naive,floor", "--out", str(out),
        "--doc-tokens", "300", "--keystrokes", "12", "--sizes", "300", "--sweep-keystrokes", "6",
        "--naive-samples", "2", "--n-ctx", "1024", "--timeout", "240",
    ])
    results = json.loads((out / "results.json").read_text())
    bad = [(r["engine"], r["trace"], r.get("reason")) for r in results["runs"] if r["status"] != "ok"]
    assert rc == 0 and not bad, bad
    assert {(r["engine"], r["trace"]) for r in results["runs"]} == {
        (e, t) for e in ("lsp-llm", "naive", "floor") for t in ("3 files", "300 tokens")
    }
    for r in results["runs"]:
        want = 2 if r["engine"] == "naive" else r["of_keys"]
        assert len(r["keys"]) == want
        assert all(k["latency_s"] > 0 and k["tokens"] >= 1 for k in r["keys"])
        assert r["peak_rss"] > 0 and r["cpu_s"] > 0
    ours = next(r for r in results["runs"] if r["engine"] == "lsp-llm" and r["trace"] == "3 files")
    assert all(k["items"] is not None and k["generate_ms"] is not None for k in ours["keys"])
    md = (out / "report.md").read_text()
    assert "| lsp-llm |" in md and "**Targets**" in md and "llama-server" in md
    names = [t["target"] for t in results["targets"]]
    assert any(n.startswith("p50 <= 1.5x floor") for n in names)
    assert any(n.startswith(">= 30x faster than naive") for n in names)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "bench.png").stat().st_size > 10_000
