"""The engine's lifecycle: model swaps (vocabulary and model as one step),
failed reloads, progress, shutdown under load. Tiny model, real engine; the
server tests run the real server over stdio."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path

import pytest
from lsprotocol import types as t
from test_engine import TEXT

from lsp_llm.config import Settings
from lsp_llm.engine.model import Model, ModelError
from lsp_llm.engine.pool import PROGRESS_MIN_TOKENS
from lsp_llm.engine.scheduler import Engine
from lsp_llm.lsp import lifecycle
from lsp_llm.text.documents import DocumentError, DocumentStore, Encoding
from lsp_llm.tools.client import StdioServer, server_command

CAPS = t.ClientCapabilities(window=t.WindowClientCapabilities(work_done_progress=True))


# -- engine and documents ---------------------------------------------------------------
def test_stop_cancels_the_running_job_within_a_second(engine: Engine, tiny: Model) -> None:
    a, b = tiny.tokenize(TEXT, True)[:300], tiny.tokenize(TEXT[::-1], True)[:300]
    cancel = threading.Event()

    def busy() -> None:  # a long job that stops only when cancelled, like a completion
        while True:
            engine.sync("a", a, cancel.is_set)
            engine.sync("a", b, cancel.is_set)

    running = engine.submit(busy, cancel)
    time.sleep(0.3)
    t0 = time.monotonic()
    assert engine.stop(timeout=1.0)
    assert time.monotonic() - t0 < 1.0 and not engine.alive
    assert cancel.is_set() and running.exception(timeout=1) is not None


def test_progress_counts_the_tokens_to_refeed(engine: Engine, tiny: Model) -> None:
    target = tiny.tokenize(TEXT * 2, True)[: PROGRESS_MIN_TOKENS + 100]
    events: list[tuple[int, int]] = []
    engine.on_progress = lambda uri, done, total: events.append((done, total))
    engine.submit(lambda: engine.sync("a", target)).result()
    assert events[0] == (0, len(target)) and events[-1][0] == -1
    events.clear()
    edited = target[:1] + tiny.tokenize(b"# ", False) + target[1:-2]  # same length, edited at the top
    engine.submit(lambda: engine.sync("a", edited)).result()
    assert events and events[0] == (0, len(edited) - 1)  # everything after BOS is fed again


def open_docs(store: DocumentStore) -> None:
    store.open("file:///a.py", "def crab(x):\n    return x + 1\n", 1)
    store.open("file:///b.py", "naïve = 'é'\r\nx = '😀' + pri", 1)


def test_a_swap_retokenizes_before_the_old_model_is_freed(tiny_model_path: Path) -> None:
    s = Settings(model=str(tiny_model_path), threads=2)
    engine = Engine(max_sessions=2, n_ctx=512, n_branches=4, headroom=16)
    store = DocumentStore(None, engine)
    try:
        old = lifecycle.load(s, None)
        open_docs(store)
        lifecycle.swap(store, engine, old, 512).result()
        old_vocab, seen_at_free = store.vocab, []
        real_close = old.close

        def close() -> None:  # when the engine frees the old model, which vocabulary do documents hold?
            seen_at_free.extend(d.vocab is old_vocab for d in store.docs.values())
            seen_at_free.append(store.vocab is old_vocab)
            real_close()

        old.close = close  # type: ignore[method-assign]
        gate = threading.Event()
        engine.submit(gate.wait)  # a job queued before the swap runs with the old model
        new = lifecycle.load(s, None)
        swapped = lifecycle.swap(store, engine, new, 512)
        # in the same step, the engine's targets are the new vocabulary's
        assert all(engine._targets[u] == d.prompt()[0] for u, d in store.docs.items())
        assert engine.model is old and not old.closed
        gate.set()
        swapped.result(timeout=30)
        assert engine.model is new and old.closed and seen_at_free == [False] * 3
        with pytest.raises(ModelError):
            old.tokenize(b"x", add_bos=False)  # a freed vocabulary is refused, not read
        for d in store.docs.values():
            assert d.mirror.ids == new.tokenize(d.data, add_bos=False)
    finally:
        engine.stop()


def test_a_swap_keeps_a_stale_document_stale(tiny: Model) -> None:
    engine = Engine(max_sessions=2, n_ctx=512, n_branches=4, headroom=16)
    store = DocumentStore(None, engine)
    try:
        open_docs(store)
        lifecycle.swap(store, engine, tiny, 512).result()
        with pytest.raises(DocumentError):  # end before start: the mirror is no longer trusted
            store.change("file:///a.py", 2, [((1, 4, 0, 0), "x")], Encoding.UTF16)
        doc = store.docs["file:///a.py"]
        cursor, version = doc.cursor, doc.version
        store.set_vocab(lifecycle.vocab_of(tiny))
        assert doc.stale and store.docs["file:///a.py"] is doc
        assert (doc.cursor, doc.version) == (cursor, version)
    finally:
        engine.stop()


def test_a_failed_calibration_frees_the_new_model(tiny_model_path: Path) -> None:
    loaded: list[Model] = []

    def failing(model: Model, cache: Path | None) -> None:
        loaded.append(model)
        raise RuntimeError("calibration failed")

    with pytest.raises(RuntimeError):
        lifecycle.load(Settings(model=str(tiny_model_path), threads=2), None, failing)
    assert loaded and loaded[0].closed


def test_the_mirror_summary_counts_units_and_hashes_the_text(tiny: Model) -> None:
    engine = Engine(max_sessions=1, n_ctx=256, n_branches=2, headroom=8)
    store = DocumentStore(None, engine)
    try:
        text = "naïve = 'é'\r\nx = '😀' + 中文"
        store.open("file:///u.py", text, 3)
        got = {enc: store.mirror("file:///u.py", enc) for enc in Encoding}
        assert {enc: m.length for enc, m in got.items()} == {
            Encoding.UTF8: len(text.encode()), Encoding.UTF16: len(text) + 1, Encoding.UTF32: len(text)}
        m = got[Encoding.UTF16]
        assert (m.version, m.bytes, m.stale) == (3, len(text.encode()), False)
        assert m.sha256 == hashlib.sha256(text.encode()).hexdigest()
    finally:
        engine.stop()


# -- the real server over stdio -----------------------------------------------------------
def opened(server: StdioServer, uri: str, text: str, version: int = 1) -> None:
    server.client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=uri, language_id="python", version=version, text=text)))


async def complete(server: StdioServer, uri: str, line: int, col: int, timeout: float = 30) -> t.CompletionList:
    res = await server.request(t.TEXT_DOCUMENT_COMPLETION, t.CompletionParams(
        text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(line, col)), timeout)
    assert isinstance(res, t.CompletionList)
    return res


async def items_eventually(server: StdioServer, uri: str, line: int, col: int) -> list[t.CompletionItem]:
    """Items, asking again while the first read outlasts the request's budget."""
    for _ in range(20):
        res = await complete(server, uri, line, col)
        if res.items:
            return res.items
        await asyncio.sleep(0.2)
    raise AssertionError("no items")


