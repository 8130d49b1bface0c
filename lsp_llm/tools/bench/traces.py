"""Seeded keystroke traces that edit real source files the way people do.

A trace is a set of open documents plus a list of keystrokes. Each keystroke
is one LSP range edit (start, end, new text) on one document, followed by a
completion request at the cursor. Positions are (line, column) with columns
counted in code points; the client (``lsp_llm.tools.client``) converts them for the wire.

The generator works on a *region* of each document: the lines from a little
before the spot being written down to the end of the document. Everything
before the region is never touched, so the same seed produces the same
keystrokes whatever the size of the text in front of it; the size sweep uses
that to type identical keystrokes into documents of 500 to 8,000 tokens.

What a trace does, per document:

* a *hole*: a run of real lines is cut out of the file, leaving one empty
  line; the trace types them back, character by character, and presses Enter
  (newline plus the next line's indentation, as an auto-indenting editor does)
  between them;
* typos: a wrong neighbouring key, sometimes a character or two more, then
  backspaces over them;
* insert a line above the cursor (Vim's ``O``), type a short real line there,
  and come back;
* jump to another function, open a line under its ``def`` and type there, then
  come back;
* with several documents open, switch to another one every ~20 keystrokes.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..editor_text import Pos

TokenCounter = Callable[[str], int]

# stdlib modules used when no --files are given (the first ones that exist)
DEFAULT_MODULES = (
    "argparse.py",
    "textwrap.py",
    "shutil.py",
    "dataclasses.py",
    "functools.py",
    "subprocess.py",
    "inspect.py",
    "typing.py",
)

KEYBOARD_ROWS = ("1234567890-=", "qwertyuiop[]", "asdfghjkl;'", "zxcvbnm,./")


@dataclass(frozen=True)
class Keystroke:
    doc: int
    start: Pos
    end: Pos
    text: str
    cursor: Pos  # where the completion is requested, after the edit
    kind: str  # type | enter | typo | backspace | open_above | jump_line


@dataclass
class Document:
    uri: str
    name: str
    text: str  # as opened
    region_line: int  # first line the trace may touch


@dataclass
class Trace:
    name: str
    docs: list[Document]
    keys: list[Keystroke]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "meta": self.meta,
            "docs": [asdict(d) for d in self.docs],
            "keys": [asdict(k) for k in self.keys],
        }

    @classmethod
    def from_json(cls, data: dict) -> Trace:
        docs = [Document(**d) for d in data["docs"]]
        keys = [
            Keystroke(k["doc"], tuple(k["start"]), tuple(k["end"]), k["text"], tuple(k["cursor"]), k["kind"])
            for k in data["keys"]
        ]
        return cls(data["name"], docs, keys, dict(data.get("meta", {})))


@dataclass
class TraceConfig:
    keystrokes: int = 200
    typo_rate: float = 0.04  # per typed character
    open_above_every: int = 45  # mean keystrokes between "insert a line above"
    jump_every: int = 60  # mean keystrokes between jumps to another function
    switch_every: int = 20  # mean keystrokes between document switches
    max_side_line: int = 32  # longest line typed during a detour


# -- text model ----------------------------------------------------------------


def split_lines(text: str) -> list[str]:
    return text.split("\n")


def offset_of(text: str, pos: Pos) -> int:
    """Character offset of (line, column) in text; raises on a bad position."""
    line, col = pos
    start = 0
    for _ in range(line):
        nl = text.find("\n", start)
        if nl < 0:
            raise ValueError(f"line {line} is past the end of the text")
        start = nl + 1
    end = text.find("\n", start)
    end = len(text) if end < 0 else end
    if not 0 <= col <= end - start:
        raise ValueError(f"column {col} is outside line {line} (length {end - start})")
    return start + col


def apply_edit(text: str, start: Pos, end: Pos, new: str) -> str:
    a = offset_of(text, start)
    b = offset_of(text, end)
    if b < a:
        raise ValueError("edit range ends before it starts")
    return text[:a] + new + text[b:]


def replay(trace: Trace) -> list[str]:
    """Apply every keystroke to the opened texts; return the final texts."""
    texts = [d.text for d in trace.docs]
    for k in trace.keys:
        texts[k.doc] = apply_edit(texts[k.doc], k.start, k.end, k.text)
    return texts


def iter_prefixes(trace: Trace):
    """Yield (keystroke, new text of its document, text before the cursor)."""
    texts = [d.text for d in trace.docs]
    for k in trace.keys:
        t = apply_edit(texts[k.doc], k.start, k.end, k.text)
        texts[k.doc] = t
        yield k, t, t[: offset_of(t, k.cursor)]


# -- sources -----------------------------------------------------------------


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(names: Sequence[str]) -> list[Path]:
    """The named modules of this Python's standard library that exist here."""
    return [stdlib_dir() / m for m in names if (stdlib_dir() / m).is_file()]


