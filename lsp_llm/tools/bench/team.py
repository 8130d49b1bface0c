"""A team on one llama-server (``lsp-llm bench --team``): N typists (1, 2, 4),
each typing at the end of a file of its own at a typing pace (pace.py, its
own seed), each through its own lsp-llm server (``--engine-url``, as each
developer's editor runs one), all against one llama-server with N slots on
loopback (llama_host.py). They open their files, wait for each other, then
type at once.

Per N: p50/p90/p99 over every typist's keystrokes (to the first fresh answer,
paced.py), and what the engine counted over the typing (``/metrics``): prompt
tokens evaluated and tokens generated per keystroke, and the seconds it spent
on them. ``capacity`` turns the N = 1 row into how many developers one such
server serves, on paper.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from . import llama_host, pace, paced, remote, traces
from .engines import Settings, cpu_seconds
from .report import pct

QUICK = {"team_sizes": [1, 2], "team_doc_tokens": 300, "team_keystrokes": 20}
FULL = {"team_sizes": [1, 2, 4], "team_doc_tokens": 2000, "team_keystrokes": 120}
BUSY_SHARE = 0.5  # the engine kept at most half busy: room for bursts, latency stays near N = 1's


def typist_traces(files: list[Path], n: int, cfg: dict, seed: int, count: traces.TokenCounter) -> list[traces.Trace]:
    """Typist i types at the end of files[i] (round robin), with seed + i."""
    out = []
    for i in range(n):
        t = remote.end_trace(files[i % len(files)], cfg["team_doc_tokens"], cfg["team_keystrokes"], seed + i, count)
        out.append(remote.paced_trace(t, seed + i))
    return out


@dataclass
class TeamRow:
    typists: int
    status: str
    reason: str | None = None
    keys: int = 0  # keystrokes that got a fresh answer, all typists
    of_keys: int = 0
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    prompt_per_key: float = math.nan  # prompt tokens the engine evaluated per keystroke (/metrics)
    generated_per_key: float = math.nan  # ... generated
    prompt_s_per_key: float = math.nan  # the engine's seconds per keystroke on prompts (per slot, summed)
    generated_s_per_key: float = math.nan
    prompt_tps: float = math.nan  # its throughput while they typed, tokens/s
    generated_tps: float = math.nan
    bulk_prompt_tps: float = math.nan  # ... while it read the files when they were opened
    keys_per_s: float = math.nan  # one typist's pace, keystrokes per second of typing
    engine_cpu_ms_per_key: float = math.nan
    fed_per_key: float = math.nan  # lsp-llm's own count (fed_total), for comparison


def run_section(s: Settings, files: list[Path], cfg: dict, seed: int, count: traces.TokenCounter,
                out: Path) -> dict:
    missing = llama_host.available()
    rows = []
    for n in cfg["team_sizes"]:
        if missing:
            rows.append(TeamRow(n, "unavailable", missing))
            continue
        rows.append(run_team(s, typist_traces(files, n, cfg, seed, count), out))
    return {"settings": dict(cfg), "rows": [asdict(r) for r in rows]}


def run_team(s: Settings, ts: list[traces.Trace], out: Path) -> TeamRow:
    n = len(ts)
    log = out / "runs" / f"team-{n}.log"
    try:
        with llama_host.hosted(s.model, n, s.threads, s.n_ctx, log.with_suffix(".server.log")) as host:
            return asyncio.run(_team(s, ts, host, log))
    except Exception as e:  # noqa: BLE001 - a broken run is a result too
        return TeamRow(n, "error", f"{type(e).__name__}: {e} (log {log})")


async def _team(s: Settings, ts: list[traces.Trace], host: llama_host.Host, log: Path) -> TeamRow:
    ready, go = asyncio.Barrier(len(ts) + 1), asyncio.Event()

    async def gate() -> None:
        await ready.wait()
        await go.wait()

    meter = remote.Meter(host.url)
    try:
        typing = asyncio.gather(*(remote.lsp_typist(s, t, host.url, None, log.with_suffix(f".{i}.log"), gate, "shared")
                                  for i, t in enumerate(ts)))
        await ready.wait()
        await meter.idle()
        before, cpu0 = await meter.read(), cpu_seconds(host.pid)
        go.set()
        got = await typing
        await asyncio.sleep(remote.SETTLE_S)
        after, cpu = await meter.read(), cpu_seconds(host.pid) - cpu0
    finally:
        await meter.close()
    return row(ts, got, before, after, cpu)


def row(ts: list[traces.Trace], got: list[dict], before: dict[str, float], after: dict[str, float],
        cpu_s: float) -> TeamRow:
    lat = []
    for t, g in zip(ts, got):
        keys = paced.key_results(t, pace.schedule(t.meta["delays_s"]), g["answers"])
        lat += [k.latency_ms for k in keys if k.latency_ms is not None]
    n_keys = sum(len(t.keys) for t in ts)
    d = remote.totals(before, after)
    r = TeamRow(len(ts), "ok", keys=len(lat), of_keys=n_keys)
    r.p50_ms, r.p90_ms, r.p99_ms = pct(lat, 50), pct(lat, 90), pct(lat, 99)
    r.prompt_per_key, r.generated_per_key = d["prompt_tokens_total"] / n_keys, d["tokens_predicted_total"] / n_keys
    r.prompt_s_per_key = d["prompt_seconds_total"] / n_keys
    r.generated_s_per_key = d["tokens_predicted_seconds_total"] / n_keys
    r.prompt_tps = _ratio(d["prompt_tokens_total"], d["prompt_seconds_total"])
    r.generated_tps = _ratio(d["tokens_predicted_total"], d["tokens_predicted_seconds_total"])
    r.bulk_prompt_tps = _ratio(before.get(llama_host.PROMPT_TOTAL, 0), before.get(llama_host.PROMPT_SECONDS, 0))
    r.keys_per_s = sum(len(t.keys) / sum(t.meta["delays_s"]) for t in ts) / len(ts)
    r.engine_cpu_ms_per_key = cpu_s * 1000 / n_keys
    r.fed_per_key = sum(g["fed"] for g in got) / n_keys
    return r


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


# -- on paper -------------------------------------------------------------------------------------


def capacity(r: TeamRow) -> dict[str, float]:
    """Developers one server serves: each keystroke costs the engine P/tp + G/tg
    seconds (P prompt tokens at tp tokens/s, G generated at tg); a developer typing
    k keystrokes a second keeps it busy k times that."""
    engine_s = r.prompt_s_per_key + r.generated_s_per_key  # = P / tp + G / tg
    busy = r.keys_per_s * engine_s  # share of the engine one typing developer takes
    return {"engine_ms_per_key": engine_s * 1000, "busy_share": busy,
            "full": 1 / busy if busy > 0 else math.inf, "at_half": BUSY_SHARE / busy if busy > 0 else math.inf}


def paragraph(rows: list[TeamRow]) -> str:
    one = next((r for r in rows if r.typists == 1 and r.status == "ok"), None)
    if one is None or one.keys_per_s <= 0:
        return "How many developers one server serves: needs the N = 1 row."
    c = capacity(one)
    return (f"**How many developers one server serves, on paper** (from the N = 1 row): a keystroke costs the "
            f"engine {one.prompt_per_key:.1f} prompt tokens (at {_tps(one.prompt_tps)}) and "
            f"{one.generated_per_key:.1f} generated tokens (at {_tps(one.generated_tps)}), "
            f"{c['engine_ms_per_key']:.1f} ms of its time (llama-server's timings while typing; it read the "
            f"opened files at {_f(one.bulk_prompt_tps, 0)} tokens/s). A developer typing without pause makes "
            f"{one.keys_per_s:.1f} keystrokes/s, so keeps the engine {100 * c['busy_share']:.1f}% busy: "
            "one server serves about "
            f"**{c['full']:.0f}** developers typing at once at full load, **{c['at_half']:.0f}** with the engine at "
            f"most {100 * BUSY_SHARE:.0f}% busy. People type a fraction of the day, so more are served in "
            f"practice; slots batched in one decode cost less than their sum, so this is a lower bound for "
            f"typing, not counting reading files (a file is read once).")


def _tps(x: float) -> str:
    """A throughput; llama-server times a token sampled with the prompt (n_predict 0) at about 1 µs."""
    return "no measurable time" if math.isnan(x) or x > 1e5 else f"{x:,.0f} tokens/s"


def _shared_slots_note(rows: list[TeamRow]) -> list[str]:
    """When typists together cost the engine far more per keystroke than one alone."""
    one = next((r for r in rows if r.typists == 1 and r.status == "ok"), None)
    worse = [r for r in rows if one and r.typists > 1 and r.status == "ok"
             and r.prompt_per_key > 3 * max(1.0, one.prompt_per_key)]
    if not worse:
        return []
    return [f"With {', '.join(str(r.typists) for r in worse)} typists a keystroke costs the engine "
            f"{', '.join(_f(r.prompt_per_key) for r in worse)} prompt tokens against {_f(one.prompt_per_key)} "
            "alone: the servers evict each other's prompt caches on the engine's slots.", ""]


def _f(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def markdown(section: dict, plot_name: str | None) -> list[str]:
    rows = [TeamRow(**r) for r in section["rows"]]
    st = section["settings"]
    out = [f"**A team on one llama-server** (N typists, each at the end of a file of its own "
           f"(~{st['team_doc_tokens']:,} tokens before the cursor, {st['team_keystrokes']} keystrokes at a typing "
           "pace), each through its own lsp-llm server, one llama-server with N slots; tokens from `/metrics` "
           "over the typing)", "",
           "| typists | p50 ms | p90 ms | p99 ms | prompt tokens/key | generated/key | engine ms/key "
           "| engine CPU ms/key | lsp-llm fed/key |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.status != "ok":
            out.append(f"| {r.typists} | {r.status}: {r.reason or ''} ||||||||")
            continue
        missing = f" ({r.of_keys - r.keys} keys never answered)" if r.keys != r.of_keys else ""
        engine_ms = (r.prompt_s_per_key + r.generated_s_per_key) * 1000
        out.append(f"| {r.typists}{missing} | {_f(r.p50_ms)} | {_f(r.p90_ms)} | {_f(r.p99_ms)} "
                   f"| {_f(r.prompt_per_key)} | {_f(r.generated_per_key)} | {_f(engine_ms)} "
                   f"| {_f(r.engine_cpu_ms_per_key, 0)} | {_f(r.fed_per_key)} |")
    out += ["", *_shared_slots_note(rows), paragraph(rows), ""]
    if plot_name:
        out += [f"![a team on one llama-server]({plot_name})", ""]
    return out


def plot(section: dict, path: Path, title: str) -> Path | None:
    """p50/p90/p99 against N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [TeamRow(**r) for r in section["rows"] if r["status"] == "ok"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [r.typists for r in rows]
    for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(xs, [getattr(r, f"{q}_ms") for r in rows], style, label=q)
    ax.set_xticks(xs)
    ax.set_yscale("log")
    ax.set_xlabel("typists on one llama-server (one slot each)")
    ax.set_ylabel("keystroke-to-completion latency (ms, log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
