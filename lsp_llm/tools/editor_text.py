"""A document as the editor holds it: text, version and LSP positions in a
position encoding, written apart from the server's ``documents.py`` so that
the fuzz tests and ``lsp-llm soak`` can check the server against it. The
tools' one code-unit counter (``units``) is here."""

from __future__ import annotations

import hashlib
import re

from lsprotocol import types as t

from ..features.after_cursor import covered

_BREAK = re.compile(r"\r\n|\r|\n")

Pos = tuple[int, int]  # (line, column), the column in code points


def units(text: str, encoding: str) -> int:
    """Length of text in the code units of an LSP position encoding."""
    if encoding == "utf-8":
        return len(text.encode("utf-8", "surrogatepass"))
    if encoding == "utf-16":
        return len(text.encode("utf-16-le", "surrogatepass")) // 2
    return len(text)


def lsp_position(text: str, pos: Pos, encoding: str = "utf-16") -> t.Position:
    """The LSP position of a code-point (line, column) in text whose lines end in "\\n"."""
    line, col = pos
    start = 0
    for _ in range(line):
        start = text.index("\n", start) + 1
    return t.Position(line, units(text[start : start + col], encoding))


class EditorText:
    def __init__(self, uri: str, text: str, encoding: str, version: int = 1) -> None:
        self.uri, self.text, self.encoding, self.version = uri, text, encoding, version

    def lines(self) -> list[tuple[int, int]]:
        """(start, end of content) of each line, as indices into text."""
        out, start = [], 0
        for m in _BREAK.finditer(self.text):
            out.append((start, m.start()))
            start = m.end()
        return out + [(start, len(self.text))]

    def boundaries(self) -> list[int]:
        """Indices where an edit may start or end: not inside a CRLF."""
        return [i for i in range(len(self.text) + 1)
                if not (0 < i < len(self.text) and self.text[i - 1] == "\r" and self.text[i] == "\n")]

    def position(self, index: int) -> t.Position:
        for line, (start, end) in enumerate(self.lines()):
            if index <= end:
                assert index >= start, "inside a line break"
                return t.Position(line, units(self.text[start:index], self.encoding))
        raise ValueError(f"index {index} past the end")

    def index(self, pos: t.Position) -> int | None:
        """The index a position names exactly, or None (between code units
        of one character, or past the end of its line or of the text)."""
        lines = self.lines()
        if pos.line >= len(lines):
            return None
        start, end = lines[pos.line]
        for i in range(start, end + 1):
            n = units(self.text[start:i], self.encoding)
            if n == pos.character:
                return i
            if n > pos.character:
                return None
        return None

    def change(self, start: int, end: int, new: str) -> t.TextDocumentContentChangePartial:
        """Replace text[start:end]; returns the change as the editor sends it."""
        rng = t.Range(self.position(start), self.position(end))
        self.text = self.text[:start] + new + self.text[end:]
        return t.TextDocumentContentChangePartial(range=rng, text=new)

    def replace_all(self, text: str) -> t.TextDocumentContentChangeWholeDocument:
        self.text = text
        return t.TextDocumentContentChangeWholeDocument(text=text)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()

    @property
    def length(self) -> int:
        return units(self.text, self.encoding)

    def edit_fits(self, at: int, item: t.CompletionItem) -> bool:
        """The item's textEdit starts at or before the cursor (``at``), over the
        text the item starts with, and ends at the cursor or past it over
        exactly the closers the item closes (``after_cursor.covered``)."""
        edit = item.text_edit
        if not isinstance(edit, t.TextEdit):
            return False
        start, end = self.index(edit.range.start), self.index(edit.range.end)
        line_end = self.lines()[self.position(at).line][1]
        if start is None or end is None or not start <= at <= end <= line_end:
            return False
        typed = self.text[start:at]
        if not edit.new_text.startswith(typed):
            return False
        rest = self.text[at:line_end].encode("utf-8", "surrogatepass")
        takes = covered(edit.new_text[len(typed):].encode("utf-8", "surrogatepass"), rest)
        return self.text[at:end].encode("utf-8", "surrogatepass") == rest[:takes]
