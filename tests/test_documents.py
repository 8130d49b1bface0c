"""Document mirror: positions in UTF-16/UTF-8, edits, clamping, bad input."""

from __future__ import annotations

import pytest

from lsp_llm.engine.model import Model
from lsp_llm.text.documents import Document, DocumentError, DocumentStore, Encoding, Vocab

TEXT = "a = '🦀é'\r\nb = 2\nlast"


@pytest.fixture
def vocab(tiny: Model) -> Vocab:
    return Vocab(lambda b: tiny.tokenize(b, add_bos=False), tiny.piece, tiny.bos)


class Sink:
    def __init__(self) -> None:
        self.updates: list[tuple[str, list[int], int, bytes]] = []

    def update(self, uri: str, target: list[int], doc_tokens: int, healed: bytes = b"", focus: bool = True) -> None:
        self.updates.append((uri, target, doc_tokens, healed))

    def forget(self, uri: str) -> None:
        self.updates.append((uri, [], -1, b""))


def test_utf16_positions_count_surrogate_pairs(vocab: Vocab) -> None:
    d = Document("u", TEXT, 1, vocab)
    # line 0: a = '🦀é' -> 🦀 is 2 UTF-16 units, 4 UTF-8 bytes
    assert d.offset(0, 5, Encoding.UTF16) == 5
    assert d.offset(0, 7, Encoding.UTF16) == 9  # after the crab
    assert d.offset(0, 8, Encoding.UTF16) == 11  # after é
    assert d.position(11, Encoding.UTF16) == (0, 8)
    assert d.offset(0, 11, Encoding.UTF8) == 11
    assert d.offset(1, 0, Encoding.UTF16) == len("a = '🦀é'\r\n".encode())  # CRLF is one break


def test_positions_are_clamped_as_lsp_says(vocab: Vocab) -> None:
    d = Document("u", TEXT, 1, vocab)
    assert d.offset(0, 999, Encoding.UTF16) == len("a = '🦀é'".encode())  # end of line, before CRLF
    assert d.offset(99, 0, Encoding.UTF16) == len(d.data)
    with pytest.raises(DocumentError):
        d.offset(-1, 0, Encoding.UTF16)


def test_split_surrogate_pair_snaps_to_its_start(vocab: Vocab) -> None:
    d = Document("u", TEXT, 1, vocab)
    assert d.offset(0, 6, Encoding.UTF16) == 5  # inside 🦀
    assert d.offset(0, 7, Encoding.UTF8) == 5  # inside its UTF-8 bytes


def test_changes_apply_in_order_and_tokens_follow(vocab: Vocab, tiny: Model) -> None:
    sink = Sink()
    store = DocumentStore(vocab, sink)
    store.open("u", TEXT, 1)
    store.change("u", 2, [((1, 4, 1, 5), "42"), ((2, 4, 2, 4), "_line\x00"), (None, "fresh\n")], Encoding.UTF16)
    doc = store.get("u")
    assert doc.data == b"fresh\n"
    store.change("u", 3, [((1, 0, 1, 0), "x = pri")], Encoding.UTF16)
    assert doc.data == b"fresh\nx = pri"
    assert doc.target() == tiny.tokenize(b"fresh\nx = pri", True)
    prompt, healed = doc.prompt()
    target = doc.target()
    assert target[: len(prompt)] == prompt and len(prompt) < len(target)
    assert b"".join(tiny.piece(t) for t in target[len(prompt):]) == healed
    assert healed.endswith(b"pri") and b"=" not in healed  # healing stays inside the word
    assert sink.updates[-1] == ("u", prompt, len(doc.target()), healed)


def test_bad_changes_are_errors_not_crashes(vocab: Vocab) -> None:
    store = DocumentStore(vocab, Sink())
    with pytest.raises(DocumentError):
        store.change("nope", 1, [(None, "x")], Encoding.UTF16)
    store.open("e", "", 1)
    assert store.get("e").target() == [vocab.bos]  # an empty document
    store.open("u", "hello", 1)
    with pytest.raises(DocumentError):
        store.change("u", 2, [((0, 4, 0, 1), "x")], Encoding.UTF16)  # end before start
    with pytest.raises(DocumentError):
        store.trusted("u")  # never silently wrong ...
    store.change("u", 3, [(None, "hello again")], Encoding.UTF16)
    assert store.trusted("u").data == b"hello again"  # ... until the full text resyncs it
    with pytest.raises(DocumentError):
        store.close("nope")


def test_word_start(vocab: Vocab) -> None:
    d = Document("u", "x = self.pri", 1, vocab)
    assert d.word_start(len(d.data)) == len(b"x = self.")
    assert d.word_start(len(b"x = ")) == len(b"x = ")


def test_a_request_moves_the_cursor_that_the_background_prepares(vocab: Vocab) -> None:
    sink = Sink()
    store = DocumentStore(vocab, sink)
    store.open("u", TEXT, 1)  # the cursor starts at the end of the text
    doc = store.get("u")
    assert sink.updates[-1][1] == doc.prompt(len(doc.data))[0]
    store.move_cursor("u", 5)
    assert doc.cursor == 5 and sink.updates[-1][1] == doc.prompt(5)[0]
    n = len(sink.updates)
    store.move_cursor("u", 5)  # already there: the same prompt again (it only puts the document in focus)
    assert len(sink.updates) == n + 1 and sink.updates[-1] == sink.updates[-2]
