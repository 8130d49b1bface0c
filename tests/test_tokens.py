"""The token mirror: splicing after an edit equals a full tokenization."""

from __future__ import annotations

from itertools import accumulate

from hypothesis import given, settings
from hypothesis import strategies as st

from lsp_llm.engine.model import Model
from lsp_llm.text.tokens import TokenMirror

CODE = (
    "import os\n\ndef crab(x):\n    return x +  1  # a crab walks\n"
    "class Foo:\n    def __init__(self):\n        self.value = 'héllo wörld ✓ 🦀'\n\n\n"
)
ALPHABET = st.sampled_from(list("abc xyz_() .:=\n\t\"'#0123456789") + ["    ", "crab", " crab", "é", "🦀", "\r\n"])
TEXT = st.lists(ALPHABET, max_size=40).map("".join)


def mirror(model: Model, data: bytes) -> TokenMirror:
    return TokenMirror(lambda b: model.tokenize(b, add_bos=False), model.piece, data)


def test_pieces_concatenate_to_the_text(tiny: Model) -> None:
    m = mirror(tiny, CODE.encode())
    assert m.reversible
    assert b"".join(tiny.piece(t) for t in m.ids) == CODE.encode()
    assert m.ends[-1] == len(CODE.encode())


def test_edit_changes_the_token_before_the_edit_point(tiny: Model) -> None:
    # " crab" vs " cra" + "b": typing one letter rewrites the previous token
    data = b"a cra"
    m = mirror(tiny, data)
    new = data + b"b"
    m.splice(new, len(data), len(data), len(new))
    assert m.ids == tiny.tokenize(new, add_bos=False)
    assert m.ids[-1] != tiny.tokenize(data, add_bos=False)[-1]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_edits_splice_equals_full_tokenization(tiny: Model, data: st.DataObject) -> None:
    text = data.draw(TEXT, "text") + CODE
    raw = text.encode()
    m = mirror(tiny, raw)
    for _ in range(data.draw(st.integers(1, 6), "n_edits")):
        chars = len(text)
        a = data.draw(st.integers(0, chars), "start")
        b = data.draw(st.integers(a, min(chars, a + 12)), "end")
        ins = data.draw(TEXT, "insert")
        start, end = len(text[:a].encode()), len(text[:b].encode())
        text = text[:a] + ins + text[b:]
        raw = text.encode()
        m.splice(raw, start, end, start + len(ins.encode()))
        assert m.ids == tiny.tokenize(raw, add_bos=False)
        assert (m.ends[-1] if m.ends else 0) == len(raw)
        assert m.ends == list(accumulate(len(tiny.piece(t)) for t in m.ids))
        cut = len(text[: data.draw(st.integers(0, len(text)), "cursor")].encode())
        assert m.prefix(raw, cut) == tiny.tokenize(raw[:cut], add_bos=False)


def test_splice_is_local_on_a_big_file(tiny: Model) -> None:
    text = CODE * 200
    raw = text.encode()
    m = mirror(tiny, raw)
    calls = []
    real = m._tokenize
    m._tokenize = lambda b: calls.append(len(b)) or real(b)  # type: ignore[method-assign]
    at = len(raw) // 2
    new = raw[:at] + b"x" + raw[at:]
    m.splice(new, at, at, at + 1)
    assert m.ids == tiny.tokenize(new, add_bos=False)
    assert m.full_retokenizations == 0
    assert max(calls) < 200  # bytes re-tokenized, out of ~20 kB
