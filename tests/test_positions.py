"""Positions in every negotiated encoding, through the real server over stdio
(default model): edits land where the client meant them, and completion
ranges come back in the client's units, on lines with é, 😀 and CJK text."""

from __future__ import annotations

import sys

import pytest
import pytest_lsp
from lsprotocol import types as t
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from lsp_llm.text.documents import DocumentError, Encoding

SERVER = [sys.executable, "-m", "lsp_llm", "--threads", "2"]
K = t.PositionEncodingKind

# what the client offers -> what it must get
OFFERS = {
    "utf8-and-16": ([K.Utf16, K.Utf8], K.Utf8),  # UTF-8 is preferred when offered
    "utf16": ([K.Utf16], K.Utf16),
    "utf32": ([K.Utf32], K.Utf32),
    "none": (None, K.Utf16),  # no capability: the LSP default
    "unknown": (["utf-7"], K.Utf16),  # nothing we know: the LSP default
}
# each line ends with "pri" typed after non-ASCII text
LINES = ["naïve = 'é' + ", "face = '😀' + ", "名前 = '名前😀é' + "]


def units(text: str, kind: K) -> int:
    if kind == K.Utf8:
        return len(text.encode("utf-8"))
    if kind == K.Utf16:
        return len(text.encode("utf-16-le")) // 2
    return len(text)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER), params=list(OFFERS))
async def negotiated(lsp_client: LanguageClient, request: pytest.FixtureRequest):
    offered, expected = OFFERS[request.param]
    caps = client_capabilities("neovim")
    caps.general = t.GeneralClientCapabilities(position_encodings=offered)
    result = await lsp_client.initialize_session(t.InitializeParams(capabilities=caps))
    assert result.capabilities.position_encoding == expected
    lsp_client.kind = expected  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


def change(client: LanguageClient, uri: str, version: int, rng: t.Range, text: str) -> None:
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[t.TextDocumentContentChangePartial(range=rng, text=text)]))


async def test_edits_and_completion_ranges_use_the_negotiated_units(negotiated: LanguageClient) -> None:
    client = negotiated
    kind: K = client.kind  # type: ignore[attr-defined]
    uri = "file:///tmp/positions.py"
    text = "def f(name):\n" + "".join(f"    {line}\n" for line in LINES)
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
    version = 2
    for row, line in enumerate(LINES, start=1):
        full = "    " + line
        col = units(full, kind)
        # replace the quoted non-ASCII text with itself: a wrong unit count moves or resizes the range
        q0, q1 = full.index("'"), full.rindex("'") + 1
        rng = t.Range(t.Position(row, units(full[:q0], kind)), t.Position(row, units(full[:q1], kind)))
        change(client, uri, version, rng, full[q0:q1])
        # then "pri", typed at the end of the line
        for i, ch in enumerate("pri"):
            pos = t.Position(row, col + i)
            change(client, uri, version + 1 + i, t.Range(pos, pos), ch)
        version += 4
        res = await client.text_document_completion_async(t.CompletionParams(
            text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(row, col + 3)))
        assert res is not None and res.items, f"no items on line {row} ({kind})"
        for item in res.items:
            assert item.text_edit.range == t.Range(t.Position(row, col), t.Position(row, col + 3)), (kind, row)
            assert item.text_edit.new_text.startswith("pri"), (kind, row, item.text_edit.new_text)


def test_encodings_are_parsed_from_lsp_values_and_unknown_ones_refused() -> None:
    assert Encoding.of(K.Utf8) is Encoding.UTF8  # not str(K.Utf8) == 'PositionEncodingKind.Utf8'
    assert Encoding.of("utf-32") is Encoding.UTF32
    assert Encoding.of(None) is Encoding.UTF16
    with pytest.raises(DocumentError):
        Encoding.of("utf-7")