async def read(server: StdioServer, uri: str, line: int, tokens: int) -> None:
    """Ask at line until the server's session holds at least tokens."""
    for _ in range(50):
        await complete(server, uri, line, 0)
        if (await server.command("lsp-llm.stats", uri)).get("cached", 0) >= tokens:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{uri} was never read")


async def test_a_failed_reload_keeps_the_old_model_serving(tiny_model_path: Path) -> None:
    server = StdioServer(server_command(str(tiny_model_path)))
    try:
        await server.start(CAPS, {"waitFor": "all"})  # the same list every time
        uri = "file:///tmp/keep.py"
        opened(server, uri, "def crab(x):\n    return x + 1\n\ndef walk(crab):\n    ret")
        before = await items_eventually(server, uri, 4, 7)
        server.client.workspace_did_change_configuration(t.DidChangeConfigurationParams(
            settings={"lsp-llm": {"model": "/nowhere/missing.gguf"}}))
        for _ in range(100):  # the failure is reported
            if any("missing.gguf" in m.message for m in server.recorded.messages):
                break
            await asyncio.sleep(0.05)
        assert any("still serving" in m.message for m in server.recorded.messages), server.recorded.messages
        after = await complete(server, uri, 4, 7)
        assert [i.label for i in after.items] == [i.label for i in before]
        stats = await server.command("lsp-llm.stats")
        assert stats["model"] == tiny_model_path.name
        # a good reload (another context size) swaps models while the text stays the same
        server.client.workspace_did_change_configuration(t.DidChangeConfigurationParams(
            settings={"lsp-llm": {"nCtx": 1024}}))
        for _ in range(200):
            if (await server.command("lsp-llm.stats"))["n_ctx"] == 1024:
                break
            await asyncio.sleep(0.05)
        assert [i.label for i in await items_eventually(server, uri, 4, 7)] == [i.label for i in before]
    finally:
        await server.stop()


async def test_every_progress_begin_gets_an_end_when_the_client_answers_late(tiny_model_path: Path) -> None:
    # the client answers window/workDoneProgress/create after the feeds ended
    server = StdioServer(server_command(str(tiny_model_path)), create_delay=0.5)
    try:
        await server.start(CAPS)
        text = TEXT.decode() * 3
        for i in range(3):  # each read is long enough to report progress
            opened(server, f"file:///tmp/long{i}.py", text)
            await read(server, f"file:///tmp/long{i}.py", text.count("\n"), PROGRESS_MIN_TOKENS)
        rec = server.recorded
        for _ in range(100):  # the late answers arrive (then each begin), and the reads still going on end
            await asyncio.sleep(0.1)
            if set(rec.created) <= set(rec.progress) and not rec.unended():
                break
        titles = [vs[0].title for vs in server.recorded.progress.values() if vs]
        assert sum("reading" in title for title in titles) >= 3, titles
        assert server.recorded.unended() == [], server.recorded.progress
    finally:
        await server.stop()


