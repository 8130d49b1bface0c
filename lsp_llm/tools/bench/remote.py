"""Remote engines at a typing pace (``lsp-llm bench --remote``): one file typed
at the end and in the middle, each keystroke at its time on the trace's clock
(pace.py), against

* ``lsp-llm on llama-server``: the real server over stdio with ``--engine-url``;
* ``llama.vscode-style``: what llama.vscode sends to the same server, one request
  per keystroke with the whole prompt (``/infill`` with ``input_prefix`` = the
  256 lines before the cursor's line, ``prompt`` = the cursor's line up to it,
  ``input_suffix`` = the rest of it and the next 64 lines, ``input_extra`` empty,
  when the model has FIM tokens; else ``/completion`` with the text before the
  cursor, the suffix having no place in a plain prompt), ``cache_prompt``,
  ``n_predict`` = --gen-tokens, ``t_max_predict_ms``, no document mirror,
  newest wins (the previous request's connection is closed);
* ``lsp-llm in-process``: the server with llama.cpp in its own process.

Each run gets a fresh llama-server (llama_host.py: 1 slot, the run's one
document). The typing clock starts once the document is read: the lsp-llm
server has gone quiet (a request past its read budget answers empty while the
read goes on in the background) and no llama-server slot is processing.
Latency as in paced.py (to the first fresh answer). Tokens per
keystroke: the engine's own count, ``llamacpp:prompt_tokens_total`` from
``/metrics`` sampled just before each keystroke (the difference is what the
engine evaluated for the keystroke before, background work included); for
lsp-llm in-process, ``fed_total`` from ``lsp-llm.stats`` over the keystrokes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from ..client import StdioServer, server_command
from . import llama_host, pace, paced, traces
from .engines import Settings, cpu_seconds
from .report import pct

T = TypeVar("T")
OURS_REMOTE, VSCODE, OURS_LOCAL = "lsp-llm on llama-server", "llama.vscode-style", "lsp-llm in-process"
ENGINES = (OURS_REMOTE, VSCODE, OURS_LOCAL)
QUICK = {"remote_doc_tokens": 400, "remote_keystrokes": 30}
FULL = {"remote_doc_tokens": 2000, "remote_keystrokes": 200}
N_PREFIX_LINES, N_SUFFIX_LINES = 256, 64  # llama.vscode's context around the cursor
T_MAX_PREDICT_MS = 250
GREEDY = {"samplers": ["top_k"], "top_k": 1, "temperature": 0.0}
LEAD_S = 0.005  # /metrics is read this long before each keystroke
SETTLE_S = 0.5  # after the last answer, before the last reading
READ_WAIT_S = 300.0  # the longest wait for lsp-llm to go quiet after opening its documents
QUIET_S, QUIET_SHARE = 0.5, 0.1  # quiet: under 10% of a core over half a second, twice in a row
IDLE_TIMEOUT_S = 600.0  # the longest wait for the engine to finish reading the opened files


# -- traces ------------------------------------------------------------------------------------


def end_trace(path: Path, doc_tokens: int, keystrokes: int, seed: int, count: traces.TokenCounter) -> traces.Trace:
    """Typing at the end of a document: a function body typed back with nothing
    after it, no detours (typos and Enter only)."""
    lines = traces.read_source(path)
    spot = traces.find_spot(lines, traces._line_after_tokens(lines, doc_tokens, count), keystrokes + 40)
    window = traces._window_for(lines, spot, doc_tokens, count)
    cfg = traces.TraceConfig(keystrokes=keystrokes, open_above_every=0, jump_every=0, switch_every=0)
    t = traces.generate([(path.resolve().as_uri(), lines[: spot.hole + spot.n_hole], spot, window)], cfg, seed,
                        name=f"end of {path.name}")
    t.meta.update(kind="end", doc_tokens=doc_tokens, files=[str(path)])
    return t


def middle_trace(path: Path, doc_tokens: int, keystrokes: int, seed: int,
                 count: traces.TokenCounter) -> traces.Trace:
    """Typing in the middle: the same hole with 40 lines after it, and detours."""
    t = traces.multi_file_trace([path], doc_tokens, keystrokes, seed, count)
    t.name = f"middle of {path.name}"
    t.meta.update(kind="middle")
    return t


def paced_trace(t: traces.Trace, seed: int) -> traces.Trace:
    t.meta["delays_s"] = pace.delays(t.keys, seed)
    t.meta["pace"] = asdict(pace.TYPING)
    return t


# -- the engine's counters ---------------------------------------------------------------------


class Meter:
    """Reads llama-server's /metrics: at given times during a run, and once at its end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.AsyncClient(timeout=60.0)
        self.readings: list[dict[str, float]] = []

    async def read(self) -> dict[str, float]:
        got = llama_host.parse_metrics((await self.client.get(f"{self.url}/metrics")).text)
        self.readings.append(got)
        return got

    async def idle(self, timeout: float = IDLE_TIMEOUT_S) -> None:
        """Until no slot is processing (the documents' first reads done), twice in a row."""
        loop = asyncio.get_running_loop()
        deadline, quiet = loop.time() + timeout, 0
        while quiet < 2 and loop.time() < deadline:
            slots = (await self.client.get(f"{self.url}/slots")).json()
            quiet = quiet + 1 if not any(x.get("is_processing") for x in slots) else 0
            await asyncio.sleep(0.05)

    async def at(self, times: list[float], start: float) -> None:
        loop = asyncio.get_running_loop()
        for at in times:
            await asyncio.sleep(max(0.0, start + at - LEAD_S - loop.time()))
            await self.read()

    def per_key(self, name: str = llama_host.PROMPT_TOTAL) -> list[float]:
        """What the engine counted between one keystroke and the next."""
        v = [r.get(name, math.nan) for r in self.readings]
        return [b - a for a, b in zip(v, v[1:])]

    async def close(self) -> None:
        await self.client.aclose()


