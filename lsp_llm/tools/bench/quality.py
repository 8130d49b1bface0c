"""Quality of suggestions, measured through the real server.

**Cut points.** Seeded lines of real code in stdlib files that no test, demo
or benchmark trace uses (``QUALITY_MODULES``). At each, the document is the
file with the rest of that line removed (the lines after it stay), and the
cursor sits where the line was cut: at its indentation, or after a word or
a symbol inside it. The *truth* is the removed rest of the line (at most
``max_chars`` characters, cut at a space).

**Next line.** The first line of the ghost text
(``textDocument/inlineCompletion``, first item) at the cut point, trailing
spaces removed, against the truth: exact match, and edit similarity
(``difflib.SequenceMatcher.ratio``, 1 = identical, 0 = nothing in common).

**Characters saved.** A simulated user types the truth character by
character. Before each keystroke the editor shows the ghost text and (in the
"popup + ghost" run) the top completion item; every keystroke is a
``didChange`` followed by the requests. If the ghost text's next word (spaces
then a run of word characters, or spaces then a run of symbols) is what the
user is about to type, the user accepts it with one keystroke; likewise the
top item, if what it inserts after the cursor is; the longer of the two
wins. Otherwise the user types one character. Saved = 1 - keystrokes /
characters of the truth.

**Baselines**, same model and token budget (lsp-llm's ``inlineTokens`` and
``lineTokens`` are set to it): llama-cpp-python's ``create_completion`` on
the text before the cursor (prefix only, greedy), its text as the ghost,
kept while the user types through it as llama.vim does; llama-server's
``/infill`` (prefix and suffix) when llama-server is installed.
"""

from __future__ import annotations

import asyncio
import difflib
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from lsprotocol import types as t

from ..client import StdioServer, completion_items, inline_items, inline_text
from ..editor_text import EditorText
from .engines import Settings, find_llama_server, load_llama
from .traces import Pos, TokenCounter, offset_of, read_source, stdlib_files

# stdlib modules that no test, the demo or a benchmark trace reads
QUALITY_MODULES = ("graphlib.py", "cmd.py", "csv.py", "string.py", "glob.py", "netrc.py")
ENGINES = ("lsp-llm", "llama-cpp-python", "llama-server /infill")


def quality_sources() -> list[Path]:
    return stdlib_files(QUALITY_MODULES)


@dataclass(frozen=True)
class Cut:
    path: str
    line: int
    col: int
    truth: str  # what the user is about to type: the rest of the line


def _code_lines(lines: list[str]) -> list[int]:
    """Lines of code: not comments, not inside triple-quoted strings, ASCII."""
    out, in_string = [], False
    for i, ln in enumerate(lines):
        quotes = ln.count('"""') + ln.count("'''")
        s = ln.strip()
        if not in_string and quotes == 0 and 8 <= len(s) <= 100 and ln.isascii() and not s.startswith("#"):
            out.append(i)
        if quotes % 2:
            in_string = not in_string
    return out


def _column(rng: random.Random, line: str) -> int:
    """At the indentation half of the time, else after a word or symbol."""
    indent = len(line) - len(line.lstrip())
    inside = [j for j in range(indent + 1, len(line) - 3) if not line[j - 1].isalnum() or not line[j].isalnum()]
    return indent if not inside or rng.random() < 0.5 else rng.choice(inside)


def _truth(rest: str, max_chars: int) -> str:
    if len(rest) <= max_chars:
        return rest
    space = rest.rfind(" ", 0, max_chars + 1)
    return rest[: space if space > 0 else max_chars]


def cut_points(path: Path, n: int, seed: int, count: TokenCounter, max_chars: int,
               min_tokens: int = 150, max_tokens: int = 3000) -> list[Cut]:
    """n seeded cut points with min_tokens..max_tokens of text before them, in file order."""
    lines = read_source(path)
    rng = random.Random(f"quality-{seed}-{path.name}")
    ok = [i for i in _code_lines(lines) if min_tokens <= count("\n".join(lines[:i])) <= max_tokens]
    cuts = []
    for i in sorted(rng.sample(ok, min(n, len(ok)))):
        col = _column(rng, lines[i])
        cuts.append(Cut(str(path), i, col, _truth(lines[i][col:].rstrip(), max_chars)))
    return cuts


