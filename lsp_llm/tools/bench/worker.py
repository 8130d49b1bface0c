"""Run one engine on one trace in a process of its own (clean CPU time and
peak RSS, and a crash in llama.cpp costs one cell of the table, not the run).

    python -m lsp_llm.tools.bench.worker JOB.json RESULT.json
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from ..client import StdioServer
from . import paced
from .engines import ENGINE_CLASSES, EngineUnavailable, Settings, cpu_seconds, peak_rss_bytes
from .pace import schedule
from .traces import Trace, iter_prefixes, offset_of


def sample_indices(n: int, count: int) -> set[int]:
    """count keystroke indices spread evenly over n (all when count >= n)."""
    if count <= 0 or count >= n:
        return set(range(n))
    return {round(i * (n - 1) / (count - 1)) for i in range(count)} if count > 1 else {n // 2}


def _tree(pid: int | None) -> list[int | None]:
    if pid is None:
        return [None]
    try:
        import psutil

        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001
        return [pid]


def run_job(job: dict) -> dict:
    settings = Settings(**job["settings"])
    trace = Trace.from_json(json.loads(Path(job["trace"]).read_text()))
    engine = ENGINE_CLASSES[job["engine"]](settings)
    sample = job.get("sample", 0) if engine.sampled else 0
    measure = sample_indices(len(trace.keys), sample)
    # text before each document's first cursor, for warm-up
    warm = []
    for i, d in enumerate(trace.docs):
        first = next((k for k in trace.keys if k.doc == i), None)
        warm.append(d.text[: offset_of(d.text, first.start)] if first else d.text)
    result: dict = {"engine": engine.name, "trace": trace.name, "status": "ok", "keys": []}
    t_open = time.perf_counter()
    try:
        engine.open(trace, warm)
    except EngineUnavailable as e:
        _close_quietly(engine)
        return {**result, "status": "unavailable", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - a broken engine is a result too
        _close_quietly(engine)
        return {**result, "status": "error", "reason": f"while opening: {type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}
    result["open_s"] = time.perf_counter() - t_open
    pids = _tree(engine.work_pid)
    cpu0 = sum(cpu_seconds(p) for p in pids)
    result["loadavg_start"] = _load()
    wall0 = time.perf_counter()
    texts = [d.text for d in trace.docs]
    try:
        for i, (k, new, prefix) in enumerate(iter_prefixes(trace)):
            old = texts[k.doc]
            texts[k.doc] = new
            if i not in measure:
                continue
            r = engine.key(k, old, new, prefix, trace.docs[k.doc].uri)
            r.update(i=i, doc=k.doc, kind=k.kind)
            result["keys"].append(r)
    except Exception as e:  # noqa: BLE001 - record and report the failure
        result["status"] = "error"
        result["reason"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    result["wall_s"] = time.perf_counter() - wall0
    result["loadavg_end"] = _load()
    pids = _tree(engine.work_pid)
    result["cpu_s"] = sum(cpu_seconds(p) for p in pids) - cpu0
    result["peak_rss"] = max(peak_rss_bytes(p) for p in pids)
    result["measured"] = len(result["keys"])
    result["of_keys"] = len(trace.keys)
    try:
        result.update(engine.close())
    except Exception as e:  # noqa: BLE001
        result["close_error"] = str(e)
    finish = getattr(engine, "finish", None)
    if finish:
        finish()
    result["info"] = engine.info()
    result["settings"] = asdict(settings)
    return result


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _close_quietly(engine) -> None:
    for name in ("close", "finish"):
        try:
            getattr(engine, name, lambda: None)()
        except Exception:  # noqa: BLE001
            pass


# -- at a human pace (paced.py) -------------------------------------------------------------


def run_paced_job(job: dict) -> dict:
    settings = Settings(**job["settings"])
    trace = Trace.from_json(json.loads(Path(job["trace"]).read_text()))
    base = {"engine": job["engine"], "trace": trace.name, "mode": "paced", "status": "ok", "keys": []}
    try:
        if job["engine"] == "lsp-llm":
            out = asyncio.run(_paced_lsp(settings, trace))
        else:
            out = _paced_sync(ENGINE_CLASSES[job["engine"]](settings), trace)
    except EngineUnavailable as e:
        return {**base, "status": "unavailable", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - a broken engine is a result too
        return {**base, "status": "error", "reason": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}
    times = schedule(trace.meta["delays_s"])
    answers = out.pop("answers")
    out["keys"] = paced.as_records(paced.key_results(trace, times, answers))
    out["answers"] = paced.as_records(answers)
    out["of_keys"] = len(trace.keys)
    return {**base, **out, "settings": asdict(settings)}


def _paced_sync(engine, trace: Trace) -> dict:
    try:
        engine.open(trace, paced.warm_texts(trace))
        pids = _tree(engine.work_pid)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        wall0 = time.perf_counter()
        answers = paced.run_sync(engine, trace, trace.meta["delays_s"])
        wall = time.perf_counter() - wall0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        rss = max(peak_rss_bytes(p) for p in pids)
    finally:
        _close_quietly(engine)
    return {"answers": answers, "cpu_s": cpu, "wall_s": wall, "peak_rss": rss, "server": {}}


async def _paced_lsp(settings: Settings, trace: Trace) -> dict:
    log = Path(settings.out_dir) / "runs" / f"lsp-llm-server-{os.getpid()}.log"
    editor = await StdioServer.launch(settings.command(quiet=True), {"lineTokens": settings.gen_tokens},
                                      settings.timeout_s, log)
    try:
        await paced.open_documents(editor, trace, settings.timeout_s)
        before = await editor.stats()
        cpu0 = cpu_seconds(editor.pid)
        wall0 = time.perf_counter()
        answers = await paced.run_lsp(editor, trace, trace.meta["delays_s"], settings.timeout_s)
        wall = time.perf_counter() - wall0
        cpu = cpu_seconds(editor.pid) - cpu0
        after = await editor.stats()
        idle = await _idle_cpu_pct(editor.pid)
        rss = peak_rss_bytes(editor.pid)
    finally:
        await editor.stop()
    server = {**paced.server_counters(before, after), "idle_cpu_pct": idle}
    return {"answers": answers, "cpu_s": cpu, "wall_s": wall, "peak_rss": rss, "server": server}


async def _idle_cpu_pct(pid: int, after_s: float = 1.0, span_s: float = 1.0) -> float:
    """The server's CPU use (% of one core) from after_s to after_s + span_s
    seconds after the last answer: it should have gone quiet by then."""
    await asyncio.sleep(after_s)
    c0 = cpu_seconds(pid)
    await asyncio.sleep(span_s)
    return 100 * (cpu_seconds(pid) - c0) / span_s


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    result = run_paced_job(job) if job.get("mode") == "paced" else run_job(job)
    Path(argv[1]).write_text(json.dumps(result))
    return 0 if result["status"] in ("ok", "unavailable") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
