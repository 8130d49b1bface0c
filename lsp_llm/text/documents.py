"""Open documents: UTF-8 text, LSP position conversion, token mirror.

A document knows its text (bytes), its tokens (``TokenMirror``) and the
cursor (end of the latest edit). ``target(offset)`` is the token sequence a
model session must hold to complete at ``offset``: BOS + the tokens of the
text before it. The engine is told about every new target (``Sink``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from ..engine.scheduler import DocTarget
from .tokens import Piece, Tokenize, TokenMirror

log = logging.getLogger(__name__)

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_IDENT = re.compile(rb"[A-Za-z0-9_\x80-\xff]*\Z")
HEAL_TOKENS = 4


class DocumentError(ValueError):
    """Bad input about a document; the message is meant for the client's log."""


@dataclass(frozen=True)
class Vocab:
    tokenize: Tokenize  # bytes -> ids, without BOS
    piece: Piece
    bos: int | None  # prepended to every target, if the model wants one
    has_prefix: Callable[[bytes], bool] = lambda _: True  # does some token start with these bytes?
    fim: Any = None  # the model's FIM tokens, if any (from the same model as the ids)


class Sink(Protocol):
    def update(self, uri: str, target: list[int], doc_tokens: int, healed: bytes = b"",
               focus: bool = True) -> None: ...
    def forget(self, uri: str) -> None: ...


class Encoding(str, Enum):
    """The unit of an LSP position's ``character``: the one home of position
    units. Values are the LSP ``PositionEncodingKind`` strings."""

    UTF8 = "utf-8"
    UTF16 = "utf-16"
    UTF32 = "utf-32"

    @classmethod
    def of(cls, kind: object) -> Encoding:
        """The encoding an LSP ``PositionEncodingKind`` (or its string) names;
        None means the LSP default, UTF-16. Anything else is refused."""
        if kind is None:
            return cls.UTF16
        value = kind.value if isinstance(kind, Enum) else kind
        try:
            return cls(value)
        except ValueError:
            raise DocumentError(f"unsupported position encoding {value!r}") from None


def encode(text: str) -> bytes:
    """Text as document bytes. A lone surrogate (legal in a JSON string)
    must not crash the mirror: it takes 3 bytes, as one code point."""
    return text.encode("utf-8", "surrogatepass")


def decode(data: bytes) -> str:
    """Document bytes as text: the one decoding, the inverse of ``encode``
    (a lone surrogate is one code point again, as the client counts it)."""
    return data.decode("utf-8", "surrogatepass")


def count(data: bytes, encoding: Encoding) -> int:
    """The length of document bytes in the units of an LSP position encoding."""
    return len(data) if encoding is Encoding.UTF8 else _units(decode(data), encoding)[-1]


def _units(text: str, encoding: Encoding) -> list[int]:
    """Cumulative code-unit offsets of each code point boundary in text."""
    if encoding is Encoding.UTF16:
        sizes = (2 if ord(c) > 0xFFFF else 1 for c in text)
    elif encoding is Encoding.UTF8:
        sizes = (len(c.encode("utf-8", "surrogatepass")) for c in text)
    elif encoding is Encoding.UTF32:
        sizes = (1 for _ in text)
    else:
        raise DocumentError(f"unsupported position encoding {encoding!r}")
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