async def timed_with(meter: Meter | None, times: list[float], run: Awaitable[T]) -> T:
    """run, with the meter read before each keystroke; its last reading after the run."""
    if meter is None:
        return await run
    start = asyncio.get_running_loop().time()
    reader = asyncio.ensure_future(meter.at(times, start))
    try:
        out = await run
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    await asyncio.sleep(SETTLE_S)
    await meter.read()
    return out


def totals(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    names = (llama_host.PROMPT_TOTAL, llama_host.PREDICTED_TOTAL, llama_host.PROMPT_SECONDS,
             llama_host.PREDICTED_SECONDS)
    return {n.split(":")[1]: after.get(n, math.nan) - before.get(n, math.nan) for n in names}


# -- lsp-llm ---------------------------------------------------------------------------------


def lsp_command(s: Settings, url: str | None, slots: str = "own") -> list[str]:
    if url is None:
        return s.command(quiet=True)
    return server_command(None, s.threads, "warning", s.server_cmd, engine_url=url, engine_slots=slots)


async def lsp_typist(s: Settings, trace: traces.Trace, url: str | None, meter: Meter | None, log: Path,
                     gate: Callable[[], Awaitable[Any]] | None = None, slots: str = "own") -> dict:
    """One editor typing the trace into lsp-llm (on llama-server at url, or
    in-process), once its documents are read; with a gate, it waits there too."""
    editor = await StdioServer.launch(lsp_command(s, url, slots), {"lineTokens": s.gen_tokens}, s.timeout_s, log)
    try:
        await paced.open_documents(editor, trace, s.timeout_s)
        await quiet(editor.pid, READ_WAIT_S)
        if gate is not None:
            await gate()
        before = await editor.stats()
        cpu0 = cpu_seconds(editor.pid)
        times = pace.schedule(trace.meta["delays_s"])
        answers = await timed_with(meter, times, paced.run_lsp(editor, trace, trace.meta["delays_s"], s.timeout_s))
        cpu = cpu_seconds(editor.pid) - cpu0
        after = await editor.stats()
    finally:
        await editor.stop()
    return {"answers": answers, "fed": _doc_delta(before, after, "fed_total"),
            "generated": _doc_delta(before, after, "generated_total"), "client_cpu_s": cpu,
            "engine_info": after.get("engine")}


async def quiet(pid: int, timeout: float, share: float = QUIET_SHARE) -> None:
    """Until the process uses under ``share`` of a core over QUIET_S, twice in a row:
    the reads of the opened documents done (a request past its read budget answers
    empty while the read goes on in the background)."""
    loop = asyncio.get_running_loop()
    deadline, calm = loop.time() + timeout, 0
    while calm < 2 and loop.time() < deadline:
        c0 = cpu_seconds(pid)
        await asyncio.sleep(QUIET_S)
        calm = calm + 1 if cpu_seconds(pid) - c0 < share * QUIET_S else 0


def _doc_delta(before: dict, after: dict, key: str) -> int:
    docs0 = before.get("documents", {})
    return sum(d.get(key, 0) - docs0.get(u, {}).get(key, 0) for u, d in after.get("documents", {}).items())


# -- llama.vscode-style ---------------------------------------------------------------------------


def vscode_body(text: str, cursor: traces.Pos, s: Settings, infill: bool) -> dict[str, Any]:
    """The request llama.vscode would send for the cursor in text."""
    line, col = cursor
    lines = text.split("\n")
    before = lines[max(0, line - N_PREFIX_LINES) : line]
    prefix = "".join(f"{x}\n" for x in before)
    current = lines[line][:col]
    common = {"n_predict": s.gen_tokens, "cache_prompt": True, "t_max_predict_ms": T_MAX_PREDICT_MS,
              "stream": False, **GREEDY}
    if not infill:
        return {"prompt": prefix + current, **common}
    suffix = "\n".join([lines[line][col:], *lines[line + 1 : line + 1 + N_SUFFIX_LINES]])
    return {"input_prefix": prefix, "prompt": current, "input_suffix": suffix, "input_extra": [], **common}


async def has_infill(client: httpx.AsyncClient) -> bool:
    """Whether the server's model has FIM tokens (an empty /infill is accepted)."""
    r = await client.post("/infill", json={"input_prefix": "", "input_suffix": "", "n_predict": 1})
    return r.status_code == 200


async def vscode_typist(s: Settings, trace: traces.Trace, url: str, meter: Meter) -> dict:
    """llama.vscode's requests for each keystroke of the trace, newest wins."""
    async with httpx.AsyncClient(base_url=url, timeout=s.timeout_s) as client:
        infill = await has_infill(client)
        path = "/infill" if infill else "/completion"
        for d, text in zip(trace.docs, paced.warm_texts(trace)):
            await client.post(path, json=vscode_body(d.text, _end_of(text), s, infill))
        await meter.idle()
        times = pace.schedule(trace.meta["delays_s"])
        prompt_n: list[int] = []
        answers = await timed_with(meter, times, _vscode_keys(client, path, s, trace, infill, prompt_n))
    return {"answers": answers, "prompt_n": prompt_n, "endpoint": path}


def _end_of(text: str) -> traces.Pos:
    return text.count("\n"), len(text) - (text.rfind("\n") + 1)


async def _vscode_keys(client: httpx.AsyncClient, path: str, s: Settings, trace: traces.Trace, infill: bool,
                       prompt_n: list[int]) -> list[paced.Answer]:
    loop = asyncio.get_running_loop()
    times = pace.schedule(trace.meta["delays_s"])
    start = loop.time()
    answers: list[paced.Answer] = []
    running: asyncio.Task | None = None
    for i, step in enumerate(paced.steps(trace)):
        await asyncio.sleep(max(0.0, start + times[i] - loop.time()))
        if running is not None and not running.done():
            running.cancel()  # closes its connection, as llama.vscode aborts its fetch
        answer = paced.Answer(i, loop.time() - start, None)
        answers.append(answer)
        body = vscode_body(step.new, step.key.cursor, s, infill)
        running = asyncio.ensure_future(_vscode_answer(client, path, body, answer, start, prompt_n))
    if running is not None:
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await asyncio.wait_for(running, s.timeout_s)
    return answers


async def _vscode_answer(client: httpx.AsyncClient, path: str, body: dict, answer: paced.Answer, start: float,
                         prompt_n: list[int]) -> None:
    r = await client.post(path, json=body)
    if r.status_code != 200:
        return
    data = r.json()
    answer.answered = asyncio.get_running_loop().time() - start
    answer.items = 1 if data.get("content") else 0
    prompt_n.append(int((data.get("timings") or {}).get("prompt_n", 0)))


# -- a run, a section -------------------------------------------------------------------------


def run_one(s: Settings, engine: str, trace: traces.Trace, out: Path) -> dict:
    """One engine on one trace, on a fresh llama-server (or none, in-process)."""
    base = {"engine": engine, "trace": trace.name, "kind": trace.meta["kind"], "status": "ok"}
    log = out / "runs" / f"remote-{_safe(engine)}-{_safe(trace.name)}.log"
    try:
        got = _run_engine(s, engine, trace, log)
    except Exception as e:  # noqa: BLE001 - a broken engine is a result too
        return {**base, "status": "error", "reason": f"{type(e).__name__}: {e} (log {log})"}
    times = pace.schedule(trace.meta["delays_s"])
    answers = got.pop("answers")
    keys = paced.as_records(paced.key_results(trace, times, answers))
    return {**base, **got, "keys": keys, "answers": paced.as_records(answers), "of_keys": len(trace.keys)}


def _run_engine(s: Settings, engine: str, trace: traces.Trace, log: Path) -> dict:
    if engine == OURS_LOCAL:
        return asyncio.run(lsp_typist(s, trace, None, None, log))
    with llama_host.hosted(s.model, len(trace.docs), s.threads, s.n_ctx, log.with_suffix(".server.log")) as host:
        return asyncio.run(_metered(s, engine, trace, host, log))


async def _metered(s: Settings, engine: str, trace: traces.Trace, host: llama_host.Host, log: Path) -> dict:
    meter = Meter(host.url)
    try:
        cpu0 = cpu_seconds(host.pid)
        if engine == OURS_REMOTE:
            got = await lsp_typist(s, trace, host.url, meter, log, meter.idle)
        else:
            got = await vscode_typist(s, trace, host.url, meter)
        got["engine_cpu_s"] = cpu_seconds(host.pid) - cpu0
        got["tokens_per_key"] = meter.per_key()
        got["predicted_per_key"] = meter.per_key(llama_host.PREDICTED_TOTAL)
        got["totals"] = totals(meter.readings[0], meter.readings[-1]) if meter.readings else {}
    finally:
        await meter.close()
    return got


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name)


