"""The OpenAI-compatible client against a real llama-server's own ``/v1`` (xllamacpp, in this
process, on 127.0.0.1), compared with the native client on the same server; a logprobs cap and a
refused field through a small proxy that answers 400 as vLLM and OpenAI do."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("xllamacpp", reason="xllamacpp (the test extra) runs a real llama-server for these tests")

from fault_proxy import fault_proxy  # noqa: E402
from llama_server_fixture import llama_server  # noqa: E402
from test_llama_server import CODE, COUNTING, OTHER, SlotWatch  # noqa: E402

from lsp_llm.engine.http_engine import NO_TIMINGS  # noqa: E402
from lsp_llm.engine.llama_server import EngineError, LlamaServer  # noqa: E402
from lsp_llm.engine.openai_api import OpenAIEngine  # noqa: E402
from lsp_llm.engine.session import Cancelled  # noqa: E402


@pytest.fixture(scope="module")
def server_url(default_model_file: Path) -> Iterator[str]:
    with llama_server(default_model_file, slots=2, threads=2) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[OpenAIEngine]:
    with OpenAIEngine(server_url + "/v1", timeout_s=120) as c:
        c.connect()
        yield c


@pytest.fixture(scope="module")
def native(server_url: str) -> Iterator[LlamaServer]:
    with LlamaServer(server_url, timeout_s=120) as c:
        c.connect()
        yield c


def ids(client: OpenAIEngine, text: bytes) -> list[int]:
    assert client.info is not None and client.info.bos_id is not None
    return [client.info.bos_id] + [t.id for t in client.tokenize(text)]


def test_connect(client: OpenAIEngine, native: LlamaServer) -> None:
    info = client.info
    assert info is not None and client.tokenizer == "llama-server"
    assert "gemma-3-270m" in info.model and info.n_slots == 2 and info.n_ctx == 4096
    assert (info.add_bos, info.bos_id, info.eos_id) == (True, 2, 1)
    assert client.tokenize(CODE) == native.tokenize(CODE)


def test_top_next_is_the_native_answer(client: OpenAIEngine, native: LlamaServer) -> None:
    prompt = ids(client, CODE)
    assert client.feed(0, prompt).predicted_n == 1
    top, timings = client.top_next(0, prompt, 40)
    assert timings.cache_n >= len(prompt) - 1 and timings.prompt_n <= 1  # usage.prompt_tokens_details
    native.feed(0, prompt)  # the same cache state: fed whole, then the last token again
    expected, _ = native.top_next(0, prompt, 40)
    assert top == expected and len(top) == 40


def test_greedy_is_the_native_answer(client: OpenAIEngine, native: LlamaServer) -> None:
    prompts = [ids(client, CODE), ids(client, OTHER)]
    got = client.greedy(None, prompts, 12)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in native.greedy([0, 1], prompts, 12)]
    assert all(t.predicted_n == 12 for _, t in got)
    assert client.greedy(None, prompts, 0) == [([], NO_TIMINGS)] * 2  # nothing asked


def test_measure_exact(client: OpenAIEngine) -> None:
    exact = client.measure_exact(ids(client, OTHER))
    runs = client.last_exact
    assert runs is not None and runs.exact == exact and len(runs.cold) == 10
    assert runs.cold_timings.cache_n == 0 and runs.warm_timings.cache_n > 0  # cold was evaluated whole


def test_cancel_closes_the_request(client: OpenAIEngine, server_url: str) -> None:
    prompt = ids(client, COUNTING)
    watches = [SlotWatch(server_url, 0), SlotWatch(server_url, 1)]
    asked: list[float] = []

    def should_stop() -> bool:
        if asked or any(w.decoded >= 2 for w in watches):
            asked.append(time.monotonic())
            return True
        return False

    with pytest.raises(Cancelled):
        client.greedy(None, [prompt], 3000, should_stop)
    assert time.monotonic() - asked[0] < 0.2
    busy = next(w for w in watches if w.decoded >= 0)
    busy.thread.join()
    assert busy.idle_at is not None, "the server went on generating after the connection closed"


def vllm_400(path: str, body: Any) -> tuple[int, Any] | None:
    """vLLM's answers: at most 20 logprobs; no ``cache_salt`` (as an older vLLM, or OpenAI)."""
    if not path.endswith("/completions"):
        return None
    if (body.get("logprobs") or 0) > 20:
        n = body["logprobs"]
        return 400, {"error": {"message": f"Requested sample logprobs of {n}, which is greater than max allowed: 20"}}
    if "cache_salt" in body:  # (vLLM's older error shape: the message at the top)
        return 400, {"object": "error", "message": "Unrecognized request argument supplied: cache_salt", "code": 400}
    return None


def test_a_logprobs_cap_and_a_refused_field_are_learnt(server_url: str) -> None:
    with fault_proxy(server_url) as proxy, OpenAIEngine(proxy.url + "/v1", timeout_s=60) as c:
        proxy.rule = vllm_400
        c.connect()  # measures nothing: the pool's connect does
        prompt = ids(c, CODE)
        top, _ = c.top_next(0, prompt, 40)
        assert len(top) == 20 and c.max_logprobs == 20
        c.measure_exact(prompt)
        assert "cache_salt" in c.refused
        asked = len(proxy.seen)
        c.top_next(0, prompt, 40)
        assert len(proxy.seen) == asked + 1  # remembered: no 400 again
        assert all("echo" not in body for _, body in proxy.seen if isinstance(body, dict))


def test_faults_name_the_url_and_what_was_expected(server_url: str) -> None:
    with OpenAIEngine(server_url, timeout_s=10) as c, pytest.raises(EngineError) as caught:
        c.connect()
        c.measure_exact([2, 100, 200])  # llama-server's root /completions answers natively
    assert caught.value.kind == "protocol" and "with /v1" in caught.value.message
    with fault_proxy(server_url) as proxy, OpenAIEngine(proxy.url + "/v1", timeout_s=10) as c:
        proxy.rule = lambda path, body: (404, {"error": "no"}) if path == "/tokenize" else None
        with pytest.raises(EngineError) as caught:
            c.connect()
        assert caught.value.kind == "unsupported" and f"{proxy.url}/tokenize" in caught.value.message