class Document:
    def __init__(self, uri: str, text: str, version: int, vocab: Vocab | None) -> None:
        self.uri = uri
        self.version = version
        self.vocab = vocab
        self.data = encode(text)
        self._index_lines()
        # no tokens until a model is loaded (DocumentStore.set_vocab)
        self.mirror = TokenMirror(vocab.tokenize, vocab.piece, self.data) if vocab else None
        self.cursor = len(self.data)
        self.stale = False  # a change could not be applied: text no longer trusted

    def _index_lines(self) -> None:
        self.line_starts = [0] + [m.end() for m in _LINE_BREAK.finditer(self.data)]

    # -- positions ------------------------------------------------------------
    def offset(self, line: int, character: int, encoding: Encoding) -> int:
        """Byte offset of an LSP position. Past the end of a line means the
        line's end; past the last line means the end of the document (LSP)."""
        if line < 0 or character < 0:
            raise DocumentError(f"negative position ({line}, {character})")
        if line >= len(self.line_starts):
            return len(self.data)
        start = self.line_starts[line]
        end = self.line_starts[line + 1] if line + 1 < len(self.line_starts) else len(self.data)
        raw = self.data[start:end]
        content = raw.rstrip(b"\r\n")
        if encoding is Encoding.UTF8:
            col = min(character, len(content))
            while col > 0 and col < len(content) and (content[col] & 0xC0) == 0x80:
                col -= 1  # inside a multi-byte character: snap to its start
            return start + col
        text = decode(content)
        units = _units(text, encoding)
        if character >= units[-1]:
            return start + len(content)
        lo = bisect_right(units, character) - 1  # the code point that starts at or before it
        if units[lo] != character:
            log.warning("%s: position (%d, %d) splits a character; using its start", self.uri, line, character)
        return start + len(encode(text[:lo]))

    def position(self, offset: int, encoding: Encoding) -> tuple[int, int]:
        offset = max(0, min(offset, len(self.data)))
        line = bisect_right(self.line_starts, offset) - 1
        start = self.line_starts[line]
        prefix = self.data[start:offset]
        return line, count(prefix, encoding)

    def set_vocab(self, vocab: Vocab) -> None:
        """Re-tokenize with another model's vocabulary."""
        self.vocab = vocab
        self.mirror = TokenMirror(vocab.tokenize, vocab.piece, self.data)

    # -- edits ----------------------------------------------------------------
    def replace(self, start: int, end: int, text: str) -> None:
        new = encode(text)
        self.data = self.data[:start] + new + self.data[end:]
        self._index_lines()
        self.cursor = start + len(new)
        if self.mirror is not None:
            try:
                self.mirror.splice(self.data, start, end, start + len(new))
            except Exception:  # a remote tokenizer that failed: the text is right, the tokens come later
                self.mirror = None
                raise

    def replace_all(self, text: str) -> None:
        self.data = encode(text)
        self._index_lines()
        if self.mirror is not None:
            self.mirror.reset(self.data)
        self.cursor = len(self.data)

    # -- what the model must hold ---------------------------------------------
    def target(self, offset: int | None = None) -> list[int]:
        """BOS + the tokens of the text before offset (default: the cursor)."""
        if self.vocab is None:
            raise DocumentError("no model is loaded yet")
        if self.mirror is None:  # its tokens were lost to a tokenizer that failed: read them again
            self.mirror = TokenMirror(self.vocab.tokenize, self.vocab.piece, self.data)
        pos = self.cursor if offset is None else offset
        ids = self.mirror.prefix(self.data, pos)
        return ([self.vocab.bos] if self.vocab.bos is not None else []) + ids

    def prompt(self, offset: int | None = None) -> tuple[list[int], bytes]:
        """What the session holds to complete at offset: the target less its
        last tokens, which completion regenerates under the constraint that
        the first new token starts with their text (token healing: after
        ``retu`` the model may pick ``return`` rather than continue odd
        fragments). The last token is always healed; up to HEAL_TOKENS more
        while they lie inside the word being typed and some token starts with
        their joint text. Returns the prompt and the healed text."""
        target = self.target(offset)
        vocab = self.vocab
        assert vocab is not None
        first = 1 if vocab.bos is not None else 0
        if len(target) <= first:
            return target, b""
        j, text = 1, vocab.piece(target[-1])
        while j < HEAL_TOKENS and len(target) - j > first:
            more = vocab.piece(target[-j - 1]) + text
            if not _IDENT.fullmatch(more.lstrip(b" ")) or not vocab.has_prefix(more):
                break
            j, text = j + 1, more
        return target[:-j], text

    @property
    def n_tokens(self) -> int:
        return len(self.mirror.ids) + (self.vocab.bos is not None) if self.mirror and self.vocab else 0

    def word_start(self, offset: int) -> int:
        """Start of the identifier that ends at offset (offset if none)."""
        lo = max(0, offset - 256)
        m = _IDENT.search(self.data, lo, offset)
        start = m.start() if m else offset
        # never start inside a UTF-8 sequence
        while start < offset and (self.data[start] & 0xC0) == 0x80:
            start += 1
        return start