def run_section(s: Settings, files: list[Path], cfg: dict, seed: int, count: traces.TokenCounter,
                out: Path) -> dict:
    """Every remote engine on the end and middle traces of files[0]."""
    missing = llama_host.available()
    ts = [paced_trace(end_trace(files[0], cfg["remote_doc_tokens"], cfg["remote_keystrokes"], seed, count), seed),
          paced_trace(middle_trace(files[0], cfg["remote_doc_tokens"], cfg["remote_keystrokes"], seed, count), seed)]
    runs = []
    for t in ts:
        for e in ENGINES:
            if missing and e != OURS_LOCAL:
                runs.append({"engine": e, "trace": t.name, "kind": t.meta["kind"], "status": "unavailable",
                             "reason": missing})
                continue
            t0 = time.perf_counter()
            runs.append({**run_one(s, e, t, out), "wall_s": time.perf_counter() - t0})
    return {"traces": [_describe(t) for t in ts], "runs": runs, "settings": {**cfg, "pid": os.getpid()},
            "summaries": [asdict(summarize(r)) for r in runs]}


def _describe(t: traces.Trace) -> dict:
    return {"name": t.name, "kind": t.meta["kind"], "keys": len(t.keys), "doc_tokens": t.meta["doc_tokens"],
            "files": t.meta["files"], "duration_s": sum(t.meta["delays_s"]), "pace": t.meta["pace"]}