def default_sources() -> list[Path]:
    found = stdlib_files(DEFAULT_MODULES)
    if len(found) < 3:
        found += sorted(p for p in stdlib_dir().glob("*.py") if p.stat().st_size > 40_000 and p not in found)
    return found


def read_source(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln.rstrip().replace("\t", "    ") for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return lines


def approx_tokens(text: str) -> int:
    """Rough token count for code when no tokenizer is at hand."""
    return max(1, len(text) // 4)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" "))]


def _is_def(line: str) -> bool:
    s = line.lstrip()
    return s.startswith(("def ", "async def ")) and s.rstrip().endswith(":")


# -- choosing the spot --------------------------------------------------------


@dataclass
class Spot:
    hole: int  # first line cut out
    n_hole: int  # lines cut out
    region: int  # first line of the region (before the hole)


def find_spot(lines: Sequence[str], min_line: int, chars_needed: int, region_back: int = 20) -> Spot:
    """A hole of real code at or after min_line: starts inside a function body,
    holds at least chars_needed characters, and has functions around it."""
    n = len(lines)
    for h in range(max(min_line, 1), n):
        body = lines[h]
        if not body.strip() or not body.startswith("    ") or body.lstrip().startswith(("#", '"', "'", "@", ")")):
            continue
        if not _is_def(lines[h - 1]):
            continue  # start right under a def: the hole is the function body
        chars = 0
        j = h
        while j < n and chars < chars_needed:
            if not lines[j].isascii():
                break
            chars += len(lines[j].strip()) + 1
            j += 1
        if chars < chars_needed:
            continue
        region = max(0, h - region_back)
        return Spot(hole=h, n_hole=j - h, region=region)
    raise ValueError(f"no spot to type {chars_needed} characters after line {min_line}")


# -- the generator -------------------------------------------------------------


class _DocState:
    """One document's lines (region only, positions relative to the region)
    and where its author is."""

    def __init__(self, index: int, lines: list[str], hole_rel: int, targets: list[str], defs: list[int],
                 side_lines: list[str]) -> None:
        self.index = index
        self.lines = lines
        self.targets = targets  # lines to type back into the hole
        self.t_line = 0  # which target line is being typed
        self.t_col = 0  # characters of it typed (after its indentation)
        self.main: Pos = (hole_rel, 0)  # where the main typing resumes
        self.defs = defs  # region-relative def lines (kept in sync)
        self.side_lines = side_lines
        self.detour: list[str] = []  # characters left to type on a detour line
        self.detour_pos: Pos | None = None
        self.typo_tail: int = 0  # wrong characters to backspace over
        self.typo_extra: int = 0  # more wrong characters still to type

    @property
    def done(self) -> bool:
        return self.t_line >= len(self.targets)


class TraceBuilder:
    def __init__(self, rng: random.Random, cfg: TraceConfig) -> None:
        self.rng = rng
        self.cfg = cfg
        self.keys: list[Keystroke] = []
        self.offsets: list[int] = []  # region line of each document

    # one edit, applied to the model and recorded
    def _emit(self, st: _DocState, start: Pos, end: Pos, text: str, cursor: Pos, kind: str,
              main_edit: bool = True) -> None:
        lines = st.lines
        (l0, c0), (l1, c1) = start, end
        head = lines[l0][:c0]
        tail = lines[l1][c1:]
        new = (head + text + tail).split("\n")
        lines[l0 : l1 + 1] = new
        delta = len(new) - (l1 - l0 + 1)
        if not main_edit and st.main >= start:
            # the author's main spot is below the edit: it moves with the text
            ml, mc = st.main
            lead = len((head + text).split("\n")[-1])
            st.main = (ml + delta, lead + mc - c1) if ml == l1 else (ml + delta, mc)
        if delta:
            st.defs = [d + delta if d > l0 or (d == l0 and c0 == 0) else d for d in st.defs]
        off = self.offsets[st.index]
        self.keys.append(
            Keystroke(st.index, (l0 + off, c0), (l1 + off, c1), text, (cursor[0] + off, cursor[1]), kind)
        )

    def _neighbour(self, ch: str) -> str:
        for row in KEYBOARD_ROWS:
            i = row.find(ch.lower())
            if i >= 0:
                choices = [row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)]
                return self.rng.choice(choices)
        return self.rng.choice("etaoinsr")

    # -- keystroke kinds ------------------------------------------------------
    def _type_char(self, st: _DocState, pos: Pos, ch: str, kind: str = "type", main_edit: bool = True) -> Pos:
        self._emit(st, pos, pos, ch, (pos[0], pos[1] + 1), kind, main_edit)
        return (pos[0], pos[1] + 1)

    def _backspace(self, st: _DocState, pos: Pos) -> Pos:
        new = (pos[0], pos[1] - 1)
        self._emit(st, new, pos, "", new, "backspace")
        return new

    def step_main(self, st: _DocState) -> None:
        """One keystroke of the main task: type the hole back."""
        line, col = st.main
        target = st.targets[st.t_line]
        indent = _indent(target)
        body = target[len(indent) :]
        if st.typo_tail and not st.typo_extra:
            st.main = self._backspace(st, st.main)
            st.typo_tail -= 1
            return
        if st.typo_extra:
            st.main = self._type_char(st, st.main, self._neighbour(body[min(st.t_col, len(body) - 1)]), "typo")
            st.typo_extra -= 1
            return
        if st.t_col == 0 and col == 0 and indent:
            # auto-indent puts the cursor at the line's indentation
            self._emit(st, (line, 0), (line, 0), indent, (line, len(indent)), "indent")
            st.main = (line, len(indent))
            return
        if st.t_col < len(body):
            ch = body[st.t_col]
            if ch.isalnum() and self.rng.random() < self.cfg.typo_rate:
                st.main = self._type_char(st, st.main, self._neighbour(ch), "typo")
                st.typo_tail = 1 + self.rng.choice((0, 0, 1, 2))
                st.typo_extra = st.typo_tail - 1
                return
            st.main = self._type_char(st, st.main, ch)
            st.t_col += 1
            return
        # end of the line: Enter, with the next line's indentation
        st.t_line += 1
        st.t_col = 0
        if st.done:
            return
        nxt = _indent(st.targets[st.t_line])
        self._emit(st, st.main, st.main, "\n" + nxt, (line + 1, len(nxt)), "enter")
        st.main = (line + 1, len(nxt))
        if not st.targets[st.t_line].strip():
            st.t_col = 0  # an empty line: Enter again next time

    def start_open_above(self, st: _DocState) -> None:
        line, _ = st.main
        indent = _indent(st.lines[line]) or _indent(st.targets[min(st.t_line, len(st.targets) - 1)])
        self._emit(st, (line, 0), (line, 0), indent + "\n", (line, len(indent)), "open_above", main_edit=False)
        st.detour = list(self._side_text_for(st))
        st.detour_pos = (line, len(indent))

    def start_jump(self, st: _DocState) -> bool:
        main_line = st.main[0]
        choices = [d for d in st.defs if abs(d - main_line) > 3 and d + 1 < len(st.lines)]
        if not choices:
            return False
        d = self.rng.choice(choices)
        body = st.lines[d + 1]
        indent = _indent(body) if body.strip() else _indent(st.lines[d]) + "    "
        end = (d, len(st.lines[d]))
        self._emit(st, end, end, "\n" + indent, (d + 1, len(indent)), "jump_line", main_edit=False)
        st.detour = list(self._side_text_for(st))
        st.detour_pos = (d + 1, len(indent))
        return True

    def _side_text_for(self, st: _DocState) -> str:
        s = self.rng.choice(st.side_lines).strip()
        return s[: self.cfg.max_side_line]

    def step_detour(self, st: _DocState) -> None:
        ch = st.detour.pop(0)
        assert st.detour_pos is not None
        st.detour_pos = self._type_char(st, st.detour_pos, ch, main_edit=False)
        if not st.detour:
            st.detour_pos = None


def _make_state(index: int, lines: list[str], spot: Spot) -> tuple[_DocState, list[str]]:
    """Cut the hole; return the state (region-relative) and the opened lines."""
    targets = lines[spot.hole : spot.hole + spot.n_hole]
    opened = lines[: spot.hole] + [""] + lines[spot.hole + spot.n_hole :]
    region = opened[spot.region :]
    hole_rel = spot.hole - spot.region
    defs = [i for i, ln in enumerate(region) if _is_def(ln) and i != hole_rel - 1]
    side = [ln for ln in region if ln.strip() and ln.isascii() and not ln.lstrip().startswith(("#", '"', "'"))]
    st = _DocState(index, list(region), hole_rel, targets, defs, side or ["pass"])
    return st, opened


def generate(
    docs: Sequence[tuple[str, list[str], Spot, int]],
    cfg: TraceConfig,
    seed: int,
    name: str,
) -> Trace:
    """docs: (uri, source lines, spot, first line of the opened window).

    The opened text is lines[window:] with the hole cut; positions are
    relative to that window.
    """
    rng = random.Random(seed)
    b = TraceBuilder(rng, cfg)
    states: list[_DocState] = []
    documents: list[Document] = []
    holes = []
    for i, (uri, lines, spot, window) in enumerate(docs):
        local = Spot(spot.hole - window, spot.n_hole, spot.region - window)
        st, opened = _make_state(i, lines[window:], local)
        holes.append({"line": local.hole, "text": "\n".join(st.targets)})
        states.append(st)
        b.offsets.append(local.region)
        documents.append(Document(uri, Path(uri).name, "\n".join(opened), local.region))

    def gap(mean: int) -> int:
        return max(1, int(rng.expovariate(1.0 / mean))) if mean > 0 else 1 << 30

    cur = 0
    def switch_gap() -> int:
        return max(5, int(rng.gauss(cfg.switch_every, cfg.switch_every / 4)))

    next_switch = switch_gap() if len(states) > 1 and cfg.switch_every > 0 else 1 << 30
    next_above = gap(cfg.open_above_every)
    next_jump = gap(cfg.jump_every)
    n = 0
    while len(b.keys) < cfg.keystrokes:
        st = states[cur]
        if len(states) > 1 and n >= next_switch and st.detour_pos is None and not st.typo_tail:
            choices = [i for i in range(len(states)) if i != cur and not states[i].done]
            if choices:
                cur = rng.choice(choices)
                st = states[cur]
            next_switch = n + switch_gap()
        if st.detour_pos is not None:
            b.step_detour(st)
        elif st.typo_tail or st.typo_extra:
            b.step_main(st)
        elif n >= next_above and not st.done:
            b.start_open_above(st)
            next_above = n + gap(cfg.open_above_every)
        elif n >= next_jump and not st.done and b.start_jump(st):
            next_jump = n + gap(cfg.jump_every)
        elif not st.done:
            b.step_main(st)
        else:
            others = [i for i in range(len(states)) if not states[i].done]
            if not others:
                break
            cur = others[0]
            continue
        n += 1
    final = []
    for d, st in zip(documents, states):
        head = d.text.split("\n")[: d.region_line]
        final.append("\n".join(head + st.lines))
    trace = Trace(name, documents, b.keys, {"seed": seed, "config": asdict(cfg)})
    trace.meta["expected_final"] = final
    trace.meta["holes"] = holes
    return trace


# -- building the benchmark's traces ------------------------------------------------


def _window_for(lines: Sequence[str], spot: Spot, tokens_before: int, count: TokenCounter) -> int:
    """First line of a window whose text before the hole has ~tokens_before tokens."""
    lo, hi = 0, spot.region  # window start somewhere in [0, region]
    if count("\n".join(lines[0 : spot.hole])) <= tokens_before:
        return 0
    while lo < hi:  # the largest start that still gives >= tokens_before
        mid = (lo + hi + 1) // 2
        if count("\n".join(lines[mid : spot.hole])) >= tokens_before:
            lo = mid
        else:
            hi = mid - 1
    return lo


def multi_file_trace(
    paths: Sequence[Path], doc_tokens: int, keystrokes: int, seed: int, count: TokenCounter = approx_tokens,
    cfg: TraceConfig | None = None,
) -> Trace:
    """Three (or len(paths)) documents of about doc_tokens tokens each before
    the spot being written, switching among them every ~20 keystrokes."""
    cfg = cfg or TraceConfig()
    cfg = TraceConfig(**{**asdict(cfg), "keystrokes": keystrokes})
    per_doc = keystrokes // max(1, len(paths)) + 40
    docs = []
    for p in paths:
        lines = read_source(p)
        min_line = _line_after_tokens(lines, doc_tokens, count)
        spot = find_spot(lines, min_line, chars_needed=per_doc)
        window = _window_for(lines, spot, doc_tokens, count)
        tail = spot.hole + spot.n_hole + 40  # a little code after the hole
        docs.append((p.resolve().as_uri(), lines[:tail], spot, window))
    t = generate(docs, cfg, seed, name=f"{len(paths)} files")
    t.meta.update(kind="multi", doc_tokens=doc_tokens, files=[str(p) for p in paths])
    return t


def size_sweep_traces(
    path: Path, sizes: Sequence[int], keystrokes: int, seed: int, count: TokenCounter = approx_tokens,
    cfg: TraceConfig | None = None,
) -> list[Trace]:
    """The same keystrokes in one file, with ~size tokens in front of them."""
    cfg = cfg or TraceConfig()
    cfg = TraceConfig(**{**asdict(cfg), "keystrokes": keystrokes, "switch_every": 0})
    lines = read_source(path)
    min_line = _line_after_tokens(lines, max(sizes) + 200, count)
    spot = find_spot(lines, min_line, chars_needed=keystrokes + 40)
    tail = spot.hole + spot.n_hole + 40
    out = []
    for size in sizes:
        window = _window_for(lines, spot, size, count)
        window = min(window, spot.region)
        t = generate([(path.resolve().as_uri(), lines[:tail], spot, window)], cfg, seed, name=f"{size} tokens")
        t.meta.update(kind="sweep", size=size, file=str(path),
                      tokens_before_cursor=count("\n".join(lines[window : spot.hole])))
        out.append(t)
    return out


def _line_after_tokens(lines: Sequence[str], tokens: int, count: TokenCounter) -> int:
    lo, hi = 0, len(lines)
    while lo < hi:
        mid = (lo + hi) // 2
        if count("\n".join(lines[:mid])) < tokens:
            lo = mid + 1
        else:
            hi = mid
    return lo


def switching_trace(
    paths: Sequence[Path], doc_tokens: int, keystrokes: int, seed: int, switch_every: int = 8,
    count: TokenCounter = approx_tokens,
) -> Trace:
    """Many documents open (8 by default: twice the server's live sessions),
    typing in one and switching to another one about every switch_every
    keystrokes; most switches come back to a document typed in before, whose
    text has not changed since."""
    t = multi_file_trace(paths, doc_tokens, keystrokes, seed, count, TraceConfig(switch_every=switch_every))
    t.name = f"{len(paths)} files, switching"
    t.meta.update(kind="switching", switch_every=switch_every)
    return t