def cut_text(lines: list[str], cut: Cut) -> str:
    return "\n".join([*lines[: cut.line], lines[cut.line][: cut.col], *lines[cut.line + 1 :]])


# -- metrics -------------------------------------------------------------------------------------


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if a or b else 1.0


WORD = re.compile(r"\s*(\w+|[^\w\s]+)")


def next_word(text: str) -> str:
    m = WORD.match(text)
    return m.group(0) if m else ""


@dataclass
class Typing:
    chars: int  # characters of the truth
    keystrokes: int
    from_ghost: int  # characters accepted from the ghost text
    from_popup: int  # ... from the top completion item


class Suggester(Protocol):
    """What the simulated user sees at the cursor of the current text."""

    async def goto(self, text: str, pos: Pos) -> None: ...

    async def insert(self, s: str) -> None: ...

    async def ghost(self) -> str: ...

    async def popup(self) -> str: ...


async def simulate(s: Suggester, truth: str, use_popup: bool) -> tuple[Typing, str]:
    """Type the truth, accepting ghost words (and popup items); return the
    counts and the first ghost text shown."""
    done, keys, ghost_chars, popup_chars, first = 0, 0, 0, 0, None
    while done < len(truth):
        rest = truth[done:]
        ghost = await s.ghost()
        first = ghost if first is None else first
        word = next_word(ghost)
        item = await s.popup() if use_popup else ""
        choices = [(len(x), src, x) for src, x in (("ghost", word), ("popup", item)) if x and rest.startswith(x)]
        _, src, text = max(choices) if choices else (1, "type", rest[0])
        ghost_chars += len(text) if src == "ghost" else 0
        popup_chars += len(text) if src == "popup" else 0
        await s.insert(text)
        done += len(text)
        keys += 1
    return Typing(len(truth), keys, ghost_chars, popup_chars), first or ""


@dataclass
class CutResult:
    engine: str
    file: str
    line: int
    col: int
    truth: str
    suggestion: str  # first line of the ghost text at the cut point
    exact: bool
    similarity: float
    ghost_only: Typing
    popup_and_ghost: Typing | None  # None: the engine has no popup


async def measure_cut(s: Suggester, engine: str, lines: list[str], cut: Cut, has_popup: bool) -> CutResult:
    text, pos = cut_text(lines, cut), (cut.line, cut.col)
    await s.goto(text, pos)
    ghost_only, ghost = await simulate(s, cut.truth, use_popup=False)
    both = None
    if has_popup:
        await s.goto(text, pos)
        both, _ = await simulate(s, cut.truth, use_popup=True)
    line = first_line(ghost)
    return CutResult(engine, Path(cut.path).name, cut.line, cut.col, cut.truth, line, line == cut.truth,
                     similarity(line, cut.truth), ghost_only, both)


# -- suggesters ----------------------------------------------------------------------------------


def position_of(text: str, offset: int) -> Pos:
    line = text.count("\n", 0, offset)
    return line, offset - (text.rfind("\n", 0, offset) + 1)


def diff_edit(old: str, new: str) -> tuple[Pos, Pos, str]:
    """One range edit (positions in old) that turns old into new."""
    a = 0
    while a < min(len(old), len(new)) and old[a] == new[a]:
        a += 1
    b = 0
    while b < min(len(old), len(new)) - a and old[-1 - b] == new[-1 - b]:
        b += 1
    return position_of(old, a), position_of(old, len(old) - b), new[a : len(new) - b]


