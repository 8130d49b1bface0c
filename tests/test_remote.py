"""lsp-llm on a shared engine: the real server over stdio (``--engine-url``)
on a real llama-server (PyPI's xllamacpp, loopback, the default model, 2
slots), through its native API and its OpenAI-compatible ``/v1``: open,
type, complete, ghost text; two documents on two slots; tokens processed
per keystroke; a cancel; a wrong URL, a wrong API, a wrong API key; HTTP
404, 429 and 5xx mid-session (a small proxy in front of the real engine)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("xllamacpp", reason="xllamacpp (the test extra) embeds llama-server")

import test_trust  # noqa: E402
from fault_proxy import fault_proxy  # noqa: E402
from llama_server_fixture import free_port, llama_server  # noqa: E402
from test_trust import Pipe, completion_at, did_change, did_open  # noqa: E402

TEXT = "import os\n\n\ndef walk(root):\n    for name in os.listdir(root):\n        "


def remote(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lsp_llm", "--engine-url", url, "--log-level", "info", *extra]


@pytest.fixture(scope="module")
def engine_url(default_model_file: Path) -> Iterator[str]:
    with llama_server(default_model_file, slots=2, threads=2) as url:
        yield url


def stats(p: Pipe) -> dict[str, Any]:
    return p.ask("workspace/executeCommand", {"command": "lsp-llm.stats"})["result"]


def items(p: Pipe, uri: str, line: int, col: int) -> list[dict[str, Any]]:
    for _ in range(50):
        got = p.ask("textDocument/completion", completion_at(uri, line, col))["result"]["items"]
        if got:
            return got
    raise AssertionError("no items")


@pytest.mark.parametrize("api", ["llama-server", "openai"])
def test_typing_and_completing_on_llama_server(engine_url: str, api: str) -> None:
    url = engine_url + ("/v1" if api == "openai" else "")
    p = Pipe(command=remote(url, "--engine-api", api))
    try:
        uri = "file:///tmp/remote.py"
        p.frames(did_open(uri, TEXT))
        first = items(p, uri, 5, 8)
        assert first and all(i["textEdit"]["range"]["start"] == {"line": 5, "character": 8} for i in first)
        engine = stats(p)["engine"]
        assert engine["engine"] == api and engine["slots"] == 2
        # measured at connect, never assumed: llama-server here gives the same prompt other
        # logprobs cold and warm (its docs say cache_prompt is not bit-exact)
        assert engine["exact"] is False
        assert "gemma-3-270m" in engine["model"] and engine["url"] == url
        # type "pri" a keystroke at a time: each request reuses the slot's cache
        fed = []
        for i, ch in enumerate("pri"):
            p.frames(did_change(uri, 2 + i, 5, 8 + i, 8 + i, ch))
            got = items(p, uri, 5, 9 + i)
            assert all(it["textEdit"]["newText"].startswith("pri"[: i + 1]) for it in got), got
            fed.append(stats(p)["documents"][uri]["fed_last"])
        assert sorted(fed)[1] <= 3, fed  # tokens the engine processed per keystroke, at the median
        ghost = p.ask("textDocument/inlineCompletion", {**completion_at(uri, 5, 11), "context": {"triggerKind": 1}})
        assert "result" in ghost  # answered (text or nothing within the budget)
    finally:
        p.close()


def test_two_documents_keep_two_slots(engine_url: str) -> None:
    p = Pipe(command=remote(engine_url))
    try:
        a, b = "file:///tmp/a.py", "file:///tmp/b.py"
        p.frames(did_open(a, TEXT), did_open(b, TEXT.replace("walk", "scan")))
        items(p, a, 5, 8)
        items(p, b, 5, 8)
        again = stats(p)
        before = again["documents"][a]["fed_total"]
        items(p, a, 5, 8)
        st = stats(p)
        assert st["engine"]["slots_in_use"] == 2
        assert st["documents"][a]["fed_total"] - before <= 3  # its slot still held it: not read again
    finally:
        p.close()


def test_a_wrong_url_is_one_clear_message_and_empty_answers() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    p = Pipe(command=remote(url))
    try:
        uri = "file:///tmp/down.py"
        p.frames(did_open(uri, TEXT))
        got = p.ask("textDocument/completion", completion_at(uri, 5, 8))["result"]
        assert got["items"] == []
        assert any(url in m for m in p.messages), p.messages
    finally:
        p.close()


def test_a_wrong_api_key_is_named(default_model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with llama_server(default_model_file, slots=1, threads=2, api_keys=["right-key"]) as url:
        monkeypatch.setenv("LSP_LLM_API_KEY", "wrong-key")
        p = Pipe(command=remote(url))
        try:
            uri = "file:///tmp/key.py"
            p.frames(did_open(uri, TEXT))
            assert p.ask("textDocument/completion", completion_at(uri, 5, 8))["result"]["items"] == []
            assert any("LSP_LLM_API_KEY" in m for m in p.messages), p.messages
            assert not any("wrong-key" in m for m in p.messages)  # never echoed
        finally:
            p.close()
        monkeypatch.setenv("LSP_LLM_API_KEY", "right-key")
        p = Pipe(command=remote(url))
        try:
            uri = "file:///tmp/key.py"
            p.frames(did_open(uri, TEXT))
            assert items(p, uri, 5, 8)
        finally:
            p.close()


def test_the_engine_lost_and_back_mid_session(default_model_file: Path) -> None:
    port = free_port()
    with llama_server(default_model_file, slots=1, threads=2, port=port) as url:
        p = Pipe(command=remote(url))
        uri = "file:///tmp/lost.py"
        p.frames(did_open(uri, TEXT))
        assert items(p, uri, 5, 8)
    try:  # the engine is gone: empty answers, one message that names it
        for _ in range(3):
            assert p.ask("textDocument/completion", completion_at(uri, 5, 8))["result"]["items"] == []
        assert sum(url in m for m in p.messages) == 1, p.messages
        with llama_server(default_model_file, slots=1, threads=2, port=port):  # back, empty: no restart needed
            p.frames(did_change(uri, 2, 5, 8, 8, "p"))
            assert items(p, uri, 5, 9)  # the document was sent again
    finally:
        p.close()


def test_a_cancelled_completion_is_answered(engine_url: str) -> None:
    p = Pipe(command=remote(engine_url + "/v1", "--engine-api", "openai"))
    try:
        uri = "file:///tmp/cancel.py"
        p.frames(did_open(uri, TEXT))
        items(p, uri, 5, 8)
        p.frames(did_change(uri, 2, 5, 8, 8, "p"))
        ask = p.request("textDocument/completion", completion_at(uri, 5, 9))
        p.frames(ask, {"method": "$/cancelRequest", "params": {"id": ask["id"]}})
        answer = p.answer(ask["id"])
        assert "result" in answer or answer["error"]["code"] == -32800, answer
        assert items(p, uri, 5, 9)  # the engine serves on
    finally:
        p.close()


@pytest.mark.parametrize(("api", "v1", "expected"), [
    ("openai", False, 'engineApi "openai" expects the base URL OpenAI clients take, with /v1'),
    ("llama-server", True, 'for an OpenAI-compatible /v1 URL set engineApi to "openai"'),
])
def test_a_wrong_api_is_one_clear_message(engine_url: str, api: str, v1: bool, expected: str) -> None:
    p = Pipe(command=remote(engine_url + ("/v1" if v1 else ""), "--engine-api", api))
    try:
        uri = "file:///tmp/api.py"
        p.frames(did_open(uri, TEXT))
        for _ in range(3):
            assert p.ask("textDocument/completion", completion_at(uri, 5, 8))["result"]["items"] == []
        assert sum(expected in m for m in p.messages) == 1, p.messages
    finally:
        p.close()


@pytest.mark.parametrize("api", ["llama-server", "openai"])
def test_http_faults_mid_session_are_told_once_each(engine_url: str, api: str) -> None:
    with fault_proxy(engine_url) as proxy:
        p = Pipe(command=remote(proxy.url + ("/v1" if api == "openai" else ""), "--engine-api", api))
        try:
            uri = "file:///tmp/faults.py"
            p.frames(did_open(uri, TEXT))
            assert items(p, uri, 5, 8)
            for n, (status, words) in enumerate(((429, "busy: too many requests (HTTP 429)"),
                                                 (503, "(HTTP 503): fault proxy says 503"),
                                                 (404, "has no "))):
                proxy.fault = status
                p.frames(did_change(uri, 2 + n, 5, 8 + n, 8 + n, "pri"[n]))
                for _ in range(2):
                    assert p.ask("textDocument/completion", completion_at(uri, 5, 9 + n))["result"]["items"] == []
                told = [m for m in p.messages if words in m]
                assert len(told) == 1 and proxy.url in told[0], p.messages
                assert stats(p)["engine"]["engine"] == api  # answered: nothing crashed
            assert len(p.messages) == 3, p.messages
            proxy.fault = None
            assert items(p, uri, 5, 11)  # serves again
            assert p.proc.poll() is None
        finally:
            p.close()


def test_ghost_text_goes_through_infill_on_a_fim_model(tiny_fim_model_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # a few tokens, all the time it takes: the tiny model may never end a line (and a busy
    # machine decodes slowly)
    monkeypatch.setattr(test_trust, "OPTIONS", {**test_trust.OPTIONS, "inlineTokens": 6, "inlineBudgetMs": 60000})
    with llama_server(tiny_fim_model_path, slots=2, threads=2) as url:
        p = Pipe(command=remote(url))
        try:
            uri = "file:///tmp/fim.py"
            p.frames(did_open(uri, TEXT + "\n    return root\n"))
            ghost = p.ask("textDocument/inlineCompletion", {**completion_at(uri, 5, 8), "context": {"triggerKind": 1}})
            assert "items" in ghost["result"]  # (the random tiny model's middle is control tokens: no text)
            st = stats(p)
            assert st["engine"]["infill"] is True and st["engine"]["infill_requests"] == 1, st["engine"]
            fim = st["documents"][uri + "#fim"]  # on the document's FIM slot, its own
            assert fim["requests_total"] == 1 and fim["generated_total"] >= 1, fim
        finally:
            p.close()


def _long_text(name: str) -> str:
    return "".join(f"def {name}_{i}(x):\n    return x * {i} + len('{name}{i}')\n\n" for i in range(40)) + "x = "


@pytest.mark.parametrize("save", [True, False])
def test_an_evicted_document_comes_back_from_a_saved_slot(tiny_model_path: Path, tmp_path: Path, save: bool) -> None:
    with llama_server(tiny_model_path, slots=2, threads=2, slot_save=tmp_path if save else None,
                      prompt_cache=False) as url:
        p = Pipe(command=remote(url))
        try:
            docs = [f"file:///tmp/{n}.py" for n in ("a", "b", "c")]
            texts = {d: _long_text(n) for d, n in zip(docs, ("alpha", "beta", "gamma"))}
            last = texts[docs[0]].count("\n")
            for d in docs:  # a, b on the two slots; c takes a's
                p.frames(did_open(d, texts[d]))
                items(p, d, last, 4)
            before = stats(p)["documents"][docs[0]]["fed_total"]
            items(p, docs[0], last, 4)  # a is back: its slot restored, or read again
            st = stats(p)
            fed = st["documents"][docs[0]]["fed_total"] - before
            assert st["engine"]["slot_files"] is save
            if save:
                assert fed <= 10 and st["documents"][docs[0]]["restored"] >= 1, (fed, st)
            else:
                assert fed > 500, fed
        finally:
            p.close()
