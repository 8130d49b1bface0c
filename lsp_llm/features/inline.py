"""Ghost text: a multi-line suggestion at the cursor (``textDocument/inlineCompletion``).

One greedy branch continues the text before the cursor from the logits the
document's session already holds (``branches.extend``: canonical batches,
drafts in the padding, every step remembered in the greedy memo). Token
healing applies as for the popup items: the first token starts with the
healed text. Stop rules (pure functions on bytes, below) end the suggestion
at the end of the block, where brackets close, at a line that repeats the
text after the cursor, at a stop string, or at the line and token limits.

Progressive: a request answers within a time budget with what is ready (at
least the first line). Every step went into the greedy memo, so asking again
with the same text walks the known path at no cost and decodes further; an
idle task (``extend_task``) continues it while the editor is quiet.

Type-through: while the user types what the suggestion shows, ``Inline``
answers with the rest of it from a cache, with no engine job.

FIM: for models whose vocabulary declares FIM tokens, a bounded suffix (the
lines after the cursor) conditions the suggestion. The prompt is laid out
suffix first, ``BOS <SUF> suffix <PRE> prefix <MID>``, in its own session
(``uri#fim``), so typing at the cursor changes only the end of it: a
keystroke re-feeds the last prefix tokens and ``<MID>``. On a remote engine
whose model has FIM tokens, the text around the cursor goes to llama-server's
``/infill`` instead (``RemotePool.infill``; no token healing: the server
tokenizes the prefix text itself, so the suggestion starts at the cursor).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import Settings
from ..engine.branches import extend
from ..engine.greedy import GreedyMemo
from ..engine.model import FimTokens, Model
from ..engine.pool import window
from ..engine.scheduler import Engine
from ..engine.session import Cancelled, Session, ShouldStop
from ..text.documents import Document, Vocab
from .after_cursor import CLOSERS, OPENERS, QUOTES, covered

FIM_SESSION = "#fim"  # the FIM session of a document is keyed uri + this
MAX_SUFFIX_BYTES = 4096  # the FIM suffix is bounded by lines and by this
MIN_CHARS = 2  # a suggestion shows at least this many non-blank bytes
INFILL_PREFIX_TOKENS = 1536  # llama-server keeps 3/4 of its batch (2,048 by default) of an /infill prefix
LINE_GRACE_S = 1.0  # past the budget, a served suggestion (/completion, /infill) waits this long for its line to end
MAX_LINE_SUFFIX = 8  # without FIM, no suggestion before more text than this on the line
_WORDY = re.compile(rb"[A-Za-z0-9_\x80-\xff]")


# -- the text around the cursor -------------------------------------------------
@dataclass(frozen=True)
class Around:
    """What the stop rules know about the text around the cursor."""

    line_prefix: bytes  # the cursor's line, before the cursor
    rest_of_line: bytes  # the cursor's line, after the cursor (no line break)
    next_line: bytes  # the first non-blank line after the cursor's line, stripped
    crlf: bool  # the document breaks lines with \r\n

    @classmethod
    def at(cls, data: bytes, offset: int) -> Around:
        start = data.rfind(b"\n", 0, offset) + 1
        end = data.find(b"\n", offset)
        end = len(data) if end < 0 else end
        rest = data[offset:end].rstrip(b"\r")
        first_break = data.find(b"\n")
        crlf = first_break > 0 and data[first_break - 1] == 0x0D
        return cls(data[start:offset], rest, _next_nonblank(data, end + 1), crlf)


def _next_nonblank(data: bytes, start: int, lines: int = 64) -> bytes:
    """The first non-blank line (stripped) of the next ``lines`` from start."""
    for _ in range(lines):
        if start >= len(data):
            break
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        if line := data[start:end].strip():
            return line
        start = end + 1
    return b""


@dataclass(frozen=True)
class Rules:
    lines: int  # at most this many lines (an empty first line does not count)
    stops: tuple[bytes, ...] = ()  # the suggestion ends before any of these
    one_statement: bool = True  # a line back at the cursor's level ends it (else only a dedent)
    min_chars: int = MIN_CHARS  # a suggestion shows at least this many non-blank bytes


@dataclass(frozen=True)
class Cut:
    end: int  # the suggestion is text[:end]
    final: bool  # a rule ended it: more tokens cannot change it


def indent(line: bytes) -> int:
    body = line.lstrip(b" \t")
    return len(line[: len(line) - len(body)].expandtabs(4))


def balance(line: bytes) -> int:
    """Brackets opened minus brackets closed, outside quotes."""
    depth, quote, escaped = 0, 0, False
    for c in line:
        if quote:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == quote:
                quote = 0
        elif c in QUOTES:
            quote = c
        elif c in OPENERS:
            depth += 1
        elif c in CLOSERS:
            depth -= 1
    return depth


def opens_block(line: bytes) -> bool:
    return line.rstrip().endswith((b":", b"{", b"(", b"["))


def _closing(line: bytes) -> bool:
    return line.lstrip()[:1] in (b")", b"]", b"}")


def repeats(line: bytes, times: int = 3) -> bool:
    """The line ends with a chunk of 5 to 40 bytes, with a letter in it, said
    ``times`` times in a row (a model stuck in a loop)."""
    for n in range(5, min(40, len(line) // times) + 1):
        chunk = line[-n:]
        if line.endswith(chunk * times) and re.search(rb"[A-Za-z]", chunk):
            return True
    return False


def _stop_at(text: bytes, stops: Sequence[bytes]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def scan(text: bytes, around: Around, rules: Rules) -> Cut:
    """Where the suggestion ``text`` (line breaks as \\n) ends, and whether a
    rule ended it. Rules, line by line:

    - a stop string ends it before the string;
    - a later line indented less than the cursor's line ends the block (not
      included). When the suggestion completes the cursor's line, or opens a
      deeper block, a line back at the cursor's level ends it too: one
      statement or one block per suggestion. A block-ending line that starts
      with a closing bracket is included (it closes the block);
    - a line equal to the next non-blank line after the cursor (the text is
      already there) ends it, not included;
    - a line that closes a bracket opened before the cursor ends it, unless it
      opens a block (``if f(x):``);
    - a line that repeats a chunk three times (a loop) ends it, not included;
    - two blank lines in a row, or ``rules.lines`` lines, end it.
    """
    stop = _stop_at(text, rules.stops)
    if stop is not None:
        text = text[:stop]
    lines = text.split(b"\n")
    ref = indent(around.line_prefix)
    continuing = bool(around.line_prefix.strip()) and bool(lines[0].strip())  # completing the cursor's line
    strict: bool | None = None  # decided at the first non-blank later line
    depth = 0  # brackets the suggestion opened (negative: closed ones opened before it)
    counted = 0 if lines[0].strip() else -1
    start, blanks = 0, 0
    for i, line in enumerate(lines):
        whole = i < len(lines) - 1  # the line has its line break
        end = start + len(line)
        full = around.line_prefix + line if i == 0 else line
        if i > 0 and line.strip():
            level = indent(line)
            if strict is None:
                strict = rules.one_statement and (continuing or level > ref)
            if level < ref or (strict and level <= ref):  # the block ends here
                if not _closing(line) or line.strip() == around.next_line:
                    return Cut(max(start - 1, 0), True)
                return Cut(end, whole)
        if repeats(line):
            return Cut(max(start - 1, 0), True)
        if not whole:
            return Cut(end, stop is not None)
        if line.strip() and full.strip() == around.next_line:
            return Cut(max(start - 1, 0), True)
        blanks = 0 if line.strip() else blanks + 1
        if i > 0 and blanks >= 2:
            return Cut(max(start - 1, 0), True)
        delta = balance(full) - (balance(around.line_prefix) if i == 0 else 0)
        depth += delta
        if depth < 0 and delta < 0 and not opens_block(full):  # it closed what was open before it
            return Cut(end, True)
        counted += 1
        if counted >= rules.lines:
            return Cut(end, True)
        start = end + 1
    return Cut(len(text), True)  # unreachable: the last line is never whole


def _settled(body: bytes, around: Around) -> bytes:
    """A suggestion cut short (budget, token limit): whole lines only, and
    back to the last line where the brackets it opened are closed."""
    lines = body.split(b"\n")
    if len(lines) > 1:
        lines.pop()  # a partial line
    depth = balance(around.line_prefix + lines[0]) - balance(around.line_prefix)
    last = 0 if depth <= 0 else None
    for i in range(1, len(lines)):
        depth += balance(lines[i])
        if depth <= 0:
            last = i
    return b"\n".join(lines if last is None else lines[: last + 1])


def useful(text: bytes, min_chars: int = MIN_CHARS) -> bool:
    """Not only whitespace or punctuation, and not shorter than min_chars."""
    return len(b"".join(text.split())) >= min_chars and _WORDY.search(text) is not None


@dataclass(frozen=True)
class Shape:
    text: str  # to insert at the cursor, with the document's line breaks
    covers: int  # bytes of the text after the cursor it replaces (``after_cursor.covered``)


def shape(text: bytes, around: Around, rules: Rules, ended: bool, fim: bool = False) -> Shape | None:
    """The suggestion to show for generated ``text`` (after the healed part),
    or None when nothing is worth showing. ``ended``: generation ended by
    itself (end of generation token), not by a limit."""
    text = text.replace(b"\r\n", b"\n")
    cut = scan(text, around, rules)
    body = text[: cut.end]
    if not (cut.final or ended):
        body = _settled(body, around)
    lines = [line.rstrip() for line in body.split(b"\n")]
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    covers = covered(lines[0], around.rest_of_line)
    left = around.rest_of_line[covers:].strip()
    if left:
        if len(left) > MAX_LINE_SUFFIX and not fim:
            return None  # mid-line in code the model cannot see
        lines = lines[:1]  # a line break would push the rest of the line down
    out = (b"\r\n" if around.crlf else b"\n").join(lines)
    if not useful(out, rules.min_chars):
        return None
    return Shape(out.decode("utf-8", "ignore"), covers)


# -- the engine job ---------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What the engine job needs, taken from the document before any await."""

    uri: str  # the document
    key: str  # its session: the uri, or uri#fim
    prompt: list[int]
    doc_prompt: list[int]  # the document's prompt at the cursor (the prompt itself without FIM)
    healed: bytes  # the first token starts with this text
    around: Around
    rules: Rules
    max_tokens: int
    budget_s: float  # answer with what is ready (at least a line) after this long
    fim: bool = False
    infill: tuple[str, str] | None = None  # remote FIM: the text before and after the cursor, for /infill


