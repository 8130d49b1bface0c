"""The scheduling section (``lsp-llm bench --scheduling``): what the user
waits for while the engine has other work.

- **First visits.** An editor restoring its tabs opens many files at once,
  then the user types in one of them. Each trial starts a fresh server, loads
  the model, opens ``files`` files of ~``doc_tokens`` tokens at the same
  moment and asks for items at the end of one of them (a different one each
  trial), asking again while the answer is empty (``readBudgetMs``), as
  editors do: the time to the first items.
- **A reload.** With a document read, a settings change reloads the model
  (``threads``: a new calibration too). Meanwhile the user keeps typing in
  the document: the latency of each completion until the new model serves,
  and of the first ones on the new model (the document was read ahead).

    lsp-llm bench --scheduling --readme docs/benchmarks.md
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lsprotocol import types as t

from ...config import Settings
from ..client import StdioServer, completion_items, server_command
from .report import pct
from .served import replace_block
from .traces import TokenCounter

MARKERS = ("<!-- bench-scheduling:start -->", "<!-- bench-scheduling:end -->")
QUICK = {"visit_trials": 5, "visit_files": 8, "visit_doc_tokens": 400, "reload_keys": 400}
FULL = {"visit_trials": 10, "visit_files": 8, "visit_doc_tokens": 400, "reload_keys": 800}
AFTER_SWAP_KEYS = 10  # completions measured on the new model
KEY_S = 0.18  # between keystrokes during the reload
ASK_S = 120.0  # the longest a single answer may take
READ_BUDGET_S = Settings().read_budget_ms / 1000  # an empty answer after this long: the read goes on


@dataclass
class Visit:
    trial: int
    file: str
    of_files: int
    ms: float  # from the opens to the first items
    asks: int  # requests it took (the first ones answered empty while the file was read)
    items: int  # in the answer


@dataclass
class Reload:
    keys: int = 0  # completions asked while the new model loaded
    latencies_ms: list[float] = field(default_factory=list)
    with_items: int = 0
    reload_s: float = math.nan  # from the settings change to the new model serving
    after_ms: list[float] = field(default_factory=list)  # the completions after the swap, on the new model
    after_with_items: int = 0


def prefix_of(text: str, tokens: int, count: TokenCounter) -> str:
    """The first lines of text holding about ``tokens`` tokens."""
    lines, out = text.splitlines(keepends=True), ""
    for line in lines:
        if out and count(out + line) > tokens:
            return out + line[: len(line) - len(line.lstrip()) + 3]  # into the next line's first word
        out += line
    return out


async def items_of(server: StdioServer, uri: str, text: str) -> tuple[float, int, int]:
    """Ask at the end of text until the answer is the read document's, not
    an empty one past ``readBudgetMs``: (ms, requests, items)."""
    t0, asks = time.perf_counter(), 0
    while True:
        asks += 1
        sent = time.perf_counter()
        result = await asyncio.wait_for(server.complete(uri, text, _end(text)).future, ASK_S)
        items = len(completion_items(result))
        if items or time.perf_counter() - sent < READ_BUDGET_S * 0.9:
            return (time.perf_counter() - t0) * 1000, asks, items
        if time.perf_counter() - t0 > ASK_S:
            raise TimeoutError(f"no answer for {uri} in {ASK_S:.0f} s")


async def _loaded(server: StdioServer) -> None:
    """The model loaded (and calibrated): the trials measure the scheduler, not the load."""
    t0 = time.perf_counter()
    while (await server.stats()).get("model") in (None, "(loading)"):
        if time.perf_counter() - t0 > ASK_S:
            raise TimeoutError(f"the model did not load in {ASK_S:.0f} s")
        await asyncio.sleep(0.1)


async def first_visit(cmd: list[str], texts: list[tuple[str, str]], trial: int) -> Visit:
    server = StdioServer(cmd)
    try:
        await server.start()
        await _loaded(server)
        for uri, text in texts:
            server.open(uri, text)
        uri, text = texts[(trial * 3 + 5) % len(texts)]  # not always the first or the last one opened
        ms, asks, items = await items_of(server, uri, text)
        return Visit(trial, uri.rsplit("/", 1)[-1], len(texts), round(ms, 1), asks, items)
    finally:
        await server.stop()


async def during_reload(cmd: list[str], uri: str, text: str, keys: int) -> Reload:
    server = StdioServer(cmd)
    out = Reload()
    try:
        await server.start()
        await _loaded(server)
        server.open(uri, text)
        await items_of(server, uri, text)
        server.client.workspace_did_change_configuration(t.DidChangeConfigurationParams(
            settings={"lsp-llm": {"threads": 1}}))  # a reload (and a calibration: another thread count)
        t0 = time.perf_counter()
        typed, after = text, 0
        for i in range(keys):
            if math.isnan(out.reload_s) and i and not (await server.stats()).get("loading"):
                out.reload_s = time.perf_counter() - t0
            if not math.isnan(out.reload_s) and (after := after + 1) > AFTER_SWAP_KEYS:
                break
            server.change(uri, typed, _end(typed), _end(typed), "x")
            typed += "x"
            s0 = time.perf_counter()
            result = await asyncio.wait_for(server.complete(uri, typed, _end(typed)).future, ASK_S)
            ms, items = round((time.perf_counter() - s0) * 1000, 1), bool(completion_items(result))
            if math.isnan(out.reload_s):
                out.latencies_ms.append(ms)
                out.with_items += items
                out.keys += 1
            else:
                out.after_ms.append(ms)
                out.after_with_items += items
            await asyncio.sleep(KEY_S)
        return out
    finally:
        await server.stop()


def _end(text: str) -> tuple[int, int]:
    return text.count("\n"), len(text) - (text.rfind("\n") + 1)


def run_section(model: str | None, threads: int, files: list[Path], cfg: dict[str, Any],
                count: TokenCounter, log: Any) -> dict[str, Any]:
    cmd = server_command(model, threads)
    picked = files[: cfg["visit_files"]]
    texts = [(f"file:///bench/{p.name}", prefix_of(p.read_text(), cfg["visit_doc_tokens"], count)) for p in picked]
    visits = []
    for trial in range(cfg["visit_trials"]):
        v = asyncio.run(first_visit(cmd, texts, trial))
        log(f"  first visit {trial + 1}: {v.file} {v.ms:,.0f} ms ({v.asks} asks, {v.items} items)")
        visits.append(v)
    uri, text = texts[0]
    reload = asyncio.run(during_reload(cmd, uri, text, cfg["reload_keys"]))
    log(f"  during a reload: {reload.keys} completions, max {max(reload.latencies_ms, default=math.nan):,.0f} ms; "
        f"after the swap: {reload.after_ms}")
    return {"visits": [asdict(v) for v in visits], "reload": asdict(reload),
            "doc_tokens": cfg["visit_doc_tokens"], "files": len(picked)}


def markdown(res: dict[str, Any]) -> list[str]:
    visits = [Visit(**v) for v in res["visits"]]
    ms = [v.ms for v in visits]
    r = Reload(**res["reload"])
    out = [f"**First visits** ({res['files']} files of ~{res['doc_tokens']} tokens opened at the same moment, "
           f"then items asked at the end of one of them; a fresh server per trial, the model loaded first; "
           "asked again while the answer is empty, as editors do)", "",
           "| trial | file | ms to the first answer after the read | requests | items |", "|---:|---|---:|---:|---:|"]
    out += [f"| {v.trial + 1} | {v.file} | {v.ms:,.0f} | {v.asks} | {v.items} |" for v in visits]
    out += ["", f"Median {statistics.median(ms):,.0f} ms, max {max(ms):,.0f} ms (target: median ≤ 1,200 ms).", ""]
    lat = r.latencies_ms
    out += [f"**During a reload** (a document read, then `threads` changed: the new model loads and calibrates "
            f"beside the serving one; a keystroke and a completion every {KEY_S * 1000:.0f} ms meanwhile)", "",
            f"{r.keys} completions in {r.reload_s:,.1f} s of reload, {r.with_items} with items: "
            f"p50 {pct(lat, 50):,.0f} ms, p90 {pct(lat, 90):,.0f} ms, max {max(lat, default=math.nan):,.0f} ms "
            "(target: every one within 1,000 ms).", ""]
    if r.after_ms:  # (results from before the read-ahead have none)
        out += [f"Then, on the new model (the document read ahead before the swap): {len(r.after_ms)} completions, "
                f"{r.after_with_items} with items: first {r.after_ms[0]:,.0f} ms, "
                f"max {max(r.after_ms):,.0f} ms.", ""]
    return out


def update_readme(readme: Path, res: dict[str, Any]) -> str:
    text = replace_block(readme.read_text(), MARKERS, "\n".join(markdown(res)),
                         f"lsp-llm bench --scheduling --readme {readme.name}")
    if text is None:
        return f"{readme} has no {' ... '.join(MARKERS)} markers; left unchanged"
    readme.write_text(text)
    return f"updated the scheduling block of {readme}"
