"""Choosing the ghost text defaults by measurement (``lsp-llm bench --tune``).

**Cut points.** Seeded lines of code in stdlib files that no test, trace or
quality measurement uses (``TUNING_MODULES``), chosen as in ``quality``. The
user is writing new code: the document is the file with the rest of the cut
line *and the next* ``HOLE_LINES`` *lines* removed (what follows them stays).
The truth is the removed text.

**One continuation, every rule.** At each cut point lsp-llm's own engine (in
process, token healing as in the server) computes the greedy continuation
once, ``RAW_TOKENS`` tokens or ``RAW_LINES`` lines, with no stop rule. Every
variant of the rules is applied to it offline with ``inline.shape``, exactly
as the server does to a path cut at the variant's token limit. Only the
context size (``nCtx``, how much of the file the model sees) needs a
continuation of its own.

**What a variant scores**, per cut point, for the suggestion S shown there:
the user accepts S whole (one key, Tab) when the truth starts with S, else
accepts it word by word (one key a word, words as in ``quality``) while the
truth goes on with the word. *Accepted*: characters taken; *wrong*:
characters shown but not taken; *saved*: accepted less the keys spent. A good
default saves most while it shows little that is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ...config import Settings
from ...engine.branches import extend
from ...engine.default_model import cache_dir
from ...engine.model import Model
from ...engine.scheduler import Engine
from ...features.inline import Request, Rules, first_token, request_at, shape
from ...lsp.lifecycle import load, n_ctx_for, vocab_of
from ...text.documents import Document
from .quality import WORD, cut_points
from .traces import TokenCounter, read_source, stdlib_files

# stdlib modules that no test, trace, demo or quality measurement reads
TUNING_MODULES = ("shlex.py", "pprint.py", "calendar.py", "heapq.py", "tabnanny.py", "code.py")
HOLE_LINES = 8  # lines removed after the cut line (the user writes them)
RAW_TOKENS = 96  # the continuation computed at each cut point (more than any variant shows)
RAW_LINES = 10


def tuning_sources() -> list[Path]:
    return stdlib_files(TUNING_MODULES)


@dataclass(frozen=True)
class Hole:
    """A cut point with the text that the user is about to write."""

    path: str
    line: int
    col: int
    text: str  # the document: the file less the hole
    offset: int  # the cursor, in characters (ASCII lines)
    truth: str  # the hole: the rest of the cut line and the next lines, trailing spaces removed


def holes(path: Path, n: int, seed: int, count: TokenCounter) -> list[Hole]:
    lines = read_source(path)
    out = []
    for c in cut_points(path, n, seed, count, max_chars=1000):
        removed = [lines[c.line][c.col :], *lines[c.line + 1 : c.line + 1 + HOLE_LINES]]
        before = "\n".join([*lines[: c.line], lines[c.line][: c.col]])
        after = "\n".join(lines[c.line + 1 + HOLE_LINES :])
        truth = "\n".join(x.rstrip() for x in removed).rstrip()
        out.append(Hole(str(path), c.line, c.col, before + "\n" + after, len(before), truth))
    return out


@dataclass
class Score:
    accepted: int = 0  # characters taken (Tab, or word by word)
    keys: int = 0  # keys spent taking them
    wrong: int = 0  # characters shown and not taken
    shown: bool = False
    whole: bool = False  # the truth starts with the whole suggestion


def score(suggestion: str, truth: str) -> Score:
    if not suggestion:
        return Score()
    if truth.startswith(suggestion):
        return Score(len(suggestion), 1, 0, True, True)
    taken, keys = 0, 0
    while m := WORD.match(suggestion, taken):
        if not truth.startswith(m.group(0), taken):
            break
        taken, keys = m.end(), keys + 1
    return Score(taken, keys, len(suggestion) - taken, True, False)


@dataclass(frozen=True)
class Raw:
    """A cut point's continuation: the request (around the cursor, healed
    text) and the greedy path's pieces."""

    hole: Hole
    request: Request
    pieces: list[bytes]
    ended: bool  # the path ends with an end-of-generation token


def continuations(model: Model, n_ctx: int, hs: Sequence[Hole]) -> list[Raw]:
    """The greedy continuation at every cut point, from an engine of n_ctx."""
    s = Settings(n_ctx=n_ctx, inline_tokens=RAW_TOKENS)
    n_ctx = n_ctx_for(s, model)
    engine = Engine(1, n_ctx, n_branches=16, headroom=s.headroom)
    try:
        engine.submit(lambda: engine.set_model(model)).result()
        out = []
        for i, h in enumerate(hs):
            doc = Document(f"file:///tune/{i}/{Path(h.path).name}", h.text, 1, vocab_of(model))
            req = request_at(doc, len(h.text[: h.offset].encode()), s, engine)
            out.append(engine.submit(lambda req=req, h=h: _continue(engine, req, h)).result())
        return out
    finally:
        engine.stop()


def _continue(engine: Engine, req: Request, h: Hole) -> Raw:
    session = engine.sync(req.key, req.prompt, lambda: False, req.healed)
    model = engine.model
    first = first_token(model, session.logits, req.healed)
    if first is None:
        return Raw(h, req, [], True)
    paths, _ = extend(session, [first], lambda _i, text: text.count(b"\n") >= RAW_LINES, [RAW_TOKENS],
                      None, engine.exact_memo)
    path = paths[0]
    return Raw(h, req, [model.piece(tok) for tok in path], model.is_eog(path[-1]))