class LspSuggester:
    """lsp-llm through the editor: didChange, then the requests an editor sends."""

    def __init__(self, editor: StdioServer, uri: str, timeout: float) -> None:
        self.editor, self.uri, self.timeout = editor, uri, timeout
        self.text: str | None = None
        self.pos: Pos = (0, 0)

    async def goto(self, text: str, pos: Pos) -> None:
        if self.text is None:
            self.editor.open(self.uri, text)
        else:
            start, end, new = diff_edit(self.text, text)
            self.editor.change(self.uri, self.text, start, end, new)
        self.text, self.pos = text, pos

    async def insert(self, s: str) -> None:
        assert self.text is not None and "\n" not in s
        self.editor.change(self.uri, self.text, self.pos, self.pos, s)
        at = offset_of(self.text, self.pos)
        self.text = self.text[:at] + s + self.text[at:]
        self.pos = (self.pos[0], self.pos[1] + len(s))

    def _typed(self, character: int) -> str | None:
        """The text of the cursor's line from an LSP column to the cursor."""
        line, col = self.pos
        start = offset_of(self.text or "", (line, 0))
        head = (self.text or "")[start : start + col]
        at = EditorText("", head, self.editor.encoding).index(t.Position(0, character))
        return None if at is None else head[at:]

    async def ghost(self) -> str:
        result = await asyncio.wait_for(self.editor.inline(self.uri, self.text or "", self.pos).future, self.timeout)
        items = inline_items(result)
        if not items:
            return ""
        item = items[0]
        return self._after_cursor(inline_text(item), item.range)

    async def popup(self) -> str:
        result = await asyncio.wait_for(self.editor.complete(self.uri, self.text or "", self.pos).future,
                                        self.timeout)
        items = sorted(completion_items(result), key=lambda it: it.sort_text or it.label)
        if not items:
            return ""
        item = items[0]
        if isinstance(item.text_edit, t.TextEdit):
            return self._after_cursor(item.text_edit.new_text, item.text_edit.range)
        return self._after_cursor(item.insert_text or item.label, None)

    def _after_cursor(self, new_text: str, rng: t.Range | None) -> str:
        """What an edit replacing rng (up to the cursor) with new_text adds after the cursor."""
        if rng is None:
            return new_text
        if rng.start.line != self.pos[0] or rng.end.line != self.pos[0]:
            return ""
        typed = self._typed(rng.start.character)
        return new_text[len(typed) :] if typed is not None and new_text.startswith(typed) else ""


class PrefixSuggester:
    """llama-cpp-python's create_completion on the text before the cursor,
    with the type-through a client such as llama.vim does: while the user
    types what the ghost text shows, its rest stays shown with no request."""

    def __init__(self, llm: Any, tokens: int) -> None:
        self.llm, self.tokens = llm, tokens
        self.prefix = ""
        self.shown: str | None = None

    async def goto(self, text: str, pos: Pos) -> None:
        self.prefix = text[: offset_of(text, pos)]
        self.shown = None

    async def insert(self, s: str) -> None:
        self.prefix += s
        through = self.shown is not None and self.shown.startswith(s) and len(self.shown) > len(s)
        self.shown = self.shown[len(s) :] if through else None

    async def ghost(self) -> str:
        if self.shown is None:
            out = self.llm.create_completion(self.prefix, max_tokens=self.tokens, temperature=0.0, top_k=1)
            self.shown = out["choices"][0]["text"]
        return self.shown

    async def popup(self) -> str:
        return ""


# -- the section ---------------------------------------------------------------------------------


async def run_lsp(settings: Settings, cuts: list[Cut], log: Path | None = None) -> list[CutResult]:
    # quality is about answers, not time: no answer may be cut short by a long read
    options = {"lineTokens": settings.gen_tokens, "inlineTokens": settings.gen_tokens, "readBudgetMs": 600000}
    editor = await StdioServer.launch(settings.command(quiet=True), options, settings.timeout_s, log)
    out = []
    try:
        for i, path in enumerate(dict.fromkeys(c.path for c in cuts)):
            lines = read_source(Path(path))
            s = LspSuggester(editor, f"file:///bench/quality/{i}/{Path(path).name}", settings.timeout_s)
            for cut in (c for c in cuts if c.path == path):
                out.append(await measure_cut(s, "lsp-llm", lines, cut, has_popup=True))
    finally:
        await editor.stop()
    return out


