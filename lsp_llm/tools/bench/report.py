"""Statistics, targets, the Markdown table and the PNG plot."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

OURS = "lsp-llm"
ORDER = ("lsp-llm", "floor", "llama-server", "llama-cpp-python", "naive")


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (q in 0..100); nan when empty."""
    v = sorted(x for x in values if x is not None and not math.isnan(x))
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _ms(keys: list[dict], field: str = "latency_s") -> list[float]:
    if field == "latency_s":
        return [k["latency_s"] * 1000 for k in keys]
    return [float(k[field]) for k in keys if k.get(field) is not None]


def summarize(run: dict) -> dict:
    keys = run.get("keys", [])
    lat = _ms(keys)
    s = {
        "engine": run["engine"],
        "trace": run["trace"],
        "status": run["status"],
        "reason": run.get("reason"),
        "n": len(keys),
        "of_keys": run.get("of_keys"),
        "p50_ms": pct(lat, 50),
        "p95_ms": pct(lat, 95),
        "max_ms": max(lat) if lat else float("nan"),
        "mean_ms": sum(lat) / len(lat) if lat else float("nan"),
        "tokens_per_key": (sum(k.get("tokens", 0) for k in keys) / len(keys)) if keys else float("nan"),
        "tokens_p50": pct([k.get("tokens", 0) for k in keys], 50),
        "cpu_s": run.get("cpu_s"),
        "cpu_ms_per_key": (run.get("cpu_s", 0) * 1000 / len(keys)) if keys else float("nan"),
        "wall_s": run.get("wall_s"),
        "open_s": run.get("open_s"),
        "peak_rss_mb": (run.get("peak_rss") or 0) / 2**20,
    }
    if run["engine"] == OURS:
        s["feed_ms_p50"] = pct(_ms(keys, "feed_ms"), 50)
        s["generate_ms_p50"] = pct(_ms(keys, "generate_ms"), 50)
        s["server_ms_p50"] = pct(_ms(keys, "server_ms"), 50)
        overhead = [k["latency_s"] * 1000 - k["server_ms"] for k in keys if k.get("server_ms") is not None]
        s["overhead_ms_p50"] = pct(overhead, 50)
        ready = [k["latency_s"] * 1000 - k["generate_ms"] for k in keys if k.get("generate_ms") is not None]
        s["ready_ms_p50"] = pct(ready, 50)  # keystroke -> candidates' first tokens ready
        s["fed_p50"] = pct(_ms(keys, "fed"), 50)
        s["generated_p50"] = pct(_ms(keys, "generated"), 50)
        s["empty_answers"] = sum(1 for k in keys if not k.get("items"))
    if run["engine"] == "floor":
        s["ext_ms_p50"] = pct(_ms(keys, "ext_ms"), 50)
    return s


def _get(summaries: list[dict], engine: str, trace: str) -> dict | None:
    for s in summaries:
        if s["engine"] == engine and s["trace"] == trace and s["status"] == "ok" and s["n"]:
            return s
    return None