@dataclass(frozen=True)
class Variant:
    name: str
    rules: Rules
    tokens: int  # inlineTokens


def shown(raw: Raw, v: Variant) -> str:
    """What the server shows with the variant's rules and token limit."""
    pieces = raw.pieces[: v.tokens]
    ended = raw.ended and len(pieces) == len(raw.pieces)
    text = b"".join(pieces)[len(raw.request.healed) :]
    out = shape(text, raw.request.around, v.rules, ended)
    return "" if out is None else out.text


@dataclass
class Row:
    variant: str
    n_ctx: int
    cuts: int
    shown: float  # share of cut points with a suggestion
    first_line: float  # share of cut points whose first line is the real one
    whole: float  # share of cut points where the whole suggestion is right
    accepted: float  # characters taken per cut point
    wrong: float  # characters shown and not taken, per cut point
    saved: float  # characters taken less keys spent, per cut point


def evaluate(raws: Sequence[Raw], v: Variant, n_ctx: int) -> Row:
    texts = [shown(r, v) for r in raws]
    scores = [score(x, r.hole.truth) for x, r in zip(texts, raws)]
    first = [bool(x) and x.split("\n")[0] == r.hole.truth.split("\n")[0] for x, r in zip(texts, raws)]
    n = len(scores)
    return Row(v.name, n_ctx, n, sum(s.shown for s in scores) / n, sum(first) / n, sum(s.whole for s in scores) / n,
               sum(s.accepted for s in scores) / n, sum(s.wrong for s in scores) / n,
               sum(s.accepted - s.keys for s in scores) / n)


def variants(default: Settings) -> list[Variant]:
    """The defaults first, then one change at a time."""
    base = Variant("defaults", Rules(default.inline_lines), default.inline_tokens)
    out = [base]
    out += [replace(base, name=f"inlineLines {n}", rules=Rules(n)) for n in (1, 2, 3, 4, 6, 8)
            if n != default.inline_lines]
    out += [replace(base, name=f"inlineLines {n}, a whole block (not one statement)",
                    rules=Rules(n, one_statement=False)) for n in sorted({default.inline_lines, 4, 8})]
    out += [replace(base, name=f"at least {m} characters", rules=replace(base.rules, min_chars=m))
            for m in (1, 4, 8) if m != base.rules.min_chars]
    out += [replace(base, name=f"inlineTokens {k}", tokens=k) for k in (16, 32, 48, 96) if k != default.inline_tokens]
    return out


def run_section(model_path: Path, threads: int, files: Sequence[Path], n_cuts: int, seed: int,
                count: TokenCounter, contexts: Sequence[int]) -> dict:
    """Every rule variant at the largest context; the defaults at each context size."""
    hs = [h for f in files for h in holes(f, n_cuts, seed, count)]
    default = Settings()
    model = load(Settings(model=str(model_path), threads=threads), cache_dir())
    rows, kept = [], []
    try:
        for n_ctx in sorted(contexts, reverse=True):
            raws = continuations(model, n_ctx, hs)
            chosen = variants(default) if n_ctx == max(contexts) else variants(default)[:1]
            rows += [evaluate(raws, v, n_ctx) for v in chosen]
            kept += [_kept(r, n_ctx) for r in raws]
    finally:
        model.close()
    return {"files": [f.name for f in files], "cuts": len(hs), "hole_lines": HOLE_LINES,
            "rows": [asdict(r) for r in rows], "continuations": kept}


def _kept(r: Raw, n_ctx: int) -> dict:
    """A continuation for results.json (pieces as latin-1: bytes, losslessly)."""
    h = r.hole
    return {"n_ctx": n_ctx, "file": Path(h.path).name, "line": h.line, "col": h.col, "truth": h.truth,
            "healed": r.request.healed.decode("latin-1"), "pieces": [p.decode("latin-1") for p in r.pieces],
            "ended": r.ended}


def markdown(q: dict) -> list[str]:
    lines = [f"**Ghost text defaults, measured** (`lsp-llm bench --tune`: {q['cuts']} seeded cut points in "
             f"{', '.join(q['files'])}, files no test, trace or quality measurement uses; at each the user "
             f"writes the rest of the line and the next {q['hole_lines']} lines)", "",
             "| rules | nCtx | shown | first line right | whole suggestion right | characters taken "
             "| characters shown, not taken | characters saved |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (Row(**x) for x in q["rows"]):
        lines.append(f"| {r.variant} | {r.n_ctx} | {100 * r.shown:.0f}% | {100 * r.first_line:.0f}% "
                     f"| {100 * r.whole:.0f}% | {r.accepted:.1f} | {r.wrong:.1f} | {r.saved:.1f} |")
    return lines + ["", "At each cut point the user sees one suggestion: they take it whole (one key) when the "
                    "real text starts with it, else word by word (one key a word) while it is right. Characters "
                    "are per cut point; saved = characters taken less keys spent.", ""]
