"""End to end: the real server over stdio on the embedded default model,
driven by pytest-lsp with the capabilities of real clients."""

from __future__ import annotations

import asyncio
import sys
import sysconfig
from concurrent.futures import Future
from hashlib import sha256
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

SERVER = [sys.executable, "-m", "lsp_llm", "--threads", "2", "--log-level", "debug"]
SOURCE = Path(sysconfig.get_paths()["stdlib"]) / "sched.py"
PREFIX = "import sys\n\n\ndef greet(name):\n    "


def opened(client: LanguageClient, uri: str, text: str, version: int = 1) -> None:
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=uri, language_id="python", version=version, text=text)))


def typed(client: LanguageClient, uri: str, line: int, col: int, chars: str, version: int) -> int:
    """Type chars one keystroke at a time; returns the next version."""
    for i, ch in enumerate(chars):
        pos = t.Position(line, col + i)
        client.text_document_did_change(t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[t.TextDocumentContentChangePartial(range=t.Range(pos, pos), text=ch)]))
        version += 1
    return version


async def complete(client: LanguageClient, uri: str, line: int, col: int) -> t.CompletionList:
    res = await client.text_document_completion_async(t.CompletionParams(
        text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(line, col)))
    assert isinstance(res, t.CompletionList)
    return res


async def complete_read(client: LanguageClient, uri: str, line: int, col: int, tries: int = 20) -> t.CompletionList:
    """A completion once the document is read: a request on a document still
    being read answers empty after readBudgetMs, and an editor asks again."""
    for _ in range(tries - 1):
        res = await complete(client, uri, line, col)
        if res.items or not res.is_incomplete:
            return res
        await asyncio.sleep(0.5)
    return await complete(client, uri, line, col)


async def raw_request(client: LanguageClient, msg_id: str, method: str, params: object) -> object:
    """Send a request exactly as given, bypassing the client's type checks."""
    fut: Future = Future()
    client.protocol._request_futures[msg_id] = fut
    client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    return await asyncio.wait_for(asyncio.wrap_future(fut), 30)


async def document(client: LanguageClient, uri: str) -> dict:
    """The server's mirror of a document: version, length, sha256 (lsp-llm.document)."""
    return await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="lsp-llm.document", arguments=[uri]))


async def stats(client: LanguageClient, *args: object) -> dict:
    return await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="lsp-llm.stats", arguments=list(args) or None))


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER), params=["visual-studio-code", "neovim", "emacs"])
async def preset(lsp_client: LanguageClient, request: pytest.FixtureRequest):
    await lsp_client.initialize_session(t.InitializeParams(capabilities=client_capabilities(request.param),
                                                            initialization_options={"waitFor": "all"}))  # every item
    yield
    await lsp_client.shutdown_session()


async def test_typing_then_completing_offers_whole_words(preset: LanguageClient) -> None:
    client = preset
    uri = "file:///tmp/greet.py"
    opened(client, uri, PREFIX)
    typed(client, uri, 4, 4, "pri", version=2)
    res = await complete(client, uri, 4, 7)
    assert res.is_incomplete
    labels = [it.label for it in res.items]
    assert "print" in labels, labels
    item = res.items[labels.index("print")]
    assert item.text_edit.new_text == "print"
    assert item.text_edit.range == t.Range(t.Position(4, 4), t.Position(4, 7))  # replaces "pri"
    assert "%" in item.detail
    assert [it.sort_text for it in res.items] == sorted(it.sort_text for it in res.items)
    assert any(it.kind == t.CompletionItemKind.Snippet for it in res.items)  # the to-end-of-line item
    # the same text gives the same items
    again = await complete(client, uri, 4, 7)
    assert [it.label for it in again.items] == labels


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient):
    caps = client_capabilities("visual-studio-code")
    await lsp_client.initialize_session(t.InitializeParams(
        capabilities=caps, initialization_options={"items": 4, "nCtx": "big", "colour": 1,
                                                   "readBudgetMs": 60000}))  # requests wait for reads
    yield
    await lsp_client.shutdown_session()


async def test_invalid_settings_are_shown_to_the_user(client: LanguageClient) -> None:
    await stats(client)
    texts = [m.message for m in client.messages if m.type == t.MessageType.Error]
    assert any("nCtx" in m for m in texts), texts
    assert any("colour" in m for m in texts), texts