async def run_prefix(settings: Settings, cuts: list[Cut]) -> list[CutResult]:
    llm = load_llama(settings)
    s = PrefixSuggester(llm, settings.gen_tokens)
    try:
        return [await measure_cut(s, "llama-cpp-python", read_source(Path(c.path)), c, has_popup=False)
                for c in cuts]
    finally:
        llm.close()


@dataclass
class QualityRow:
    engine: str
    status: str  # ok | unavailable | error
    reason: str | None = None
    cuts: int = 0
    exact: float = 0.0  # share of cut points whose next line is exactly right
    similarity: float = 0.0  # mean edit similarity of the next line
    saved_ghost: float = 0.0  # share of characters saved accepting ghost words
    saved_both: float | None = None  # ... accepting ghost words and popup items


def summarize(engine: str, results: list[CutResult]) -> QualityRow:
    n = len(results)
    if not n:
        return QualityRow(engine, "error", "no cut points")

    def saved(typings: list[Typing]) -> float:
        return 1 - sum(x.keystrokes for x in typings) / max(1, sum(x.chars for x in typings))

    both = [r.popup_and_ghost for r in results if r.popup_and_ghost is not None]
    return QualityRow(engine, "ok", None, n, sum(r.exact for r in results) / n,
                      sum(r.similarity for r in results) / n, saved([r.ghost_only for r in results]),
                      saved(both) if both else None)


def run_section(settings: Settings, files: list[Path], n_cuts: int, max_chars: int, seed: int,
                count: TokenCounter, engines: list[str]) -> dict:
    """Every engine on the same cut points; the rows and every cut's result."""
    cuts = [c for f in files for c in cut_points(f, n_cuts, seed, count, max_chars)]
    rows, results = [], []
    runners = {"lsp-llm": lambda: asyncio.run(run_lsp(settings, cuts)),
               "llama-cpp-python": lambda: asyncio.run(run_prefix(settings, cuts))}
    for engine in ENGINES:
        if engine == "llama-server /infill":
            binary, origin = find_llama_server(settings.llama_server)
            reason = origin if binary is None else "/infill needs a model with FIM tokens (llama-server answers " \
                "501 for the default Gemma 3 270M, which has none), and the bench's /infill client is not written yet"
            rows.append(QualityRow(engine, "unavailable", reason))
            continue
        if engine not in engines:
            continue
        try:
            got = runners[engine]()
        except Exception as e:  # noqa: BLE001 - a broken engine is a result too
            rows.append(QualityRow(engine, "error", f"{type(e).__name__}: {e}"))
            continue
        results += got
        rows.append(summarize(engine, got))
    return {"files": [f.name for f in files], "cuts": len(cuts), "max_chars": max_chars,
            "gen_tokens": settings.gen_tokens, "rows": [asdict(r) for r in rows],
            "results": [asdict(r) for r in results]}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(q: dict) -> list[str]:
    lines = [f"**Quality** ({q['cuts']} seeded cut points in {', '.join(q['files'])}, files no test or tuning "
             f"uses; every engine gets {q['gen_tokens']} tokens; the user types up to {q['max_chars']} "
             "characters per cut point)", "",
             "| engine | cut points | next line exact | edit similarity | characters saved, ghost words "
             "| characters saved, popup + ghost words |", "|---|---:|---:|---:|---:|---:|"]
    for r in (QualityRow(**x) for x in q["rows"]):
        if r.status != "ok":
            lines.append(f"| {r.engine} | {r.status}: {r.reason} ||||| ")
            continue
        lines.append(f"| {r.engine} | {r.cuts} | {_pct(r.exact)} | {r.similarity:.3f} | {_pct(r.saved_ghost)} "
                     f"| {_pct(r.saved_both)} |")
    return lines + ["", "Next line: the first line of the ghost text (`textDocument/inlineCompletion`; for "
                    "llama-cpp-python, `create_completion` on the text before the cursor) against the rest of "
                    "the real line. Characters saved: the user types the rest of the line and accepts, for one "
                    "keystroke, the ghost text's next word or the top popup item whenever it is what comes next; "
                    "saved = 1 - keystrokes / characters.", ""]