# -- summaries ----------------------------------------------------------------------------------


@dataclass
class RemoteSummary:
    engine: str
    trace: str
    kind: str
    status: str
    reason: str | None = None
    keys: int = 0  # keystrokes that got a fresh answer
    of_keys: int = 0
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    tokens_p50: float = math.nan  # prompt tokens the engine evaluated per keystroke (/metrics)
    tokens_p90: float = math.nan
    tokens_mean: float = math.nan
    generated_mean: float = math.nan  # tokens the engine generated per keystroke
    request_prompt_n_p50: float = math.nan  # llama.vscode-style: timings.prompt_n of its answered requests
    fed_mean: float = math.nan  # lsp-llm: fed_total per keystroke (its own count)
    engine_cpu_ms_per_key: float = math.nan


def summarize(run: dict) -> RemoteSummary:
    s = RemoteSummary(run["engine"], run["trace"], run.get("kind", "?"), run["status"], run.get("reason"))
    if run["status"] != "ok":
        return s
    lat = [k["latency_ms"] for k in run["keys"] if k["latency_ms"] is not None]
    s.keys, s.of_keys = len(lat), run["of_keys"]
    s.p50_ms, s.p90_ms, s.p99_ms = pct(lat, 50), pct(lat, 90), pct(lat, 99)
    per_key = run.get("tokens_per_key") or []
    s.tokens_p50, s.tokens_p90 = pct(per_key, 50), pct(per_key, 90)
    s.tokens_mean = sum(per_key) / len(per_key) if per_key else math.nan
    gen = run.get("predicted_per_key") or []
    s.generated_mean = sum(gen) / len(gen) if gen else math.nan
    s.request_prompt_n_p50 = pct(run.get("prompt_n") or [], 50)
    if "fed" in run:
        s.fed_mean = run["fed"] / max(1, run["of_keys"])
    if "engine_cpu_s" in run:
        s.engine_cpu_ms_per_key = run["engine_cpu_s"] * 1000 / max(1, run["of_keys"])
    return s


