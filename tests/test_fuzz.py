"""Fuzz campaign through the real server over stdio (tiny model).

Hypothesis writes scripts: multi-change didChange with non-ASCII (é, 😀,
CJK) and CRLF/CR text, completions (some with an edit sent while they run),
cancels, close/reopen, configuration changes (a model reload among them) and
bad input, under every position encoding a client may offer (or none).
After every step the server's mirror equals the editor's text (hash, length
in the negotiated units, version, stale flag: ``lsp-llm.document``); every
request is answered; every textEdit range is valid in the negotiated units,
ends at the cursor and covers the text the item starts with.

Bounded: a few examples per encoding, at most ``STEPS`` steps each; the
whole file takes about a minute on an idle 2-core machine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException

from lsp_llm.tools.client import StdioServer, server_command
from lsp_llm.tools.editor_text import EditorText

T = TypeVar("T")
OFFERS = {"none": None, "utf-8": ["utf-8"], "utf-16": ["utf-16"], "utf-32": ["utf-32"],
          "utf-16+utf-8": ["utf-16", "utf-8"]}
EXAMPLES = 4  # per encoding
STEPS = 14
ANSWER_S = 30  # every request is answered within this

PIECES = list("abcxyz_().:=\t#0 ") + ["\n", "\r\n", "\r", "é", "😀", "中文", "def ", "return ", "    ", "crab"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=10).map("".join)
FRACTION = st.floats(0, 1)


@dataclass(frozen=True)
class Edit:
    changes: list[tuple[float, float, str]]  # (start, end, text); start and end are fractions of the text


@dataclass(frozen=True)
class Complete:
    at: float
    edit_meanwhile: str | None  # typed while the request runs
    delay_ms: int = 0  # ... this long after the request


@dataclass(frozen=True)
class Cancel:
    at: float
    delay_ms: int


@dataclass(frozen=True)
class Reopen:
    text: str | None  # None: the same text


@dataclass(frozen=True)
class Configure:
    settings: dict[str, Any]


@dataclass(frozen=True)
class Full:
    text: str


@dataclass(frozen=True)
class Bad:
    kind: str
    at: float


BAD_KINDS = ["unknown-doc-completion", "unknown-doc-change", "negative", "missing-params", "unknown-method",
             "bad-range", "past-line-end", "unknown-doc-command"]
SETTINGS = st.one_of(
    st.fixed_dictionaries({"items": st.integers(1, 8)}),
    st.fixed_dictionaries({"lineTokens": st.integers(0, 16)}),
    st.fixed_dictionaries({"maxSessions": st.integers(1, 4)}),
    st.sampled_from([{"items": "many"}, {"nope": 1}, {"maxSessions": 0}, {"logLevel": "loud"}]),  # bad
    st.sampled_from([{"nCtx": 512}, {"nCtx": 1024}]),  # a model reload
)
STEP = st.one_of(
    st.builds(Edit, st.lists(st.tuples(FRACTION, FRACTION, TEXT), min_size=1, max_size=4)),
    st.builds(Edit, st.lists(st.tuples(FRACTION, FRACTION, TEXT), min_size=1, max_size=4)),
    st.builds(Complete, FRACTION, st.one_of(st.none(), TEXT)),
    st.builds(Complete, FRACTION, TEXT.filter(bool), st.integers(0, 15)),  # an edit while the request runs
    st.builds(Cancel, FRACTION, st.integers(0, 30)),
    st.builds(Reopen, st.one_of(st.none(), TEXT)),
    st.builds(Configure, SETTINGS),
    st.builds(Full, TEXT),
    st.builds(Bad, st.sampled_from(BAD_KINDS), FRACTION),
)


class Loop:
    """An event loop on its own thread: the client keeps reading between
    examples, and the (synchronous) hypothesis test waits on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Fuzzed:
    loop: Loop
    server: StdioServer
    examples: int = 0