@dataclass
class InlineStats:
    ms: float = 0.0  # the request, end to end on the engine
    first_line_ms: float | None = None  # until the first line worth showing was ready (not only punctuation)
    decode_calls: int = 0  # llama_decode calls for it (each a canonical batch)
    decode_ms: float = 0.0  # time inside them
    memo_steps: int = 0  # greedy steps taken from the memo
    tokens: int = 0  # tokens of the suggestion
    fed: int = 0  # prompt tokens fed to the session for it
    type_through: int = 0  # answers from the type-through cache (server side)
    type_through_ms: float = 0.0  # the latest of them, in the handler

    def as_dict(self) -> dict[str, object]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Suggestion:
    text: str  # empty: nothing to show
    covers: int  # bytes of the text after the cursor it replaces
    complete: bool  # nothing more will come for this text
    stats: InlineStats = field(default_factory=InlineStats, compare=False)


def fim_prompt(prompt: list[int], suffix: list[int], fim: FimTokens, bos: int | None, room: int,
               headroom: int) -> list[int]:
    """``BOS <SUF> suffix <PRE> prefix <MID>``: the prefix is last, so typing
    at the cursor changes only the end. A long prefix keeps its tail (a
    window that moves once per quarter of the room)."""
    head = [fim.suf, *suffix, fim.pre]
    fitted, _ = window(prompt, room - len(head) - 1, headroom, bos is not None)
    body = fitted[1:] if bos is not None else fitted
    return ([bos] if bos is not None else []) + head + body + [fim.mid]


