"""Fuzz campaign through the real server over stdio (tiny model).

Hypothesis writes scripts: multi-change didChange with non-ASCII (é, 😀,
CJK, a lone surrogate), auto-closed pairs and CRLF/CR text, completions (some
with an edit sent while they run: at the cursor or anywhere before or after
it, some in the same write as the request), cancels, close/reopen,
configuration changes (a model reload among them) and bad input, under every
position encoding a client may offer (or none). After every step the
server's mirror equals the editor's text (hash, length in the negotiated
units, version, stale flag: ``lsp-llm.document``); every request is
answered; every textEdit range is valid in the negotiated units (in the text
the request was sent against), starts at or before the cursor, covers the
text the item starts with and ends at the cursor or over the closers after
it that the item closes itself (``after_cursor.covered``). The first example
of each encoding with some text ends by asking every item (``waitFor:
all``) and comparing with a fresh server's answer for the same text and
settings: the same items.

Bounded: a few examples per encoding, at most ``STEPS`` steps each; the
whole file takes one to two minutes on an idle 2-core machine (more when
others share it).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from lsp_llm.config import Settings
from lsp_llm.tools.client import StdioServer, server_command
from lsp_llm.tools.editor_text import EditorText

T = TypeVar("T")
OFFERS = {"none": None, "utf-8": ["utf-8"], "utf-16": ["utf-16"], "utf-32": ["utf-32"],
          "utf-16+utf-8": ["utf-16", "utf-8"]}
EXAMPLES = 4  # per encoding
COMPARED = 1  # examples per encoding that end compared with a fresh server (a few seconds each)
STEPS = 14
ANSWER_S = 30  # every request is answered within this
OPTIONS = {"readBudgetMs": 20000}

PIECES = list("abcxyz_().:=\t#0 ") + ["\n", "\r\n", "\r", "é", "😀", "中文", "def ", "return ", "    ", "crab",
                                     "\ud800", "()", "[]", "{}", '""', "''"]  # a lone surrogate, auto-closed pairs
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
    where: tuple[float, float] | None = None  # the range it replaces (fractions); None: at the cursor
    together: bool = False  # the request and the change in one write


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
    st.builds(Complete, FRACTION, TEXT, st.integers(0, 15), st.tuples(FRACTION, FRACTION)),  # ... anywhere
    st.builds(Complete, FRACTION, TEXT, st.just(0), st.tuples(FRACTION, FRACTION), st.just(True)),  # one write
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
    command: list[str]
    offer: list[str] | None
    settings: Settings  # as the server has them (the same rules applied to every change)
    examples: int = 0
    compared: int = 0  # examples compared with a fresh server


@pytest.fixture(scope="module", params=list(OFFERS))
def fuzzed(request: pytest.FixtureRequest, tiny_model_path: Path) -> Iterator[Fuzzed]:
    loop = Loop()
    offer = OFFERS[request.param]

    command = server_command(str(tiny_model_path))
    server = loop.run(started(command, offer, OPTIONS))
    assert server.encoding in (offer or ["utf-16"]), server.encoding
    yield Fuzzed(loop, server, command, offer, Settings().update(OPTIONS)[0])
    loop.run(server.stop())
    loop.close()


async def started(command: list[str], offer: list[str] | None, options: dict[str, Any]) -> StdioServer:
    server = StdioServer(command)
    general = t.GeneralClientCapabilities(position_encodings=offer) if offer is not None else None
    await server.start(t.ClientCapabilities(general=general), options)
    return server


@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(text=TEXT, steps=st.lists(STEP, min_size=1, max_size=STEPS), last=FRACTION)
def test_the_mirror_and_every_answer_stay_right(fuzzed: Fuzzed, text: str, steps: list[Any], last: float) -> None:
    fuzzed.examples += 1
    uri = f"file:///tmp/fuzz{fuzzed.examples}.py"
    script = Script(fuzzed, EditorText(uri, text, fuzzed.server.encoding))
    fuzzed.loop.run(script.run(steps, last), 300)


def item_key(item: t.CompletionItem) -> tuple[Any, ...]:
    edit = item.text_edit
    return (item.label, item.kind, item.detail, item.sort_text, edit.new_text, edit.range)


class Script:
    """Plays steps against the server and checks it after each."""

    def __init__(self, fuzzed: Fuzzed, doc: EditorText) -> None:
        self.fuzzed, self.server, self.doc = fuzzed, fuzzed.server, doc
        self.sent = doc.version  # the last version sent (a bad change is not applied)
        self.stale = False

    async def run(self, steps: list[Any], compare_at: float) -> None:
        self.open()
        await self.check("open")
        for i, step in enumerate(steps):
            await self.play(step)
            await self.check(f"step {i}: {step}")
        if self.fuzzed.compared < COMPARED and self.doc.text.strip():  # (the first examples are often empty)
            self.fuzzed.compared += 1
            await self.compare(self.at(compare_at))
        self.server.client.text_document_did_close(
            t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri=self.doc.uri)))
        assert self.server.alive

    async def compare(self, index: int) -> None:
        """Every item (``waitFor: all``) for the text as it ends, and a fresh
        server's for the same text and settings: the same items (greedy
        decoding with exact logits, whatever the history)."""
        self.configure({"waitFor": "all"})
        if self.stale:  # a full text trusts the mirror again
            self.send([self.doc.replace_all(self.doc.text)])
            self.stale = False
        await self.check("before the comparison")
        pos = self.doc.position(index)
        got = await self.server.request(t.TEXT_DOCUMENT_COMPLETION, self.params(index), ANSWER_S)
        self.check_items(self.doc, pos, got)
        s = self.fuzzed.settings
        options = {"items": s.items, "lineTokens": s.line_tokens, "nCtx": s.n_ctx, "waitFor": "all",
                   "readBudgetMs": 60000}
        fresh = await started(self.fuzzed.command, self.fuzzed.offer, options)
        try:
            assert fresh.encoding == self.server.encoding
            fresh.client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(
                uri=self.doc.uri, language_id="python", version=self.doc.version, text=self.doc.text)))
            # (its first answer waits for the model to load)
            want = await fresh.request(t.TEXT_DOCUMENT_COMPLETION, self.params(index), 4 * ANSWER_S)
        finally:
            await fresh.stop()
        self.configure({"waitFor": "top"})  # (the server's default) for the examples that follow
        assert [item_key(i) for i in got.items] == [item_key(i) for i in want.items], (self.doc.text, pos)

    def configure(self, settings: dict[str, Any]) -> None:
        self.server.client.workspace_did_change_configuration(
            t.DidChangeConfigurationParams(settings={"lsp-llm": settings}))
        self.fuzzed.settings = self.fuzzed.settings.update(settings)[0]  # (invalid entries are skipped)

    @contextlib.contextmanager
    def one_write(self) -> Iterator[None]:
        """The messages sent inside reach the server in one write, as a busy client writes them."""
        protocol = self.server.client.protocol
        real, frames = protocol.writer, []

        class Frames:
            def write(self, data: bytes) -> None:
                frames.append(data)

        protocol.writer = Frames()
        try:
            yield
        finally:
            protocol.writer = real
            real.write(b"".join(frames))

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
            await self.complete(self.at(step.at), step.edit_meanwhile, step.delay_ms, step.where, step.together)
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
            self.configure(step.settings)
        else:
            await self.bad(step.kind, self.at(step.at))

    def params(self, index: int, uri: str | None = None) -> t.CompletionParams:
        return t.CompletionParams(text_document=t.TextDocumentIdentifier(uri=uri or self.doc.uri),
                                  position=self.doc.position(index))

    async def complete(self, index: int, meanwhile: str | None, delay_ms: int = 0,
                       where: tuple[float, float] | None = None, together: bool = False) -> None:
        """A completion, and maybe an edit while it runs (``where``: its range;
        before the cursor, the text the request was asked about changes under
        it): the answer is for the text as the request found it."""
        before = EditorText(self.doc.uri, self.doc.text, self.doc.encoding)
        pos = self.doc.position(index)
        start, end = (index, index) if where is None else sorted((self.at(where[0]), self.at(where[1])))
        if together and meanwhile is not None:
            with self.one_write():  # the request first: it was sent against the text before the change
                request = self.server.send(t.TEXT_DOCUMENT_COMPLETION, self.params(index))
                self.send([self.doc.change(start, end, meanwhile)])
            self.check_items(before, pos, await asyncio.wait_for(request.future, ANSWER_S))
            return
        answer = asyncio.ensure_future(self.server.request(t.TEXT_DOCUMENT_COMPLETION, self.params(index), ANSWER_S))
        if meanwhile is not None:
            await asyncio.sleep(delay_ms / 1000)
            self.send([self.doc.change(start, end, meanwhile)])
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
        """Every textEdit is valid in the negotiated units, starts at or
        before the cursor and replaces the text its item starts with; it
        ends at the cursor or, where the item closes what the line already
        holds after the cursor (an auto-closed pair), past it on the same
        line, over exactly the closers ``covered`` says it takes."""
        assert isinstance(result, t.CompletionList), result
        if self.stale:
            assert result.items == [] or not result.items
        cursor = doc.index(pos)
        assert cursor is not None, (pos, doc.text)
        for item in result.items:
            assert doc.edit_fits(cursor, item), (item, pos, doc.text)

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
                "bytes": len(self.doc.text.encode("utf-8", "surrogatepass")),  # (a lone surrogate: 3 bytes)
                "encoding": self.doc.encoding, "stale": self.stale}
        assert {k: got[k] for k in want} == want, (where, self.doc.text)