@pytest.fixture(scope="module", params=list(OFFERS))
def fuzzed(request: pytest.FixtureRequest, tiny_model_path: Path) -> Iterator[Fuzzed]:
    loop = Loop()
    offer = OFFERS[request.param]

    async def start() -> StdioServer:
        server = StdioServer(server_command(str(tiny_model_path)))
        general = t.GeneralClientCapabilities(position_encodings=offer) if offer is not None else None
        await server.start(t.ClientCapabilities(general=general), {"readBudgetMs": 20000})
        return server

    server = loop.run(start())
    assert server.encoding in (offer or ["utf-16"]), server.encoding
    yield Fuzzed(loop, server)
    loop.run(server.stop())
    loop.close()


@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(text=TEXT, steps=st.lists(STEP, min_size=1, max_size=STEPS))
def test_the_mirror_and_every_answer_stay_right(fuzzed: Fuzzed, text: str, steps: list[Any]) -> None:
    fuzzed.examples += 1
    uri = f"file:///tmp/fuzz{fuzzed.examples}.py"
    fuzzed.loop.run(Script(fuzzed.server, EditorText(uri, text, fuzzed.server.encoding)).run(steps), 300)


class Script:
    """Plays steps against the server and checks it after each."""

    def __init__(self, server: StdioServer, doc: EditorText) -> None:
        self.server, self.doc = server, doc
        self.sent = doc.version  # the last version sent (a bad change is not applied)
        self.stale = False

    async def run(self, steps: list[Any]) -> None:
        self.open()
        await self.check("open")
        for i, step in enumerate(steps):
            await self.play(step)
            await self.check(f"step {i}: {step}")
        self.server.client.text_document_did_close(
            t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri=self.doc.uri)))
        assert self.server.alive

    def open(self) -> None:
        self.server.client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(
            uri=self.doc.uri, language_id="python", version=self.doc.version, text=self.doc.text)))

    def at(self, fraction: float) -> int:
        b = self.doc.boundaries()
        return b[min(len(b) - 1, int(fraction * len(b)))]

    def send(self, changes: list[Any], applied: bool = True) -> None:
        self.sent += 1
        if applied:
            self.doc.version = self.sent
        self.server.client.text_document_did_change(t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=self.doc.uri, version=self.sent),
            content_changes=changes))

    def edit(self, changes: list[tuple[float, float, str]]) -> None:
        sent = []
        for a, b, text in changes:  # each change's range is in the text left by the previous one
            start, end = sorted((self.at(a), self.at(b)))
            sent.append(self.doc.change(start, end, text))
        self.send(sent)

    async def play(self, step: Any) -> None:
        if isinstance(step, Edit):
            self.edit(step.changes)
        elif isinstance(step, Full):
            self.send([self.doc.replace_all(step.text)])
            self.stale = False
        elif isinstance(step, Complete):
            await self.complete(self.at(step.at), step.edit_meanwhile, step.delay_ms)
        elif isinstance(step, Cancel):
            await self.cancel(self.at(step.at), step.delay_ms)
        elif isinstance(step, Reopen):
            self.server.client.text_document_did_close(
                t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri=self.doc.uri)))
            self.doc.text = self.doc.text if step.text is None else step.text
            self.sent += 1
            self.doc.version, self.stale = self.sent, False
            self.open()
        elif isinstance(step, Configure):
            self.server.client.workspace_did_change_configuration(
                t.DidChangeConfigurationParams(settings={"lsp-llm": step.settings}))
        else:
            await self.bad(step.kind, self.at(step.at))

    def params(self, index: int, uri: str | None = None) -> t.CompletionParams:
        return t.CompletionParams(text_document=t.TextDocumentIdentifier(uri=uri or self.doc.uri),
                                  position=self.doc.position(index))

    async def complete(self, index: int, meanwhile: str | None, delay_ms: int = 0) -> None:
        before = EditorText(self.doc.uri, self.doc.text, self.doc.encoding)
        pos = self.doc.position(index)
        answer = asyncio.ensure_future(self.server.request(t.TEXT_DOCUMENT_COMPLETION, self.params(index), ANSWER_S))
        if meanwhile is not None:
            await asyncio.sleep(delay_ms / 1000)
            self.send([self.doc.change(index, index, meanwhile)])
        self.check_items(before, pos, await answer)

    async def cancel(self, index: int, delay_ms: int) -> None:
        before = EditorText(self.doc.uri, self.doc.text, self.doc.encoding)
        pos = self.doc.position(index)
        msg_id = f"cancel-{self.doc.uri}-{self.sent}-{index}"
        answer = asyncio.ensure_future(self.server.client.protocol.send_request_async(
            t.TEXT_DOCUMENT_COMPLETION, self.params(index), msg_id=msg_id))
        await asyncio.sleep(delay_ms / 1000)
        self.server.client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id=msg_id))
        try:
            result = await asyncio.wait_for(answer, ANSWER_S)
        except JsonRpcException as e:
            assert e.code == -32800, e  # RequestCancelled
            return
        self.check_items(before, pos, result)

    def check_items(self, doc: EditorText, pos: t.Position, result: Any) -> None:
        """Every textEdit is valid in the negotiated units, ends at the cursor
        and replaces the text its item starts with."""
        assert isinstance(result, t.CompletionList), result
        if self.stale:
            assert result.items == [] or not result.items
        for item in result.items:
            rng = item.text_edit.range
            start, end = doc.index(rng.start), doc.index(rng.end)
            assert start is not None and end is not None and start <= end, (rng, doc.text)
            assert rng.end == pos, (rng, pos)
            assert item.text_edit.new_text.startswith(doc.text[start:end]), (item, doc.text[start:end])

    async def bad(self, kind: str, index: int) -> None:
        srv, uri = self.server, self.doc.uri
        if kind == "unknown-doc-completion":
            res = await srv.request(t.TEXT_DOCUMENT_COMPLETION, self.params(index, "file:///nowhere.py"))
            assert isinstance(res, t.CompletionList) and not res.items
        elif kind == "unknown-doc-change":
            srv.client.text_document_did_change(t.DidChangeTextDocumentParams(
                text_document=t.VersionedTextDocumentIdentifier(uri="file:///nowhere.py", version=2),
                content_changes=[t.TextDocumentContentChangeWholeDocument(text="x")]))
        elif kind in ("negative", "missing-params"):
            params = {"textDocument": {"uri": uri}}
            if kind == "negative":
                params["position"] = {"line": -1, "character": 0}
            with pytest.raises(JsonRpcException) as err:
                await srv.raw_request(t.TEXT_DOCUMENT_COMPLETION, params, ANSWER_S)
            assert err.value.code == -32602
        elif kind == "unknown-method":
            with pytest.raises(JsonRpcException) as err:
                await srv.raw_request("lsp-llm/nope", {}, ANSWER_S)
            assert err.value.code == -32601
        elif kind == "unknown-doc-command":
            with pytest.raises(JsonRpcException):
                await srv.document("file:///nowhere.py")
        elif kind == "bad-range":  # end before start: not applied, and the mirror is no longer trusted
            earlier = [b for b in self.doc.boundaries() if b < index]
            if earlier:
                rng = t.Range(self.doc.position(index), self.doc.position(earlier[-1]))
                self.send([t.TextDocumentContentChangePartial(range=rng, text="x")], applied=False)
                self.stale = True
        else:  # past-line-end: LSP clamps to the end of the line
            line = self.doc.position(index).line
            end = self.doc.lines()[line][1]
            rng = t.Range(t.Position(line, 10_000), t.Position(line, 10_000))
            self.doc.change(end, end, "é")
            self.send([t.TextDocumentContentChangePartial(range=rng, text="é")])

    async def check(self, where: str) -> None:
        got = await self.server.document(self.doc.uri)
        want = {"sha256": self.doc.sha256, "length": self.doc.length, "version": self.doc.version,
                "bytes": len(self.doc.text.encode()), "encoding": self.doc.encoding, "stale": self.stale}
        assert {k: got[k] for k in want} == want, (where, self.doc.text)