async def test_a_client_that_never_answers_progress_does_not_hold_up_the_model(tiny_model_path: Path) -> None:
    server = StdioServer(server_command(str(tiny_model_path)), create_delay=float("inf"))
    try:
        t0 = time.monotonic()
        await server.start(CAPS)
        uri = "file:///tmp/quiet.py"
        opened(server, uri, "def crab(x):\n    return x + 1\n")
        await items_eventually(server, uri, 1, 4)
        assert server.recorded.created and not server.recorded.progress  # asked, never answered: no begin
        assert time.monotonic() - t0 < 30
    finally:
        await server.stop()


async def test_shutdown_under_load_answers_within_a_second(tiny_model_path: Path) -> None:
    server = StdioServer(server_command(str(tiny_model_path)))
    try:
        await server.start(CAPS)
        uri = "file:///tmp/busy.py"
        opened(server, uri, "def crab(x):\n    return x + 1\n")
        await items_eventually(server, uri, 1, 4)
        text = TEXT.decode() * 6
        for i in range(4):  # reads to do, and requests waiting on them
            opened(server, f"file:///tmp/busy{i}.py", text)
        pending = [asyncio.ensure_future(complete(server, f"file:///tmp/busy{i}.py", 100 + i, 0)) for i in range(4)]
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await server.request(t.SHUTDOWN, None, timeout=10)
        assert time.monotonic() - t0 < 1.0
        answers = await asyncio.gather(*pending, return_exceptions=True)  # every request is answered
        assert not any(isinstance(a, asyncio.TimeoutError) for a in answers), answers
        server.client.exit(None)
        proc = server.client._server
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        await server.stop()


async def test_a_reload_reads_the_focus_document_ahead(tiny_model_path: Path) -> None:
    """The document the user works in is read on the new model before the
    swap: after it, nothing of it is fed again, and its items are the same."""
    server = StdioServer(server_command(str(tiny_model_path)))
    try:
        await server.start(CAPS, {"waitFor": "all"})
        uri, text = "file:///tmp/ahead.py", TEXT.decode() + "def walk(crab):\n    ret"
        line, col = text.count("\n"), len(text) - text.rfind("\n") - 1
        opened(server, uri, text)
        before = await items_eventually(server, uri, line, col)
        fed = (await server.stats(uri))["fed_total"]
        server.client.workspace_did_change_configuration(t.DidChangeConfigurationParams(
            settings={"lsp-llm": {"nCtx": 2048}}))  # a reload
        for _ in range(400):
            if (await server.stats())["n_ctx"] == 2048:
                break
            await asyncio.sleep(0.05)
        assert [i.label for i in await items_eventually(server, uri, line, col)] == [i.label for i in before]
        after = await server.stats(uri)
        assert after["tokens"] > 500
        # idle work after a request may feed a few tokens (a predicted keystroke): not the document
        assert after["fed_total"] - fed < 64, f"read again after the swap: {after['fed_total'] - fed} tokens fed"
    finally:
        await server.stop()


async def test_a_reload_loads_beside_the_serving_model(default_model_file: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSP_LLM_CACHE", str(tmp_path))  # nothing calibrated: each load takes seconds
    server = StdioServer(server_command(str(default_model_file)))
    try:
        await server.start(CAPS, {"waitFor": "all"})
        for _ in range(1200):  # the first load calibrates too
            if (await server.command("lsp-llm.stats"))["model"] != "(loading)":
                break
            await asyncio.sleep(0.1)
        uri = "file:///tmp/reload.py"
        opened(server, uri, "import os\n\n\ndef walk(root):\n    for name in os.listdir(root):\n        pri")
        await items_eventually(server, uri, 5, 11)
        server.client.workspace_did_change_configuration(t.DidChangeConfigurationParams(
            settings={"lsp-llm": {"threads": 1}}))  # a reload, and a new calibration
        for _ in range(200):
            if (await server.command("lsp-llm.stats"))["loading"]:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the reload never started")
        # a completion that needs the engine (another line), answered while the new model loads
        assert (await complete(server, uri, 4, 8, timeout=120)).items
        assert (await server.command("lsp-llm.stats"))["loading"], "answered only after the load"
        for _ in range(600):  # then the new model serves
            if not (await server.command("lsp-llm.stats"))["loading"]:
                break
            await asyncio.sleep(0.05)
        assert await items_eventually(server, uri, 5, 11)
        assert not [m.message for m in server.recorded.messages if m.type == t.MessageType.Error]
    finally:
        await server.stop()
