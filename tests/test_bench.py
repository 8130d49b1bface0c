"""The benchmark: traces are deterministic and valid; the pipeline runs end
to end on the tiny model (lsp-llm over stdio, naive, floor)."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from pathlib import Path

import pytest
from lsprotocol import types as lsp

from lsp_llm.tools.bench import ghost, pace, paced, quality, report, traces, tuning
from lsp_llm.tools.bench import main as bench_main
from lsp_llm.tools.bench.worker import sample_indices
from lsp_llm.tools.editor_text import lsp_position

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
    assert lsp_position("abc", (0, 2)) == lsp.Position(0, 2)
    assert lsp_position("a😀b", (0, 2)) == lsp.Position(0, 3)  # the emoji is two UTF-16 units
    assert lsp_position("x = '😀'\ny", (0, 7)) == lsp.Position(0, 8)
    assert lsp_position("x = '😀'\n😀y", (1, 1)) == lsp.Position(1, 2)
    assert lsp_position("a😀b", (0, 2), "utf-8") == lsp.Position(0, 5)


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
        "--pace", "back-to-back", "--doc-tokens", "300", "--keystrokes", "12", "--sizes", "300",
        "--sweep-keystrokes", "6", "--naive-samples", "2", "--n-ctx", "1024", "--timeout", "240",
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
        decodes = r["engine"] != "lsp-llm"  # lsp-llm answers some keystrokes from the memo: no token at all
        assert all(k["latency_s"] > 0 and k["tokens"] >= decodes for k in r["keys"])
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


# -- typing pace, switching, memory, quality ----------------------------------------------------


def test_pace_is_seeded_and_in_range() -> None:
    t = traces.switching_trace(traces.default_sources()[:8], 300, 120, seed=2, switch_every=6)
    a, b, c = pace.delays(t.keys, 5), pace.delays(t.keys, 5), pace.delays(t.keys, 6)
    assert a == b and a != c and len(a) == len(t.keys)
    kinds = [pace.pause_kind(p, k) for p, k in zip([None, *t.keys], t.keys)]
    assert {"key", "line", "switch"} <= set(kinds)
    for d, kind in zip(a, kinds):
        lo, hi = getattr(pace.TYPING, kind)
        assert lo <= d <= hi
    assert 0.120 <= statistics.median(d for d, k in zip(a, kinds) if k == "key") <= 0.250
    times = pace.schedule(a)
    assert times == sorted(times) and times[-1] == pytest.approx(sum(a))


def test_switching_trace_comes_back_to_unchanged_documents() -> None:
    t = traces.switching_trace(traces.default_sources()[:8], 300, 160, seed=1, switch_every=6)
    assert len(t.docs) == 8 and t.meta["kind"] == "switching"
    assert traces.replay(t) == t.meta["expected_final"]
    back = paced.switch_backs(t.keys)
    assert sum(back) >= 3
    for i in (i for i, b in enumerate(back) if b):
        doc = t.keys[i].doc
        earlier = [k for k in t.keys[:i] if k.doc == doc]
        assert earlier and t.keys[i - 1].doc != doc  # typed in before, and the last key was elsewhere


def test_latency_runs_to_the_first_fresh_answer() -> None:
    times = [0.0, 0.2, 0.4, 2.0]
    answers = [
        paced.Answer(0, 0.0, 0.1),  # fresh: 100 ms
        paced.Answer(1, 0.2, 0.5),  # stale: key 2 came at 0.4
        paced.Answer(2, 0.4, 0.7),  # fresh: answers keys 1 and 2
        paced.Answer(3, 2.0, None),  # cancelled: key 3 never answered
    ]
    lat = paced.key_latencies(times, answers)
    assert lat[0] == pytest.approx(100) and lat[1] == pytest.approx(500) and lat[2] == pytest.approx(300)
    assert lat[3] is None


def test_quality_metrics() -> None:
    assert quality.next_word("  foo(bar)") == "  foo" and quality.next_word("(bar)") == "("
    assert quality.next_word("") == "" and quality.first_line("a = 1  \nb") == "a = 1"
    assert quality.similarity("return x", "return x") == 1.0 and quality.similarity("abc", "xyz") == 0.0
    old, new = "def f():\n    x\n", "def f():\n    return 1\n"
    start, end, text = quality.diff_edit(old, new)
    assert traces.apply_edit(old, start, end, text) == new
    cuts = quality.cut_points(quality.quality_sources()[0], 6, 3, traces.approx_tokens, 30)
    assert cuts == quality.cut_points(quality.quality_sources()[0], 6, 3, traces.approx_tokens, 30)
    lines = traces.read_source(Path(cuts[0].path))
    for c in cuts:
        assert c.truth and lines[c.line][c.col :].startswith(c.truth) and len(c.truth) <= 30


def test_tuning_cuts_a_hole_and_scores_what_the_user_takes() -> None:
    path = tuning.tuning_sources()[0]
    hs = tuning.holes(path, 4, 1, traces.approx_tokens)
    assert hs == tuning.holes(path, 4, 1, traces.approx_tokens) and len(hs) == 4
    lines = traces.read_source(path)
    for h in hs:
        removed = "\n".join(x.rstrip() for x in [lines[h.line][h.col :], *lines[h.line + 1 : h.line + 9]])
        assert h.truth == removed.rstrip() and "\n" in h.truth  # the rest of the line and the next lines
        assert h.offset == len("\n".join([*lines[: h.line], lines[h.line][: h.col]]))
        assert h.text == "\n".join([*lines[: h.line], lines[h.line][: h.col], *lines[h.line + 9 :]])
    truth = "return x + 1\nprint(x)"
    assert tuning.score("return x + 1", truth) == tuning.Score(12, 1, 0, True, True)  # Tab
    assert tuning.score("return x + 2", truth) == tuning.Score(10, 3, 2, True, False)  # "return| x| +"
    assert tuning.score("yield x", truth) == tuning.Score(0, 0, 7, True, False)
    assert tuning.score("", truth) == tuning.Score()


class _Oracle:
    """A suggester that knows the truth (its ghost text is right or wrong on
    purpose): checks the simulated user's arithmetic, not an engine."""

    def __init__(self, truth: str, right: bool) -> None:
        self.truth, self.right, self.done = truth, right, 0

    async def goto(self, text: str, pos: traces.Pos) -> None:
        self.done = 0

    async def insert(self, s: str) -> None:
        assert self.truth[self.done :].startswith(s)
        self.done += len(s)

    async def ghost(self) -> str:
        return self.truth[self.done :] if self.right else "zzz"

    async def popup(self) -> str:
        return ""