def evaluate_targets(results: dict) -> list[dict]:
    """The issue's targets, each with the figures it was judged on."""
    S = results["summaries"]
    runs = {(r["engine"], r["trace"]): r for r in results["runs"]}
    traces = results["traces"]
    multi = next((t["name"] for t in traces if t["kind"] == "multi"), None)
    sweep = sorted((t for t in traces if t["kind"] == "sweep"), key=lambda t: t["size"])
    out = []

    def add(name: str, passed: bool | None, detail: str) -> None:
        out.append({"target": name, "pass": passed, "detail": detail})

    # 1. p50 <= 1.5 x floor + word extension, per keystroke
    for tname in [multi] if multi else []:
        ours, floor = runs.get((OURS, tname)), runs.get(("floor", tname))
        so, sf = _get(S, OURS, tname), _get(S, "floor", tname)
        if not (so and sf):
            add("p50 <= 1.5x floor + word extension", None, "needs lsp-llm and floor results")
            continue
        fl = {k["i"]: k for k in floor["keys"]}
        bounds, ext_src = [], "lsp-llm generate_ms"
        for k in ours["keys"]:
            f = fl.get(k["i"])
            if f is None:
                continue
            ext = k.get("generate_ms")
            if ext is None:
                ext, ext_src = f.get("ext_ms", 0.0), "floor's greedy ext_ms"
            bounds.append(1.5 * f["latency_s"] * 1000 + ext)
        bound = pct(bounds, 50)
        add(
            "p50 <= 1.5x floor + word extension",
            so["p50_ms"] <= bound,
            f"ours p50 {so['p50_ms']:.1f} ms vs bound p50 {bound:.1f} ms (floor p50 {sf['p50_ms']:.1f} ms, "
            f"extension from {ext_src}); ours split (p50): everything but the extension "
            f"{so.get('ready_ms_p50', float('nan')):.1f} ms vs 1.5x floor {1.5 * sf['p50_ms']:.1f} ms, "
            f"word extension {so.get('generate_ms_p50', float('nan')):.1f} ms",
        )
    # 2. >= 30x naive at 2000, growing
    ratios = []
    for t in sweep:
        so, sn = _get(S, OURS, t["name"]), _get(S, "naive", t["name"])
        if so and sn:
            ratios.append((t["size"], sn["p50_ms"] / so["p50_ms"]))
    at2000 = [r for sz, r in ratios if sz == 2000]
    if at2000:
        growing = all(b[1] >= a[1] * 0.9 for a, b in zip(ratios, ratios[1:]))
        add(">= 30x faster than naive at 2,000 tokens, growing with size",
            at2000[0] >= 30 and growing,
            ", ".join(f"{sz}: {r:.1f}x" for sz, r in ratios) + ("" if growing else " (not growing)"))
    else:
        add(">= 30x faster than naive at 2,000 tokens, growing with size", None, "needs a 2,000-token sweep "
            "with lsp-llm and naive")
    # 3. >= 5x llama-cpp-python on the multi-file trace (mean: its cost is in the switches)
    if multi:
        so, sl = _get(S, OURS, multi), _get(S, "llama-cpp-python", multi)
        if so and sl:
            r = sl["mean_ms"] / so["mean_ms"]
            add(">= 5x faster than llama-cpp-python (single slot) on the 3-file trace", r >= 5,
                f"mean {sl['mean_ms']:.1f} vs {so['mean_ms']:.1f} ms = {r:.1f}x; "
                f"p50 {sl['p50_ms'] / so['p50_ms']:.1f}x, p95 {sl['p95_ms'] / so['p95_ms']:.1f}x")
        else:
            add(">= 5x faster than llama-cpp-python (single slot) on the 3-file trace", None,
                "needs lsp-llm and llama-cpp-python results")
    # 4. at least as fast as llama-server everywhere
    cells, ok = [], True
    for t in traces:
        so, ss = _get(S, OURS, t["name"]), _get(S, "llama-server", t["name"])
        if not (so and ss):
            continue
        good = so["p50_ms"] <= ss["p50_ms"] and so["mean_ms"] <= ss["mean_ms"]
        ok &= good
        cells.append(f"{t['name']}: p50 {so['p50_ms']:.1f} vs {ss['p50_ms']:.1f}, "
                     f"mean {so['mean_ms']:.1f} vs {ss['mean_ms']:.1f} ms")
    if cells:
        add("at least as fast as llama-server cache_prompt on every trace", ok, "; ".join(cells))
    else:
        reason = next((r.get("reason") for r in results["runs"] if r["engine"] == "llama-server"), None)
        add("at least as fast as llama-server cache_prompt on every trace", None,
            f"llama-server not measured: {reason or 'not selected'}")
    # 5. flat from the smallest to the largest size
    pts = [(t["size"], _get(S, OURS, t["name"])) for t in sweep]
    pts = [(sz, s) for sz, s in pts if s]
    if len(pts) >= 2:
        (s0, a), (s1, b) = pts[0], pts[-1]
        growth = b["p50_ms"] / a["p50_ms"]
        fa, fb = _get(S, "floor", sweep[0]["name"]), _get(S, "floor", sweep[-1]["name"])
        fgrowth = fb["p50_ms"] / fa["p50_ms"] if fa and fb else float("nan")
        add(f"nearly flat from {s0} to {s1} tokens (p50 growth <= 1.5x, or <= 1.25x the floor's)",
            growth <= 1.5 or (not math.isnan(fgrowth) and growth <= 1.25 * fgrowth),
            f"ours p50 {a['p50_ms']:.1f} -> {b['p50_ms']:.1f} ms ({growth:.2f}x); floor {fgrowth:.2f}x")
    return out