def fim_suffix(data: bytes, offset: int, lines: int) -> bytes:
    """The rest of the cursor's line and the next ``lines`` lines."""
    end = offset
    for _ in range(lines + 1):
        nl = data.find(b"\n", end)
        if nl < 0:
            return data[offset : offset + MAX_SUFFIX_BYTES]
        end = nl + 1
    return data[offset : min(end, offset + MAX_SUFFIX_BYTES)]


def request_at(doc: Document, offset: int, s: Settings, engine: Engine) -> Request:
    """Event loop: the engine job's input for a suggestion at offset."""
    prompt, healed = doc.prompt(offset)
    doc_prompt = prompt
    rules = Rules(s.inline_lines, tuple(x.encode() for x in s.inline_stop))
    fim = doc.vocab.fim if s.fim and doc.vocab is not None else None  # the ids' own model's (not a swap's)
    key = doc.uri
    if s.fim and getattr(engine.pool, "can_infill", False) and doc.vocab is not None:
        infill = (infill_prefix(doc.vocab, prompt, healed, engine.headroom),
                  _text(fim_suffix(doc.data, offset, s.fim_lines)))
        return Request(doc.uri, doc.uri + FIM_SESSION, prompt, doc_prompt, b"", Around.at(doc.data, offset), rules,
                       s.inline_tokens, s.inline_budget_ms / 1000, True, infill)
    if fim is not None and doc.vocab is not None:
        suffix = doc.vocab.tokenize(fim_suffix(doc.data, offset, s.fim_lines))
        prompt = fim_prompt(prompt, suffix, fim, doc.vocab.bos, engine.n_ctx, engine.headroom)
        key = doc.uri + FIM_SESSION
    return Request(doc.uri, key, prompt, doc_prompt, healed, Around.at(doc.data, offset), rules, s.inline_tokens,
                   s.inline_budget_ms / 1000, fim is not None)