async def test_stats_and_reuse_after_a_keystroke(client: LanguageClient) -> None:
    uri = SOURCE.as_uri()
    text = SOURCE.read_text()
    opened(client, uri, text)
    lines = text.splitlines()
    row = 60
    await complete(client, uri, row, len(lines[row]))  # cold: reads the file up to here
    typed(client, uri, row, len(lines[row]), "x", version=2)
    await complete(client, uri, row, len(lines[row]) + 1)
    st = await stats(client, uri)
    assert st["fed_last"] <= 4
    assert st["tokens"] > st["cached"] > 300  # the session holds the text before the cursor
    assert st["reused_last"] >= st["cached"] - 4
    assert st["generated_total"] > 0 and st["fed_total"] >= st["cached"]
    everything = await stats(client)
    assert everything["model"].endswith(".gguf") and everything["n_ctx"] > 0
    assert uri in everything["documents"]
    assert everything["heap"]["big_blocks_unmapped"]  # (test_memory: what it does)
    assert everything["requests_in_flight"] == 1  # this one: notifications handled are not kept (pygls 2.1 kept each)
    # switching to another file and back re-evaluates nothing
    other = "file:///tmp/other.py"
    opened(client, other, "def other():\n    return 1\n")
    await complete(client, other, 1, 4)
    fed = (await stats(client, uri))["fed_total"]
    await complete(client, uri, row, len(lines[row]) + 1)
    assert (await stats(client, uri))["fed_total"] == fed