@dataclass(frozen=True)
class Mirror:
    """A document as the server holds it: version, length in bytes and in
    the negotiated position units, SHA-256 of its UTF-8 text, and whether a
    bad change made it untrusted (``lsp-llm.document``)."""

    uri: str
    version: int
    bytes: int
    length: int  # in the units of encoding
    encoding: str
    sha256: str
    stale: bool

    @classmethod
    def of(cls, doc: Document, encoding: Encoding) -> Mirror:
        return cls(doc.uri, doc.version, len(doc.data), count(doc.data, encoding), encoding.value,
                   hashlib.sha256(doc.data).hexdigest(), doc.stale)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class DocumentStore:
    """The open documents; tells the sink whenever a target changes."""

    def __init__(self, vocab: Vocab | None, sink: Sink) -> None:
        self.vocab = vocab
        self.sink = sink
        self.docs: dict[str, Document] = {}

    def set_vocab(self, vocab: Vocab) -> dict[str, DocTarget]:
        """A (new) model is loaded: re-tokenize every open document in place
        (text, version, cursor and stale flag stay) and return the targets in
        the new vocabulary. The sink is not told: the engine switches models
        and targets in one step (``lifecycle.swap``)."""
        self.vocab = vocab
        for doc in self.docs.values():
            doc.set_vocab(vocab)
        return {uri: self._target(doc) for uri, doc in self.docs.items()}

    def target_in(self, uri: str, vocab: Vocab) -> DocTarget:
        """The document's target in another vocabulary, the document left as
        it is (a reload reads the focus document ahead with it)."""
        doc = copy.copy(self.trusted(uri))
        doc.set_vocab(vocab)
        return self._target(doc)

    def mirror(self, uri: str, encoding: Encoding) -> Mirror:
        """What the server holds for a document, to compare with the editor."""
        return Mirror.of(self.get(uri), encoding)

    def get(self, uri: str) -> Document:
        doc = self.docs.get(uri)
        if doc is None:
            raise DocumentError(f"unknown document {uri} (not opened with didOpen)")
        return doc

    def trusted(self, uri: str) -> Document:
        """The document, if its text can be trusted for completion."""
        doc = self.get(uri)
        if doc.stale:
            raise DocumentError(f"{uri} is out of sync after a bad change; reopen it or send its full text")
        return doc

    def open(self, uri: str, text: str, version: int) -> None:
        if uri in self.docs:
            log.info("%s: opened again; replacing its text", uri)
        doc = self.docs[uri] = Document(uri, text, version, self.vocab)
        if self.vocab is not None:
            self._tell(uri, doc, focus=False)

    def change(self, uri: str, version: int, changes: list[tuple[tuple[int, int, int, int] | None, str]],
               encoding: Encoding) -> None:
        """Apply content changes in order; a None range replaces everything."""
        doc = self.get(uri)
        if version is not None and version <= doc.version:
            log.warning("%s: version %s after %s; applying anyway", uri, version, doc.version)
        for rng, text in changes:
            if rng is None:
                doc.replace_all(text)
                doc.stale = False  # a full text resyncs the mirror
                continue
            sl, sc, el, ec = rng
            try:
                start = doc.offset(sl, sc, encoding)
                end = doc.offset(el, ec, encoding)
                if end < start:
                    raise DocumentError(f"range end before start in change to {uri}")
            except DocumentError:
                doc.stale = True
                raise
            doc.replace(start, end, text)
        doc.version = version
        if self.vocab is not None:
            self._tell(uri, doc)

    def move_cursor(self, uri: str, offset: int) -> None:
        """A request at offset: the user is there, so the background prepares
        that prompt (not, say, the end of a file just opened)."""
        doc = self.get(uri)
        doc.cursor = offset
        if self.vocab is not None:
            self._tell(uri, doc)  # also puts the document in focus

    def _tell(self, uri: str, doc: Document, focus: bool = True) -> None:
        """The document's new prompt; an edit or a request puts it in focus
        (the engine serves it first), an open does not."""
        target = self._target(doc)
        self.sink.update(uri, target.prompt, target.doc_tokens, target.healed, focus)

    @staticmethod
    def _target(doc: Document) -> DocTarget:
        prompt, healed = doc.prompt()
        return DocTarget(prompt, healed, doc.n_tokens)

    def close(self, uri: str) -> None:
        if self.docs.pop(uri, None) is None:
            raise DocumentError(f"didClose for unknown document {uri}")
        self.sink.forget(uri)
