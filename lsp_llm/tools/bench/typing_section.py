"""The typing-pace section of the benchmark: its traces (the 3-file trace and
the 8-file switching trace, each with seeded pauses), their summaries and
their Markdown tables. The runs themselves are worker.run_paced_job."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from . import pace, traces
from .report import ORDER, OURS, pct


def paced_traces(files: list[Path], cfg: dict, seed: int, count: traces.TokenCounter) -> list[traces.Trace]:
    """The 3-file trace and the 8-file switching trace, each with its pauses."""
    out = []
    if cfg["pace_keystrokes"]:  # (--pace-keystrokes 0: the 8-file trace alone)
        three = traces.multi_file_trace(files[:3], cfg["doc_tokens"], cfg["pace_keystrokes"], seed, count=count)
        three.name = f"{three.name}, typing pace"
        out.append(three)
    if len(files) >= 4 and cfg["switch_keystrokes"]:
        out.append(traces.switching_trace(files[:8], cfg["switch_doc_tokens"], cfg["switch_keystrokes"], seed,
                                          cfg["switch_every"], count=count))
    for t in out:
        t.meta["delays_s"] = pace.delays(t.keys, seed)
        t.meta["pace"] = asdict(pace.TYPING)
    return out


@dataclass
class PacedSummary:
    engine: str
    trace: str
    status: str
    reason: str | None = None
    keys: int = 0  # keystrokes that got a fresh answer
    of_keys: int = 0
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    mean_ms: float = math.nan
    requests: int = 0  # requests sent
    stale: int = 0  # answers that came after a newer keystroke
    no_decode: int | None = None  # requests the server answered without a decode (its own count)
    server_requests: int | None = None  # ... of the requests it counted
    cpu_ms_per_key: float = math.nan
    peak_rss_mb: float = math.nan
    switch_backs: int = 0
    switch_back_p50_ms: float = math.nan
    idle_cpu_pct: float | None = None  # CPU % of the server 1-2 s after the last answer
    idle_rows: int | None = None
    idle_ms: float | None = None
    idle_steps: int | None = None  # greedy steps prepared in idle time
    idle_steps_used: int | None = None  # ... that a later request used


def summarize(run: dict) -> PacedSummary:
    s = PacedSummary(run["engine"], run["trace"], run["status"], run.get("reason"))
    if run["status"] != "ok":
        return s
    keys = run["keys"]
    lat = [k["latency_ms"] for k in keys if k["latency_ms"] is not None]
    back = [k["latency_ms"] for k in keys if k["switch_back"] and k["latency_ms"] is not None]
    answers = run["answers"]
    server = run.get("server", {})
    s.keys, s.of_keys = len(lat), run["of_keys"]
    s.p50_ms, s.p90_ms, s.p99_ms = pct(lat, 50), pct(lat, 90), pct(lat, 99)
    s.mean_ms = sum(lat) / len(lat) if lat else math.nan
    s.requests = len(answers)
    s.stale = sum(1 for a in answers if a["answered"] is not None and not _fresh(a, keys))
    s.no_decode, s.server_requests = server.get("no_decode_total"), server.get("requests_total")
    s.cpu_ms_per_key = run["cpu_s"] * 1000 / max(1, run["of_keys"])
    s.peak_rss_mb = run["peak_rss"] / 2**20
    s.switch_backs, s.switch_back_p50_ms = len(back), pct(back, 50)
    s.idle_cpu_pct = server.get("idle_cpu_pct")
    s.idle_rows, s.idle_ms = server.get("idle_rows_total"), server.get("idle_ms_total")
    s.idle_steps, s.idle_steps_used = server.get("idle_steps"), server.get("idle_steps_used")
    return s


def _fresh(answer: dict, keys: list[dict]) -> bool:
    """No keystroke after the answer's own came before it arrived."""
    nxt = answer["key"] + 1
    return nxt >= len(keys) or keys[nxt]["at"] > answer["answered"]


# -- Markdown ------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def _no_decode(s: PacedSummary) -> str:
    if s.engine != OURS:
        return "n/a"  # baselines decode for every request
    if s.no_decode is None:
        return "n/a (server does not count it)"
    return f"{s.no_decode} of {s.server_requests}" if s.server_requests is not None else str(s.no_decode)


def markdown(paced_traces: list[dict], summaries: list[dict]) -> list[str]:
    out = []
    for t in paced_traces:
        rows = [PacedSummary(**s) for e in ORDER for s in summaries if s["engine"] == e and s["trace"] == t["name"]]
        if not rows:
            continue
        out += [f"**Typing pace: {t['name']}** ({_describe(t)})", "",
                "| engine | p50 ms | p90 ms | p99 ms | mean ms | answered without a decode | stale answers "
                "| CPU ms/key | peak RSS MB |" + (" switch back p50 ms |" if t["kind"] == "switching" else ""),
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if t["kind"] == "switching" else "")]
        for s in rows:
            if s.status != "ok":
                out.append(f"| {s.engine} | {s.status}: {s.reason or ''} |||||||| ")
                continue
            missing = f" ({s.of_keys - s.keys} keys never answered)" if s.keys != s.of_keys else ""
            row = (f"| {s.engine}{missing} | {_f(s.p50_ms)} | {_f(s.p90_ms)} | {_f(s.p99_ms)} | {_f(s.mean_ms)} "
                   f"| {_no_decode(s)} | {s.stale} of {s.requests} | {_f(s.cpu_ms_per_key, 0)} "
                   f"| {_f(s.peak_rss_mb, 0)} |")
            if t["kind"] == "switching":
                row += f" {_f(s.switch_back_p50_ms)} ({s.switch_backs}) |"
            out.append(row)
        ours = next((s for s in rows if s.engine == OURS and s.status == "ok"), None)
        if ours:
            out += ["", f"lsp-llm server: CPU 1-2 s after the last answer {_f(ours.idle_cpu_pct)}% of a core; "
                    f"idle-time work {_opt(ours.idle_ms)} ms, {_opt(ours.idle_rows)} rows decoded, "
                    f"{_opt(ours.idle_steps)} greedy steps prepared, {_opt(ours.idle_steps_used)} of them used."]
        out.append("")
    if out:
        out = [*_legend(), "", *out]
    return out


def _opt(x: float | None) -> str:
    return "n/a" if x is None else _f(float(x), 0)


def _describe(t: dict) -> str:
    p = t.get("pace") or asdict(pace.TYPING)
    ms = "-".join(f"{x * 1000:.0f}" for x in p["key"])
    line = "-".join(f"{x * 1000:.0f}" for x in p["line"])
    switch = "-".join(f"{x:.0f}" for x in p["switch"])
    files = f"{len(t['files'])} files, ~{t['doc_tokens']:,} tokens before the cursor each"
    return (f"{files}; {t['keys']} keystrokes, {t['switches']} file switches; {ms} ms between keys, "
            f"{line} ms at a new line, {switch} s at a switch; {t['duration_s']:.0f} s of typing")


def _legend() -> list[str]:
    return ["Latency at a human pace: each keystroke is `didChange` plus a completion request at its time on "
            "the trace's clock, answered or not; a request still running at the next keystroke is cancelled. "
            "A keystroke's latency runs to the first *fresh* answer after it (one that arrives before the next "
            "keystroke); engines that serve one request at a time get the newest text when free (floor: the "
            "decode of the changed tokens plus the greedy extension). CPU ms/key: the engine's process CPU over "
            "the trace divided by its keystrokes. Answered without a decode: the server's own count "
            "(`no_decode_total` of `requests_total` in `lsp-llm.stats`), n/a where it does not count it."]