def infill_prefix(vocab: Vocab, prompt: list[int], healed: bytes, headroom: int) -> str:
    """The text before the cursor for ``/infill``: the prompt's tail (a window that moves in
    steps, as the server caches it), then the healed text."""
    has_bos = vocab.bos is not None  # (every target starts with it)
    fitted, _ = window(prompt, INFILL_PREFIX_TOKENS, headroom, has_bos)
    body = fitted[1:] if has_bos and fitted else fitted
    return _text(b"".join(vocab.piece(t) for t in body) + healed)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "ignore")  # (a window's start may cut a character)


def first_token(model: Model, logits: np.ndarray, healed: bytes) -> int | None:
    """The most likely first token that starts with the healed text."""
    allowed = model.tokens_starting_with(healed) if healed else np.arange(len(logits))
    if not len(allowed):
        return None
    best = int(allowed[int(np.argmax(logits[allowed]))])
    return None if model.is_eog(best) else best


def known_path(memo: GreedyMemo, session: Session, first: int, done: Callable[[int, bytes], bool],
               limit: int) -> list[int]:
    """The greedy path from first as far as the memo knows it (what a
    branch stopped by its should_stop had reached)."""
    model = session.model
    prefix = GreedyMemo.prefix(session.tokens)
    path, text = [first], model.piece(first)
    while not done(0, text) and len(path) < limit and not model.is_eog(path[-1]):
        nxt = memo.get(GreedyMemo.key(prefix, path))
        if nxt is None:
            break
        path.append(nxt)
        text += model.piece(nxt)
    return path


@dataclass
class _Progress:
    t0: float
    skip: int  # bytes of healed text at the start of the branch
    first_line_s: float | None = None
    known: int = 0  # bytes of the path the memo knew when the request came
    reached: int = 0  # bytes of the path so far


def _feed_stop(engine: Engine, req: Request, cancelled: ShouldStop) -> ShouldStop:
    """A FIM session's feed yields to a popup request: moving to another
    line re-feeds the whole prefix (it comes after the suffix), which a
    popup request must not wait for. The document's own feed is the popup's
    work too."""
    if not req.fim:
        return cancelled
    return lambda: cancelled() or engine.jobs_waiting