async def reading_reported(client: LanguageClient, timeout: float = 120) -> None:
    """Wait until a read reports progress past its start (a decode call is done)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not any(isinstance(r, t.WorkDoneProgressReport) and (r.percentage or 0) > 0
                  for rs in client.progress_reports.values() for r in rs):
        assert loop.time() < deadline, "no read reported progress"
        await asyncio.sleep(0.02)


async def test_cancel_stops_a_long_completion(client: LanguageClient) -> None:
    opened(client, "file:///tmp/small.py", PREFIX)
    await complete(client, "file:///tmp/small.py", 4, 4)  # the model is loaded
    uri = "file:///tmp/big.py"
    text = SOURCE.read_text() * 2
    opened(client, uri, text)
    end = text.count("\n")
    fut = asyncio.ensure_future(client.protocol.send_request_async(
        t.TEXT_DOCUMENT_COMPLETION,
        t.CompletionParams(text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(end, 0)),
        msg_id="cancel-me"))
    await reading_reported(client)  # the request's read is under way: cancel it midway
    client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id="cancel-me"))
    with pytest.raises(JsonRpcException) as err:
        await asyncio.wait_for(fut, 30)
    assert err.value.code == -32800  # RequestCancelled
    # the engine stopped reading (between decode calls): another request is answered
    # before the read that the cancelled one had started is done
    await complete(client, "file:///tmp/small.py", 4, 4)
    assert (await stats(client, uri))["cached"] < (await stats(client))["n_ctx"] // 2
    res = await complete(client, "file:///tmp/big.py", end, 0)  # still serving
    assert res.items


async def test_bad_input_gets_answers_and_the_server_keeps_serving(client: LanguageClient) -> None:
    uri = "file:///tmp/bad.py"
    # unknown document: an empty answer
    assert len((await complete(client, "file:///nowhere.py", 0, 0)).items) == 0
    # didChange before didOpen: logged and ignored
    typed(client, "file:///notyet.py", 0, 0, "x", version=2)
    # NUL and control bytes, a surrogate pair, CRLF
    opened(client, uri, "a\x00b\x01c\r\ncrab = '🦀'\r\n")
    # a range that splits the surrogate pair of 🦀 (UTF-16 column 9 is inside it)
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=2),
        content_changes=[t.TextDocumentContentChangePartial(
            range=t.Range(t.Position(1, 9), t.Position(1, 9)), text="x")]))
    # it lands at the start of the crab: the mirror holds exactly that text
    mirror = await document(client, uri)
    assert mirror["sha256"] == sha256("a\x00b\x01c\r\ncrab = 'x🦀'\r\n".encode()).hexdigest()
    assert (mirror["version"], mirror["stale"]) == (2, False)
    # positions out of range are clamped (LSP semantics): the end of the document, of the line
    for (line, col), end in (((1, 99), t.Position(1, 12)), ((0, 500), t.Position(0, 5)), ((99, 99), t.Position(2, 0))):
        res = await complete(client, uri, line, col)
        assert all(it.text_edit.range.end == end for it in res.items), (end, res.items)
        assert res.items or line == 99  # (an empty last line may well have no item)
    # negative position and missing params: InvalidParams for that request id
    with pytest.raises(JsonRpcException) as err:
        await raw_request(client, "negative", t.TEXT_DOCUMENT_COMPLETION, {
            "textDocument": {"uri": uri}, "position": {"line": -1, "character": 0}})
    assert err.value.code == -32602
    with pytest.raises(JsonRpcException) as err:
        await raw_request(client, "no-position", t.TEXT_DOCUMENT_COMPLETION, {"textDocument": {"uri": uri}})
    assert err.value.code == -32602
    # unknown command: an error
    with pytest.raises(JsonRpcException):
        await client.workspace_execute_command_async(t.ExecuteCommandParams(command="lsp-llm.nope"))
    with pytest.raises(JsonRpcException):
        await stats(client, "file:///nowhere.py")
    # an empty document still completes (from the BOS logits)
    opened(client, "file:///tmp/empty.py", "")
    assert (await complete(client, "file:///tmp/empty.py", 0, 0)).items
    # a document of megabytes: windowed to the context, answered
    big = ("x = 1  # filler line for a big document\n" * 30000)
    opened(client, "file:///tmp/huge.py", big)
    res = await complete_read(client, "file:///tmp/huge.py", 30000, 0)  # (a read of n_ctx tokens)
    assert res.items
    st = await stats(client, "file:///tmp/huge.py")
    assert st["cached"] <= (await stats(client))["n_ctx"] and st["window_start"] > 0
    # and ordinary work still succeeds
    opened(client, "file:///tmp/fine.py", PREFIX)
    typed(client, "file:///tmp/fine.py", 4, 4, "pri", version=2)
    assert "print" in [it.label for it in (await complete(client, "file:///tmp/fine.py", 4, 7)).items]


async def test_long_reads_report_progress(client: LanguageClient) -> None:
    uri = "file:///tmp/long.py"
    text = SOURCE.read_text()
    opened(client, uri, text)
    await complete(client, uri, text.count("\n"), 0)
    reports = [r for rs in client.progress_reports.values() for r in rs]
    assert any(isinstance(r, t.WorkDoneProgressBegin) and "reading" in r.title for r in reports)
    # every begin gets exactly one end, after it
    for _ in range(100):
        if all(isinstance(rs[-1], t.WorkDoneProgressEnd) for rs in client.progress_reports.values()):
            break
        await asyncio.sleep(0.1)
    for rs in client.progress_reports.values():
        kinds = [type(r).__name__ for r in rs]
        assert isinstance(rs[0], t.WorkDoneProgressBegin) and isinstance(rs[-1], t.WorkDoneProgressEnd), kinds
        assert kinds.count("WorkDoneProgressEnd") == 1, kinds


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def utf8_client(lsp_client: LanguageClient):
    caps = client_capabilities("neovim")
    caps.general = t.GeneralClientCapabilities(
        position_encodings=[t.PositionEncodingKind.Utf16, t.PositionEncodingKind.Utf8])
    result = await lsp_client.initialize_session(t.InitializeParams(capabilities=caps))
    lsp_client.init_result = result  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


async def test_utf8_positions_when_the_client_offers_them(utf8_client: LanguageClient) -> None:
    client = utf8_client
    assert client.init_result.capabilities.position_encoding == t.PositionEncodingKind.Utf8
    uri = "file:///tmp/utf8.py"
    opened(client, uri, "s = 'é🦀'\n" + PREFIX)
    # "s = 'é🦀'" is 11 bytes: a UTF-8 column past the crab
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=2),
        content_changes=[t.TextDocumentContentChangePartial(
            range=t.Range(t.Position(0, 11), t.Position(0, 11)), text="'")]))
    typed(client, uri, 5, 4, "pri", version=3)
    res = await complete(client, uri, 5, 7)
    assert "print" in [it.label for it in res.items]


async def test_shutdown_and_exit_end_the_process() -> None:
    proc = await asyncio.create_subprocess_exec(*SERVER, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)

    def send(msg: str) -> None:
        data = msg.encode()
        proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(data) + data)

    send('{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"capabilities":{}}}')
    send('{"jsonrpc":"2.0","method":"initialized","params":{}}')
    send('{"jsonrpc":"2.0","id":2,"method":"shutdown"}')
    send('{"jsonrpc":"2.0","id":3,"method":"textDocument/hover","params":{}}')
    send('{"jsonrpc":"2.0","method":"exit"}')
    await proc.stdin.drain()
    out = await asyncio.wait_for(proc.stdout.read(), 30)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert b'"id": 2' in out or b'"id":2' in out
    assert b'"id": 3' in out or b'"id":3' in out  # a request after shutdown is answered with an error


async def test_serves_over_tcp(unused_tcp_port: int) -> None:
    proc = await asyncio.create_subprocess_exec(*SERVER, "--tcp", "--port", str(unused_tcp_port),
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", unused_tcp_port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the server never listened")
        body = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"capabilities":{}}}'
        writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        header = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = int(header.split(b":")[1].split(b"\r\n")[0])
        reply = await reader.readexactly(length)
        assert b'"completionProvider"' in reply
        writer.close()
    finally:
        proc.kill()
        await proc.wait()