def targets(summaries: list[dict]) -> list[dict]:
    """Tokens per keystroke at the end of a document; lsp-llm vs llama.vscode-style."""
    by = {(x["engine"], x["trace"]): RemoteSummary(**x) for x in summaries if x["status"] == "ok"}
    out = []
    for (e, trace), x in by.items():
        if e == OURS_REMOTE and x.kind == "end":
            out.append({"target": f"engine tokens per keystroke <= 3 at the median ({trace})",
                        "pass": x.tokens_p50 <= 3, "detail": f"p50 {x.tokens_p50:g}, mean {x.tokens_mean:.1f}"})
        theirs = by.get((VSCODE, trace))
        if e == OURS_REMOTE and theirs:
            ok = x.p50_ms <= theirs.p50_ms and x.p90_ms <= theirs.p90_ms
            out.append({"target": f"lsp-llm on llama-server p50/p90 no worse than llama.vscode-style ({trace})",
                        "pass": ok, "detail": f"p50 {x.p50_ms:.1f} vs {theirs.p50_ms:.1f} ms, "
                        f"p90 {x.p90_ms:.1f} vs {theirs.p90_ms:.1f} ms"})
    return out


def _f(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def markdown(section: dict) -> list[str]:
    out = ["**Remote engines at a typing pace** (one file, one llama-server slot per run, fresh for each run; "
           "tokens: prompt tokens the engine evaluated per keystroke, read from llama-server's `/metrics` "
           "before each keystroke (none in-process); the client's own count: `timings.prompt_n` of the answered "
           "requests, or lsp-llm's `fed_total` per keystroke)", ""]
    for t in section["traces"]:
        out += [f"*{t['name']}* ({t['kind']}; ~{t['doc_tokens']:,} tokens before the cursor, {t['keys']} "
                f"keystrokes, {t['duration_s']:.0f} s of typing)", "",
                "| engine | p50 ms | p90 ms | p99 ms | tokens/key p50 | p90 | mean | generated/key "
                "| the client's own count | engine CPU ms/key |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for x in (RemoteSummary(**s) for s in section["summaries"] if s["trace"] == t["name"]):
            out.append(_row(x))
        out.append("")
    marks = {True: "pass", False: "**miss**"}
    rows = [f"| {x['target']} | {marks[x['pass']]} | {x['detail']} |" for x in targets(section["summaries"])]
    if rows:
        out += ["| target | result | figures |", "|---|---|---|", *rows, ""]
    return out


def _row(x: RemoteSummary) -> str:
    if x.status != "ok":
        return f"| {x.engine} | {x.status}: {x.reason or ''} |||||||||"
    missing = f" ({x.of_keys - x.keys} keys never answered)" if x.keys != x.of_keys else ""
    tokens = (_f(x.tokens_p50, 0), _f(x.tokens_p90, 0), _f(x.tokens_mean))
    own = f"prompt_n p50 {_f(x.request_prompt_n_p50, 0)}" if x.engine == VSCODE else f"fed_total {_f(x.fed_mean)}/key"
    return (f"| {x.engine}{missing} | {_f(x.p50_ms)} | {_f(x.p90_ms)} | {_f(x.p99_ms)} | {' | '.join(tokens)} "
            f"| {_f(x.generated_mean)} | {own} | {_f(x.engine_cpu_ms_per_key, 0)} |")