def test_simulated_user_saves_what_the_ghost_gets_right() -> None:
    truth = "return self.value + 1"
    right, first = asyncio.run(quality.simulate(_Oracle(truth, True), truth, use_popup=False))
    assert first == truth and right.chars == len(truth)
    assert right.keystrokes == 6 and right.from_ghost == len(truth)  # return| self|.|value| +| 1
    wrong, _ = asyncio.run(quality.simulate(_Oracle(truth, False), truth, use_popup=False))
    assert wrong.keystrokes == len(truth) and wrong.from_ghost == 0


def test_typing_pace_memory_and_quality_on_the_tiny_model(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rc = bench_main([
        "--model", str(tiny_model_path), "--pace", "typing", "--quality", "--engines", "lsp-llm,floor,llama-cpp-python",
        "--out", str(out), "--doc-tokens", "200", "--pace-keystrokes", "10", "--switch-keystrokes", "12",
        "--switch-doc-tokens", "150", "--switch-every", "5", "--memory-tokens", "200", "--quality-files", "1",
        "--quality-cuts", "1", "--quality-chars", "6", "--gen-tokens", "4", "--timeout", "240",
        "--tune", "--tune-cuts", "1", "--ghost", "--ghost-lines", "1", "--ghost-cuts", "1",
    ])
    results = json.loads((out / "results.json").read_text())
    bad = [(r["engine"], r["trace"], r.get("reason")) for r in results["paced_runs"] if r["status"] != "ok"]
    assert rc == 0 and not bad, bad
    assert results["runs"] == [] and results["sections"] == ["ghost", "quality", "tune", "typing"]
    names = {t["name"] for t in results["paced_traces"]}
    assert names == {"3 files, typing pace", "8 files, switching"}
    for r in results["paced_runs"]:
        assert len(r["keys"]) == r["of_keys"] and r["answers"]
        assert all(k["latency_ms"] is None or k["latency_ms"] > 0 for k in r["keys"])
        assert r["keys"][-1]["latency_ms"] is not None  # the last keystroke is answered
        assert r["peak_rss"] > 0 and r["cpu_s"] > 0
    ours = [s for s in results["paced_summaries"] if s["engine"] == "lsp-llm"]
    assert all(s["server_requests"] is not None and 0 <= s["no_decode"] <= s["server_requests"] for s in ours)
    assert [m["documents"] for m in results["memory"]] == [1, 4, 8]
    assert all(m["rss_mb"] > 0 for m in results["memory"])
    rows = {r["engine"]: r for r in results["quality"]["rows"]}
    assert rows["lsp-llm"]["status"] == rows["llama-cpp-python"]["status"] == "ok"
    assert rows["llama-server /infill"]["status"] == "unavailable"
    assert all(0 <= r["exact"] <= 1 and 0 <= r["similarity"] <= 1 for r in rows.values())
    typed = [len(traces.read_source(traces.stdlib_dir() / name)[first]) for name, first in ghost.GHOST_MODULES]
    assert [r["keys"] for r in results["ghost"]["typing"]] == typed  # one answer per keystroke
    assert all(r["type_through"] + r["model"] == r["keys"] for r in results["ghost"]["typing"])
    assert len(results["ghost"]["depth"]) == len(ghost.GHOST_MODULES)
    tuned = results["tuning"]
    assert tuned["cuts"] == len(tuning.TUNING_MODULES) and tuned["rows"][0]["variant"] == "defaults"
    assert {r["n_ctx"] for r in tuned["rows"]} == {4096, 1024}
    assert all(0 <= r["whole"] <= r["shown"] <= 1 and r["accepted"] >= 0 for r in tuned["rows"])
    md = (out / "report.md").read_text()
    assert md.index("**Typing pace: 3 files") < md.index("**Memory**") < md.index("**Quality**")
    assert md.index("**Ghost text at a typing pace**") < md.index("**Quality**")
    assert md.index("**Quality**") < md.index("**Ghost text defaults, measured**")


# -- remote engines and a team on a real llama-server (xllamacpp) -------------------------------

def test_remote_engines_and_a_team_on_llama_server(tiny_model_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("xllamacpp", reason="xllamacpp (the test extra) embeds llama-server")
    from lsp_llm.tools.bench import remote, served

    out, readme = tmp_path / "bench", tmp_path / "docs" / "benchmarks.md"
    readme.parent.mkdir()
    readme.write_text("# b\n\n" + "\n".join(f"{a}\nold\n{b}\n" for a, b in served.MARKERS.values()) + "kept\n")
    rc = bench_main([
        "--model", str(tiny_model_path), "--remote", "--team", "--out", str(out), "--readme", str(readme),
        "--remote-doc-tokens", "150", "--remote-keystrokes", "8", "--team-sizes", "1,2", "--team-doc-tokens", "150",
        "--team-keystrokes", "8", "--gen-tokens", "4", "--n-ctx", "1024", "--timeout", "240",
    ])
    results = json.loads((out / "results.json").read_text())
    runs = results["remote"]["runs"]
    assert rc == 0 and all(r["status"] == "ok" for r in runs), [(r["engine"], r.get("reason")) for r in runs]
    assert results["sections"] == ["remote", "team"] and results["runs"] == []
    assert {(r["engine"], r["kind"]) for r in runs} == {(e, k) for e in remote.ENGINES for k in ("end", "middle")}
    for r in runs:
        assert len(r["keys"]) == r["of_keys"] == 8 and r["keys"][-1]["latency_ms"] is not None
        if r["engine"] == remote.OURS_LOCAL:
            assert "tokens_per_key" not in r and r["fed"] >= 0
            continue
        per_key = r["tokens_per_key"]  # the engine's own count, a reading before each keystroke
        assert len(per_key) == 8 and all(x >= 0 for x in per_key)
        assert sum(per_key) < 150  # typing is never a whole read of the document
    ours_end = next(r for r in runs if r["engine"] == remote.OURS_REMOTE and r["kind"] == "end")
    assert statistics.median(ours_end["tokens_per_key"]) <= 3
    assert ours_end["totals"]["prompt_tokens_total"] == sum(ours_end["tokens_per_key"])
    vscode = [r for r in runs if r["engine"] == remote.VSCODE]
    assert all(r["endpoint"] == "/completion" for r in vscode)  # Gemma 3 has no FIM tokens
    assert all(1 <= n < 150 for r in vscode for n in r["prompt_n"])  # its last token at least, never a whole read
    rows = results["team"]["rows"]
    assert [(r["typists"], r["status"], r["of_keys"]) for r in rows] == [(1, "ok", 8), (2, "ok", 16)]
    assert 0 < rows[0]["prompt_per_key"] <= 4  # one typist at the end of its file: a few tokens a keystroke
    for r in rows:  # several lsp-llm servers on one engine (engineSlots shared): no typist evicts another's cache
        assert 0 < r["prompt_per_key"] <= 4 and r["generated_per_key"] >= 0 and r["keys_per_s"] > 1
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    md = (out / "report.md").read_text()
    assert md.index("**Remote engines at a typing pace**") < md.index("**A team on one llama-server**")
    assert "How many developers one server serves" in md and "engine tokens per keystroke <= 3" in md
    doc = readme.read_text()
    assert "old" not in doc and doc.endswith("kept\n") and "| lsp-llm on llama-server |" in doc
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (readme.parent / "team.png").stat().st_size > 5_000