# -- Markdown ---------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def markdown(results: dict, plot_name: str | None = "bench.png", first: list[str] = (),
             last: list[str] = ()) -> str:
    """The report: header, the lines ``first`` (typing pace, memory), the
    back-to-back tables, the lines ``last`` (quality), targets and notes."""
    S = results["summaries"]
    m = results["machine"]
    st = results["settings"]
    lines = [
        f"### lsp-llm bench{' (quick)' if st.get('quick') else ''}",
        "",
        f"Model **{results['model']['name']}** ({results['model']['description']}, "
        f"{results['model']['size_mb']:.0f} MB); {st['threads']} threads; n_ctx {_n_ctx(results)}; "
        f"every engine generates up to {st['gen_tokens']} greedy tokens per request "
        f"(lsp-llm: lineTokens, plus its word items); seed {st['seed']}.  ",
        f"Machine: {m['cpu']} ({m['cores']} cores, {m['memory_gb']:.0f} GiB), {m['os']}; Python {m['python']}, "
        f"llama-cpp-python {m['llama_cpp_python']}; load average {m.get('loadavg', '?')} at the start, "
        f"{m.get('loadavg_end', '?')} at the end.  ",
        f"Run on {results['started']} in {results['elapsed_s']:.0f} s.",
        "",
        *first,
    ]
    if results["runs"]:
        lines += ["**Back to back** (the stress case: each keystroke as soon as the previous one is answered)", ""]
    for t in results["traces"]:
        rows = [s for e in ORDER for s in S if s["engine"] == e and s["trace"] == t["name"]]
        if not rows:
            continue
        desc = (f"{len(t['files'])} files, ~{t['doc_tokens']} tokens before the cursor each"
                if t["kind"] == "multi" else f"one file, {t['tokens_before_cursor']} tokens before the cursor")
        lines += [f"**Trace: {t['name']}** ({desc}; {t['keys']} keystrokes, {t['switches']} file switches)", ""]
        lines += ["| engine | p50 ms | p95 ms | max ms | mean ms | tokens/key | CPU s (ms/key) | peak RSS MB "
                  "| p50 vs lsp-llm |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        ours = _get(S, OURS, t["name"])
        for s in rows:
            if s["status"] != "ok" or not s["n"]:
                lines.append(f"| {s['engine']} | {s['status']}: {s.get('reason') or ''} |||||||| ")
                continue
            ratio = (f"{s['p50_ms'] / ours['p50_ms']:.1f}x" if ours and s["engine"] != OURS else "1x"
                     if s["engine"] == OURS else "–")
            sampled = f" ({s['n']} of {s['of_keys']} keys)" if s["n"] != s["of_keys"] else ""
            lines.append(
                f"| {s['engine']}{sampled} | {_f(s['p50_ms'])} | {_f(s['p95_ms'])} | {_f(s['max_ms'])} "
                f"| {_f(s['mean_ms'])} | {_f(s['tokens_per_key'])} | {_f(s['cpu_s'])} ({_f(s['cpu_ms_per_key'], 0)}) "
                f"| {_f(s['peak_rss_mb'], 0)} | {ratio} |")
        if ours and "feed_ms_p50" in ours:
            fl = _get(S, "floor", t["name"])
            lines += ["", f"lsp-llm split (p50): keystroke to first-token logits (edit, tokenize, feed, "
                      f"JSON-RPC) {_f(ours['ready_ms_p50'])} ms, word extension {_f(ours['generate_ms_p50'])} ms "
                      f"(server-side: feed in the request {_f(ours['feed_ms_p50'])} ms, request total "
                      f"{_f(ours['server_ms_p50'])} ms, outside it {_f(ours['overhead_ms_p50'])} ms); "
                      f"fed {_f(ours['fed_p50'], 0)} tokens, generated "
                      f"{_f(ours['generated_p50'], 0)}; empty answers {ours['empty_answers']}"
                      + (f"; ours/floor p50 {ours['p50_ms'] / fl['p50_ms']:.1f}x" if fl else "") + "."]
        lines.append("")
    sweep = sorted((t for t in results["traces"] if t["kind"] == "sweep"), key=lambda t: t["size"])
    if sweep:
        lines += ["**Latency vs document size** (p50 ms; same keystrokes)", "",
                  "| engine | " + " | ".join(f"{t['size']:,}" for t in sweep) + " |",
                  "|---|" + "---:|" * len(sweep)]
        for e in ORDER:
            cells = [_get(S, e, t["name"]) for t in sweep]
            if any(cells):
                lines.append(f"| {e} | " + " | ".join(_f(c["p50_ms"]) if c else "–" for c in cells) + " |")
        lines.append("")
    lines += list(last)
    if results["targets"]:
        lines += ["**Targets**", "", "| target | result | figures |", "|---|---|---|"]
        for t in results["targets"]:
            mark = {True: "pass", False: "**miss**", None: "not measured"}[t["pass"]]
            lines.append(f"| {t['target']} | {mark} | {t['detail']} |")
        lines.append("")
    notes = list(results.get("notes", [])) + contention_notes(results)
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if plot_name:
        lines += [f"![lsp-llm bench]({plot_name})", ""]
    return "\n".join(lines)


def _n_ctx(results: dict) -> str:
    st = results["settings"]
    parts = [f"{st['pace_n_ctx']} at typing pace"] if st.get("pace_n_ctx") else []
    parts += [f"{st['n_ctx']} back to back"] if results["runs"] else []
    return ", ".join(parts) or str(st["n_ctx"])


def contention_notes(results: dict) -> list[str]:
    """Runs during which other processes competed for the CPU (1-minute load
    average above cores + 1 at their end): their latencies are inflated."""
    cores = results["machine"].get("cores") or 1
    busy = [f"{r['engine']} on {r['trace']} (load {r['loadavg_end'][0]:.1f})" for r in results["runs"]
            if r.get("loadavg_end") and r["loadavg_end"][0] > cores + 1]
    if not busy:
        return []
    return [f"Other processes competed for the {cores} cores during: {', '.join(busy)}; "
            "those latencies are inflated. Rerun on an idle machine for figures to quote."]


def profile_summary(path: str | Path, top: int = 8) -> str | None:
    """One line from a py-spy speedscope profile: where the busiest thread
    spends its time (inclusive, lsp_llm functions and llama.cpp entry points)."""
    import collections
    import json

    try:
        data = json.loads(Path(path).read_text())
        frames = data["shared"]["frames"]
        profiles = data["profiles"]
    except (OSError, ValueError, KeyError):
        return None
    best = max(profiles, key=lambda p: sum(w for s, w in zip(p["samples"], p["weights"])
                                           if s and frames[s[-1]]["name"] not in ("epoll_wait", "read")),
               default=None)
    if best is None:
        return None
    total = sum(best["weights"]) or 1.0
    inc: collections.Counter = collections.Counter()
    for stack, w in zip(best["samples"], best["weights"]):
        seen = set()
        for i in stack:
            f = frames[i]
            name = f["name"]
            if "lsp_llm" in (f.get("file") or "") or name.startswith(("llama_decode", "llama_get_logits")):
                label = f"{name} ({Path(f.get('file') or '').name})" if f.get("file") else name
                if label not in seen:
                    seen.add(label)
                    inc[label] += w
    parts = [f"{label} {100 * w / total:.0f}%" for label, w in inc.most_common(top)]
    return f"thread {best['name'].strip() or '?'} ({total:.1f} s sampled): " + ", ".join(parts)


# -- plot ------------------------------------------------------------------------------------

COLORS = {"lsp-llm": "tab:blue", "floor": "black", "llama-server": "tab:green",
          "llama-cpp-python": "tab:orange", "naive": "tab:red"}


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = {(r["engine"], r["trace"]): r for r in results["runs"] if r["status"] == "ok" and r.get("keys")}
    traces = results["traces"]
    multi = next((t for t in traces if t["kind"] == "multi"), None)
    sweep = sorted((t for t in traces if t["kind"] == "sweep"), key=lambda t: t["size"])
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    ax = axes[0]
    if multi:
        for e in ORDER:
            r = runs.get((e, multi["name"]))
            if not r:
                continue
            v = sorted(_ms(r["keys"]))
            ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", color=COLORS[e], label=e)
        ax.set_xscale("log")
        ax.set_xlabel("keystroke-to-completion latency (ms, log)")
        ax.set_ylabel("fraction of keystrokes")
        ax.set_title(f"Latency CDF: {multi['name']} trace")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax = axes[1]
    for e in ORDER:
        pts = [(t["tokens_before_cursor"], runs.get((e, t["name"]))) for t in sweep]
        pts = [(x, r) for x, r in pts if r]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        ax.plot(xs, [pct(_ms(r["keys"]), 50) for _, r in pts], "o-", color=COLORS[e], label=f"{e} p50")
        ax.plot(xs, [pct(_ms(r["keys"]), 95) for _, r in pts], ":", color=COLORS[e], alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens before the cursor (log)")
    ax.set_ylabel("latency ms (log); dotted: p95")
    ax.set_title("Latency vs document size")
    ax.grid(True, which="both", alpha=0.3)
    if sweep:
        ax.legend(fontsize=8)
    ax = axes[2]
    if multi:
        for e in ORDER:
            r = runs.get((e, multi["name"]))
            if not r:
                continue
            style = "o" if len(r["keys"]) < 0.5 * r["of_keys"] else "-"
            ax.plot([k["i"] for k in r["keys"]], _ms(r["keys"]), style, color=COLORS[e], label=e, lw=0.8, ms=4)
        anchor = next((r for (e, t), r in runs.items() if t == multi["name"] and r["of_keys"] == len(r["keys"])),
                      None)
        if anchor:
            prev = None
            for k in anchor["keys"]:
                if prev is not None and k["doc"] != prev:
                    ax.axvline(k["i"], color="grey", alpha=0.3, lw=0.8)
                prev = k["doc"]
        ax.set_yscale("log")
        ax.set_xlabel("keystroke (grey lines: switch to another file)")
        ax.set_ylabel("latency ms (log)")
        ax.set_title(f"Per-keystroke timeline: {multi['name']} trace")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"lsp-llm bench: {results['model']['name']}, {results['settings']['threads']} threads, "
                 f"{results['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- README ------------------------------------------------------------------------------------

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_readme(readme: Path, md: str, png: Path | None, results_json: Path) -> str:
    """Replace the text between the bench markers in readme (docs/benchmarks.md)
    with the table, and copy the plot to docs/bench.png: beside readme when it
    lives in docs/, else in the docs/ folder next to it; the image link is
    relative to readme."""
    text = readme.read_text()
    if START not in text or END not in text:
        return f"{readme} has no {START} ... {END} markers; left unchanged"
    plot_ref = None
    in_docs = readme.resolve().parent.name == "docs"
    target = readme.parent / "bench.png" if in_docs else readme.parent / "docs" / "bench.png"
    if png is not None and png.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
        plot_ref = "bench.png" if in_docs else "docs/bench.png"
    body = md.replace("![lsp-llm bench](bench.png)", f"![lsp-llm bench]({plot_ref})" if plot_ref else "")
    try:
        shown = readme.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        shown = readme.name
    stamp = f"<!-- generated by `lsp-llm bench --readme {shown}`; do not edit by hand -->"
    block = f"{START}\n{stamp}\n\n{body}\n{END}"
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _m: block, text, flags=re.S)
    readme.write_text(new)
    return f"updated {readme}" + (f" and {target}" if plot_ref else "")