def suggest(engine: Engine, req: Request, cancelled: ShouldStop, deadline: float | None = None) -> Suggestion:
    """Engine thread: sync the session to the prompt and grow one greedy
    branch until a stop rule, a limit, or (after the first line) the budget.
    A long read of the document still going at ``deadline`` raises LongRead
    (see ``Engine.sync``)."""
    t0, decode0 = time.perf_counter(), Session.decode_seconds
    stats = InlineStats()
    try:
        session = engine.sync(req.key, req.prompt, _feed_stop(engine, req, cancelled), req.healed, deadline)
    except Cancelled:
        if cancelled():
            raise
        return Suggestion("", 0, False, stats)  # a popup request came first; the next request goes on
    stats.fed = engine.stats[req.key].fed_last
    model = engine.model
    first = first_token(model, session.logits, req.healed)
    if first is None:
        return Suggestion("", False, True, stats)
    memo = engine.exact_memo
    if memo is None:  # (an empty memo is falsy)
        memo = GreedyMemo()  # a private one still lets a stopped branch be read back
    progress = _Progress(t0, len(req.healed))

    def done(_i: int, text: bytes) -> bool:
        progress.reached = max(progress.reached, len(text))
        body = text[progress.skip :].replace(b"\r\n", b"\n")
        if progress.first_line_s is None and any(useful(line) for line in body.split(b"\n")[:-1]):
            progress.first_line_s = time.perf_counter() - t0
        return scan(body, req.around, req.rules).final

    def should_stop() -> bool:  # asked before each decode call
        if cancelled():
            return True
        if progress.first_line_s is None:
            return False
        if engine.jobs_waiting:  # e.g. a popup request: it does not wait behind ghost text
            return True
        # past the budget; but every request gets past what the memo knew,
        # so asking again always gets further
        return progress.reached > progress.known and time.perf_counter() - t0 > req.budget_s

    def counted() -> bool:
        stop = should_stop()
        stats.decode_calls += not stop
        return stop

    progress.known = progress.reached = len(b"".join(
        model.piece(tok) for tok in known_path(memo, session, first, done, req.max_tokens)))
    hits0 = memo.hits
    try:
        paths, _ = extend(session, [first], done, [req.max_tokens], counted, memo)
        path = paths[0]
    except Cancelled:
        if cancelled():
            raise
        path = known_path(memo, session, first, done, req.max_tokens)  # the budget ran out
    stats.memo_steps = memo.hits - hits0
    stats.tokens = len(path)
    stats.ms = (time.perf_counter() - t0) * 1000
    stats.decode_ms = (Session.decode_seconds - decode0) * 1000
    stats.first_line_ms = None if progress.first_line_s is None else progress.first_line_s * 1000
    return _shown(model, path, req, progress.skip, stats)


def suggest_remote(engine: Engine, req: Request, cancelled: ShouldStop) -> Suggestion:
    """``suggest`` on a remote engine: the likeliest first token that starts
    with the healed text, then one greedy continuation on the document's slot
    (up to ``inlineTokens``; the request's budget stops it), shaped by the
    same rules."""
    t0 = time.perf_counter()
    stats = InlineStats()
    pool, model = engine.pool, engine.model
    if req.infill is not None:
        return _infilled(engine, req, cancelled, t0)
    top = pool.top_next(req.uri, req.prompt, 40, cancelled, engine.focus)
    first = next((t.id for t in top if t.piece.startswith(req.healed) and not model.is_eog(t.id)), None)
    if first is None:
        return Suggestion("", 0, True, stats)

    budget_ms = max(1, int((req.budget_s - (time.perf_counter() - t0)) * 1000))

    def should_stop() -> bool:  # (no line break coming, or an API with no time limit: given up)
        return cancelled() or time.perf_counter() - t0 > req.budget_s + LINE_GRACE_S

    try:  # the server ends it past the budget, at a line break: the first line comes whole
        path = [first, *pool.greedy(req.uri, [*req.prompt, first], req.max_tokens - 1, should_stop, None, budget_ms)]
    except Cancelled:
        if cancelled():
            raise
        return Suggestion("", 0, False, stats)  # over the budget: asking again will find the slot warm
    stats.tokens, stats.ms = len(path), (time.perf_counter() - t0) * 1000
    return _shown(model, path, req, len(req.healed), stats)


