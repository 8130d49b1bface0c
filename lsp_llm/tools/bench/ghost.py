"""Ghost text latency through the real server (``lsp-llm bench --ghost``).

**At a typing pace.** Retype lines of a stdlib file (``GHOST_MODULES``) key
by key at the bench's typing pace (``pace.TYPING``: 120-250 ms a key,
400-900 ms at a new line), as VS Code sends requests: after each keystroke a
``didChange``, then ``textDocument/inlineCompletion`` and
``textDocument/completion`` together (in that order). Per keystroke: the inline answer's
latency (request sent to answer received), whether it shows text, and
whether the server answered it by type-through (its ``type_through``
counter in ``lsp-llm.stats`` grew). Targets: p50 at most 50 ms; type-through
answers at most 10 ms.

**Depth where nothing was prepared.** At cut points right after a
``def ...:`` line (the cursor at the body's indentation, the body's first
line removed) a fresh server reads the text before the cut point (a
completion request there, as an editor sends when the cursor arrives; the
idle work it starts may prepare a few steps), the indentation is typed, and
the editor asks for ghost text and asks again every 250 ms with the same
text, as a client polling would. When does the suggestion show its first line, and 4 lines
(``inlineLines`` 4 for this measurement)? Target: 4 lines within 1.5 s.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

from ..client import StdioServer, inline_items, inline_text
from . import pace
from .engines import Settings
from .report import pct
from .traces import Keystroke, apply_edit, read_source, stdlib_dir

GHOST_MODULES = (("sched.py", 100), ("queue.py", 150))  # file, first line retyped
POLL_S = 0.25  # a polling client asks again this often
DEPTH_S = 4.0  # and gives up after this long
DEPTH_LINES = 4


@dataclass
class TypingRow:
    file: str
    keys: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    shown: int  # answers with a suggestion
    type_through: int  # answers the server gave by type-through
    type_through_p50_ms: float
    type_through_p90_ms: float
    model: int  # the other answers: they needed the engine
    model_p50_ms: float


@dataclass
class DepthRow:
    file: str
    line: int  # the cut point (1-based)
    first_line_ms: float | None  # until the suggestion showed a line
    lines_ms: float | None  # until it showed DEPTH_LINES lines
    ready_ms: float | None  # until it showed what it shows at the end (all of it: up to DEPTH_LINES lines)
    lines: int  # lines it showed at the end


async def _ghost(editor: StdioServer, uri: str, text: str, pos: tuple[int, int], timeout: float) -> str:
    items = inline_items(await asyncio.wait_for(editor.inline(uri, text, pos).future, timeout))
    return inline_text(items[0]) if items else ""


async def typing(s: Settings, name: str, first: int, count: int, seed: int) -> TypingRow:
    """Retype count lines of a stdlib file from line first, at a typing pace."""
    lines = read_source(stdlib_dir() / name)
    typed = "\n".join(lines[first : first + count])
    text = "\n".join([*lines[:first], "", *lines[first + count :]])
    editor = await StdioServer.launch(s.command(quiet=True), {"readBudgetMs": 600000}, s.timeout_s)
    uri = f"file:///bench/ghost/{name}"
    keys = [Keystroke(0, (0, 0), (0, 0), ch, (0, 0), "enter" if ch == "\n" else "type") for ch in typed]
    lat, kinds, shown = [], [], 0
    try:
        editor.open(uri, text)
        row, col = first, 0
        await asyncio.wait_for(editor.complete(uri, text, (row, col)).future, s.timeout_s)  # the read
        before = 0
        for ch, wait in zip(typed, pace.delays(keys, seed)):
            editor.change(uri, text, (row, col), (row, col), ch)
            text = apply_edit(text, (row, col), (row, col), ch)
            row, col = (row + 1, 0) if ch == "\n" else (row, col + 1)
            t0 = time.perf_counter()
            inline = editor.inline(uri, text, (row, col))
            popup = editor.complete(uri, text, (row, col))
            items = inline_items(await asyncio.wait_for(inline.future, s.timeout_s))
            lat.append((time.perf_counter() - t0) * 1000)
            ghost = inline_text(items[0]) if items else ""
            shown += bool(ghost.strip())
            now = (await editor.stats(uri)).get("inline", {}).get("type_through", 0) or 0
            kinds.append(now > before)
            before = now
            await asyncio.wait_for(popup.future, s.timeout_s)
            await asyncio.sleep(max(0.0, wait - (time.perf_counter() - t0)))
    finally:
        await editor.stop()
    through = [x for x, k in zip(lat, kinds) if k]
    model = [x for x, k in zip(lat, kinds) if not k]
    return TypingRow(name, len(lat), pct(lat, 50), pct(lat, 90), pct(lat, 99), shown, len(through),
                     pct(through, 50), pct(through, 90), len(model), pct(model, 50))


def def_cuts(lines: list[str], n: int) -> list[int]:
    """The first body lines of n functions (skipping the first two)."""
    return [i + 1 for i, x in enumerate(lines) if x.lstrip().startswith("def ") and x.rstrip().endswith(":")][2 : 2 + n]


async def depth(s: Settings, name: str, row: int) -> DepthRow:
    """Ask again and again at a cut point after a def line: when do 1 and DEPTH_LINES lines show?"""
    lines = read_source(stdlib_dir() / name)
    indent = lines[row][: len(lines[row]) - len(lines[row].lstrip())]
    text = "\n".join([*lines[:row], indent, *lines[row + 1 :]])
    options = {"readBudgetMs": 600000, "inlineLines": DEPTH_LINES}
    editor = await StdioServer.launch(s.command(quiet=True), options, s.timeout_s)
    uri = f"file:///bench/ghost/depth/{name}"
    first: float | None = None
    deep: float | None = None
    seen: list[tuple[float, str]] = []  # (seconds, suggestion) at each answer
    try:
        bare = "\n".join([*lines[:row], "", *lines[row + 1 :]])
        editor.open(uri, bare)
        # the text before the cut point is read (a completion there, as an editor sends when the cursor
        # arrives; it starts idle work), then the indentation is typed: the last keystroke
        await asyncio.wait_for(editor.complete(uri, bare, (row, 0)).future, s.timeout_s)
        editor.change(uri, bare, (row, 0), (row, 0), indent)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < DEPTH_S and not _settled(seen):
            g = await _ghost(editor, uri, text, (row, len(indent)), s.timeout_s)
            elapsed = time.perf_counter() - t0
            seen.append((elapsed, g))
            first = elapsed if first is None and g.strip() else first
            if _lines(g) >= DEPTH_LINES:
                deep = elapsed
                break
            await asyncio.sleep(POLL_S)
    finally:
        await editor.stop()
    final = seen[-1][1] if seen else ""
    ready = next((x for x, g in seen if g == final), None) if final.strip() else None
    return DepthRow(name, row + 1, _to_ms(first), _to_ms(deep), _to_ms(ready), _lines(final))


def _lines(suggestion: str) -> int:
    return suggestion.count("\n") + 1 if suggestion.strip() else 0


def _settled(seen: list[tuple[float, str]], polls: int = 4) -> bool:
    """The same suggestion (a shown one) in the last ``polls`` answers: it is complete."""
    last = [g for _, g in seen[-polls:]]
    return len(last) == polls and len(set(last)) == 1 and bool(last[0].strip())


def _to_ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def run_section(s: Settings, lines_typed: int, cuts: int, seed: int) -> dict:
    rows = [asyncio.run(typing(s, name, first, lines_typed, seed)) for name, first in GHOST_MODULES]
    deep = [asyncio.run(depth(s, name, row)) for name, _ in GHOST_MODULES
            for row in def_cuts(read_source(stdlib_dir() / name), cuts)]
    return {"lines_typed": lines_typed, "typing": [asdict(r) for r in rows], "depth": [asdict(r) for r in deep]}


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def markdown(g: dict) -> list[str]:
    out = [f"**Ghost text at a typing pace** (`textDocument/inlineCompletion` and `textDocument/completion` after "
           f"every keystroke, as VS Code sends them, retyping {g['lines_typed']} lines at the typing pace above)", "",
           "| file | keys | inline answer p50 / p90 / p99 ms | with a suggestion | type-through answers "
           "(p50 / p90 ms) | answers that needed the model (p50 ms) |", "|---|---:|---|---:|---|---:|"]
    for r in (TypingRow(**x) for x in g["typing"]):
        out.append(f"| `{r.file}` | {r.keys} | **{r.p50_ms:.1f}** / {r.p90_ms:.1f} / {r.p99_ms:.1f} | {r.shown} "
                   f"| {r.type_through} ({r.type_through_p50_ms:.1f} / {r.type_through_p90_ms:.1f}) "
                   f"| {r.model} ({r.model_p50_ms:.1f}) |")
    deep = [DepthRow(**x) for x in g["depth"]]
    reached = [r for r in deep if r.lines_ms is not None]
    out += ["", "**Ghost text where nothing was prepared** (a function body's first line, the text before it "
            f"just read; the editor asks every {POLL_S * 1000:.0f} ms; `inlineLines` {DEPTH_LINES}): "
            f"{len(reached)} of {len(deep)} cut points reached {DEPTH_LINES} lines, "
            f"{sum(r.lines_ms is not None and r.lines_ms <= 1500 for r in deep)} within 1.5 s; the whole "
            f"suggestion (up to {DEPTH_LINES} lines, the stop rules end the others) was shown within 1.5 s at "
            f"{sum(r.ready_ms is not None and r.ready_ms <= 1500 for r in deep)}", "",
            f"| cut point | first line ms | {DEPTH_LINES} lines ms | whole suggestion ms | lines |",
            "|---|---:|---:|---:|---:|"]
    out += [f"| `{r.file}`:{r.line} | {_ms(r.first_line_ms)} | {_ms(r.lines_ms)} | {_ms(r.ready_ms)} | {r.lines} |"
            for r in deep]
    return out + [""]