def _infilled(engine: Engine, req: Request, cancelled: ShouldStop, t0: float) -> Suggestion:
    """``suggest_remote`` through ``/infill``: one greedy middle, on the document's FIM slot."""
    assert req.infill is not None
    stats = InlineStats()
    prefix, suffix = req.infill
    budget_ms = max(1, int(req.budget_s * 1000 - (time.perf_counter() - t0) * 1000))

    def should_stop() -> bool:  # (no line break coming: given up as /completion's path is)
        return cancelled() or time.perf_counter() - t0 > req.budget_s + LINE_GRACE_S

    try:  # the server ends it past the budget, at a line break
        path = engine.pool.infill(req.key, prefix, suffix, req.max_tokens, should_stop, None, engine.focus,
                                  budget_ms)
    except Cancelled:
        if cancelled():
            raise
        return Suggestion("", 0, False, stats)
    if not path:
        return Suggestion("", 0, True, stats)
    stats.tokens, stats.ms = len(path), (time.perf_counter() - t0) * 1000
    stats.fed = engine.stats[req.key].fed_last
    return _shown(engine.model, path, req, 0, stats)


def _shown(model: Model, path: list[int], req: Request, skip: int, stats: InlineStats) -> Suggestion:
    """What a branch's path shows (after the healed text), and whether more can come."""
    text = b"".join(model.piece(tok) for tok in path)[skip:]
    ended = model.is_eog(path[-1])
    final = ended or len(path) >= req.max_tokens or scan(text.replace(b"\r\n", b"\n"), req.around, req.rules).final
    out = shape(text, req.around, req.rules, ended, req.fim)
    return Suggestion(out.text if out else "", out.covers if out else 0, final, stats)


def extend_task(engine: Engine, req: Request, more_lines: int) -> Callable[[ShouldStop], None]:
    """Idle work for the engine: continue the suggestion's greedy path
    ``more_lines`` lines past its limit, with no budget. That fills the memo
    with the rest of a suggestion the budget cut short, and with what comes
    after it once it is accepted (the next suggestion walks it for free).
    Preempted, it raises Cancelled (the engine runs it again later); the
    steps it computed stay in the memo."""

    def run(should_stop: ShouldStop) -> None:
        memo = engine.exact_memo
        if memo is None:
            return  # nothing would outlive the task
        session = engine.sync(req.key, req.prompt, should_stop, req.healed)
        first = first_token(engine.model, session.logits, req.healed)
        if first is None:
            return
        lines = req.rules.lines + more_lines
        skip = len(req.healed)

        def done(_i: int, text: bytes) -> bool:
            return text[skip:].count(b"\n") >= lines

        extend(session, [first], done, [req.max_tokens * 2], should_stop, memo)  # Cancelled: retried later

    return run


# -- the event-loop side: type-through ------------------------------------------
@dataclass(frozen=True)
class Shown:
    """A suggestion as shown: the document around it, byte for byte."""

    before: bytes  # the document before the cursor
    after: bytes  # the document after the cursor
    text: bytes  # the suggestion as inserted (document line breaks)
    covers: int
    complete: bool


class Inline:
    """Ghost text state on the event loop: the last suggestion shown per
    document (type-through) and the last request's stats."""

    def __init__(self) -> None:
        self._shown: dict[str, Shown] = {}
        self.stats: dict[str, InlineStats] = {}

    def type_through(self, uri: str, data: bytes, offset: int) -> Suggestion | None:
        """If the text before the cursor is what was there when a suggestion
        was shown plus a prefix of it, and the text after the cursor has not
        changed, the rest of that suggestion (compared byte for byte)."""
        shown = self._shown.get(uri)
        if shown is None or len(data) - offset != len(shown.after) or offset < len(shown.before):
            return None
        typed = data[len(shown.before) : offset]
        if not typed and not shown.complete:
            return None  # asked again at the same place: the engine has more
        if len(typed) >= len(shown.text) or not shown.text.startswith(typed):
            return None
        if not data.startswith(shown.before) or data[offset:] != shown.after:
            return None
        return Suggestion(shown.text[len(typed) :].decode("utf-8"), shown.covers, shown.complete)

    def show(self, uri: str, before: bytes, after: bytes, suggestion: Suggestion) -> None:
        if suggestion.text:
            self._shown[uri] = Shown(before, after, suggestion.text.encode("utf-8"), suggestion.covers,
                                     suggestion.complete)
        else:
            self._shown.pop(uri, None)

    def forget(self, uri: str) -> None:
        self._shown.pop(uri, None)
        self.stats.pop(uri, None)
