"""The llama-server client against a real llama-server (xllamacpp, in this process, on 127.0.0.1)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("xllamacpp", reason="xllamacpp (the test extra) runs a real llama-server for these tests")

from llama_server_fixture import free_port, llama_server  # noqa: E402

from lsp_llm.engine.llama_server import EngineError, LlamaServer, Timings  # noqa: E402
from lsp_llm.engine.session import Cancelled  # noqa: E402

CODE = b'''import os


def walk(top: str) -> list[str]:
    """Every file under top, sorted."""
    found = []
    for root, _dirs, files in os.walk(top):
        for name in files:
            found.append(os.path.join(root, name))
    return '''
OTHER = b"""class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
"""
COUNTING = b"0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,"
KEY = "test-key-1234"


@pytest.fixture(scope="module")
def server_url(default_model_file: Path) -> Iterator[str]:
    with llama_server(default_model_file, slots=2, threads=2) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[LlamaServer]:
    with LlamaServer(server_url, timeout_s=120) as c:
        c.connect()
        yield c


def ids(client: LlamaServer, text: bytes) -> list[int]:
    """``text`` as a prompt: BOS, then its tokens."""
    assert client.info is not None and client.info.bos_id is not None
    return [client.info.bos_id] + [t.id for t in client.tokenize(text)]


def after(seconds: float) -> Callable[[], bool]:
    start = time.monotonic()
    return lambda: time.monotonic() - start > seconds


def test_connect(client: LlamaServer) -> None:
    info = client.info
    assert info is not None
    assert info.n_slots == 2
    assert "gemma-3-270m" in info.model
    assert info.n_ctx == 4096
    assert info.add_bos and info.bos_id == 2 and info.eos_id == 1
    assert info.infill is False  # Gemma 3 has no FIM tokens


def test_tokenize_gives_the_pieces_of_the_text(client: LlamaServer) -> None:
    text = "é, ü, 🫨 and <bos> ".encode() + CODE  # the emoji's pieces are single bytes, not UTF-8
    tokens = client.tokenize(text)
    assert b"".join(t.piece for t in tokens) == text
    assert tokens[0].id != client.info.bos_id  # no BOS; "<bos>" in the text stays text
    assert any(len(t.piece) == 1 and t.piece[0] >= 0x80 for t in tokens)
    assert all(client.piece(t.id) == t.piece for t in tokens)


def test_feed_then_top_next_reuses_the_cache(client: LlamaServer) -> None:
    prompt = ids(client, CODE)
    client.feed(0, prompt)
    top, timings = client.top_next(0, prompt, 5)
    assert timings.cache_n >= len(prompt) - 1
    assert len(top) == 5 and all(a.logprob >= b.logprob for a, b in zip(top, top[1:]))
    assert all(t.logprob < 0 and client.piece(t.id) == t.piece for t in top)
    # a keystroke: one token appended
    _, typed = client.top_next(0, prompt + [top[0].id], 5)
    assert typed.cache_n >= len(prompt) and typed.prompt_n <= 2


def test_two_documents_keep_their_slots(client: LlamaServer) -> None:
    a, b = ids(client, CODE), ids(client, OTHER)
    client.feed(0, a)
    client.feed(1, b)
    _, on_a = client.top_next(0, a, 3)
    _, on_b = client.top_next(1, b, 3)
    assert on_a.cache_n >= len(a) - 1 and on_a.prompt_n <= 1
    assert on_b.cache_n >= len(b) - 1 and on_b.prompt_n <= 1


def test_greedy_prompts_in_one_request_equal_each_alone(client: LlamaServer) -> None:
    a, b = ids(client, CODE), ids(client, OTHER)
    both = client.greedy(None, [a, b], 8)
    alone = [client.greedy(None, [p], 8)[0] for p in (a, b)]
    assert [tokens for tokens, _ in both] == [tokens for tokens, _ in alone]
    assert all(0 < len(tokens) == t.predicted_n <= 8 for tokens, t in both)  # an EOS ends one early
    on_slots = client.greedy([1, 0], [a, b], 8)
    assert [tokens for tokens, _ in on_slots] == [tokens for tokens, _ in both]


def test_greedy_stops_after_a_stop_string(client: LlamaServer) -> None:
    prompt = ids(client, COUNTING)
    [(tokens, timings)] = client.greedy([0], [prompt], 30, stop=[" 23,"])
    text = b"".join(client.piece(t) for t in tokens)
    assert text.endswith(b" 23,") and timings.predicted_n == len(tokens) < 30


def test_greedy_past_its_time_ends_at_a_line_break(client: LlamaServer) -> None:
    """Ghost text's budget on a server (``t_max_predict_ms``): what is ready
    comes back, ended at a line break, not cut mid-line nor dropped."""
    prompt = ids(client, CODE)
    [(unbounded, _)] = client.greedy([0], [prompt], 48)
    [(bounded, _)] = client.greedy([0], [prompt], 48, t_max_ms=1)
    text = b"".join(client.piece(t) for t in bounded)
    assert text.endswith(b"\n") and text.count(b"\n") <= 2, text  # (the server checks the time after a token)
    assert bounded == unbounded[: len(bounded)] and len(bounded) < len(unbounded)


class SlotWatch:
    """A slot's progress seen from another connection: tokens decoded while busy, then when it went idle."""

    def __init__(self, url: str, slot: int) -> None:
        self.url, self.slot = url, slot
        self.decoded = -1  # while busy
        self.idle_at: float | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while time.monotonic() < deadline:
                state = http.get("/slots").json()[self.slot]
                if state["is_processing"]:
                    self.decoded = max(self.decoded, state["next_token"][0]["n_decoded"])
                elif self.decoded >= 0:
                    self.idle_at = time.monotonic()
                    return
                time.sleep(0.01)


def test_cancel_closes_the_connection_and_frees_the_slot(
    client: LlamaServer, server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = ids(client, COUNTING)
    watch = SlotWatch(server_url, 1)
    asked: list[tuple[float, int]] = []

    def should_stop() -> bool:
        if asked or watch.decoded >= 2:  # generating
            asked.append((time.monotonic(), watch.decoded))
            return True
        return False

    with pytest.raises(Cancelled):
        client.greedy([1], [prompt], 3000, should_stop)
    at, decoded = asked[0]
    assert time.monotonic() - at < 0.2
    watch.thread.join()
    assert watch.idle_at is not None, "the server went on generating after the connection closed"
    # it stops between decode steps: those in flight when it saw the connection close (a second
    # here when idle, more when other work starves its threads)
    assert watch.decoded <= decoded + 8, (decoded, watch.decoded)
    with capsys.disabled():
        more = watch.decoded - decoded
        print(f"\ncancel: slot free {watch.idle_at - at:.2f} s after should_stop, {more} more tokens decoded")


def test_a_stop_before_the_call_sends_nothing(client: LlamaServer) -> None:
    with pytest.raises(Cancelled):
        client.feed(0, [2], lambda: True)


def test_an_unreachable_server_is_reported_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with LlamaServer(url, timeout_s=5) as c, pytest.raises(EngineError) as caught:
        c.connect()
    assert caught.value.kind == "unreachable"
    assert f"cannot reach llama-server at {url}" in str(caught.value)
    assert time.monotonic() - start < 2.0


def test_a_wrong_path_names_the_endpoint(server_url: str) -> None:
    with LlamaServer(server_url + "/v1", timeout_s=5) as c, pytest.raises(EngineError) as caught:
        c.connect()
    assert caught.value.kind == "not_found" and "/props" in str(caught.value)


def test_a_bad_request_carries_the_servers_message(client: LlamaServer) -> None:
    with pytest.raises(EngineError) as caught:
        client.feed(0, [10**7])
    assert caught.value.kind == "bad_request" and "invalid tokens" in str(caught.value)
    with pytest.raises(ValueError, match="slot 2 out of range"):
        client.feed(2, [2])


def test_a_timeout(client: LlamaServer, server_url: str) -> None:
    prompt = ids(client, OTHER + CODE)
    with LlamaServer(server_url, timeout_s=0.05) as c, pytest.raises(EngineError) as caught:
        c.top_next(1, prompt[:-3], 3)  # cold: longer than 50 ms
    assert caught.value.kind == "timeout" and "within 0.05 s" in str(caught.value)


def test_the_api_key(tiny_fim_model_path: Path) -> None:
    with llama_server(tiny_fim_model_path, slots=1, threads=1, api_keys=[KEY]) as url:
        for key, words in ((None, "needs an API key"), ("wrong-key", "rejected the API key (LSP_LLM_API_KEY)")):
            with LlamaServer(url, api_key=key, timeout_s=10) as c, pytest.raises(EngineError) as caught:
                c.connect()
            assert caught.value.kind == "auth" and words in str(caught.value)
            assert "wrong-key" not in str(caught.value) and "wrong-key" not in repr(c)
        with LlamaServer(url, api_key=KEY, timeout_s=10) as c:
            info = c.connect()
            assert info.n_slots == 1 and info.infill is True  # the tiny model declares FIM tokens
            assert c.greedy(None, [[info.bos_id, 100, 200]], 3)[0][1].predicted_n == 3


def test_measure_exact(client: LlamaServer, capsys: pytest.CaptureFixture[str]) -> None:
    from lsp_llm.lsp.lifecycle import EXACT_PROBES, exact_sample

    exact = client.measure_exact(ids(client, exact_sample())[: EXACT_PROBES[0]], slot=0)
    assert exact is False  # llama-server here: other logprobs cold and warm (cache_prompt is not bit-exact)
    runs = client.last_exact
    assert runs is not None and runs.exact == exact
    assert runs.cold_timings.cache_n == 0 and runs.warm_timings.cache_n > 0
    assert isinstance(runs.rewound_timings, Timings)
    with capsys.disabled():
        logprobs = [r[0].logprob for r in (runs.cold, runs.warm, runs.rewound)]
        print(f"\nmeasure_exact: {exact} (top logprob cold, warm, rewound: {logprobs})")


def test_the_exactness_probes_are_real_code_with_uncertain_next_tokens(client: LlamaServer) -> None:
    """A near-certain next token (repeated text) agrees cold and warm even on
    an engine that is not exact: the probes at connect must not be one."""
    from lsp_llm.lsp.lifecycle import EXACT_PROBES, exact_sample

    sample = ids(client, exact_sample())
    assert len(sample) > max(EXACT_PROBES)
    for n in EXACT_PROBES:
        top, _ = client.top_next(0, sample[:n], 3)
        assert top[0].logprob < -0.01, (n, top)


def test_a_short_feed_finishes_when_preempted_and_a_long_one_stops(client: LlamaServer) -> None:
    """A keystroke's feed is cheaper to finish than to stop on a server (the
    slot stays busy until the server sees the closed connection); a long
    read still stops when its work is preempted."""
    from lsp_llm.engine.remote import SHORT_FEED, RemotePool

    assert client.info is not None
    pool = RemotePool(client, client.info, headroom=8, exact=False)
    prompt = ids(client, CODE)
    preempted = after(0)  # always: a request waits
    with pytest.raises(Cancelled):
        pool.sync("file:///a.py", prompt, preempted, b"")  # the first read: long
    pool.sync("file:///a.py", prompt, None, b"")
    typed = prompt + ids(client, b" found")[1:]
    assert len(typed) - len(prompt) <= SHORT_FEED
    pool.sync("file:///a.py", typed, preempted, b"")  # a keystroke: finished
    assert pool.stats["file:///a.py"].cached == len(typed)
    _, timings = client.top_next(pool.sessions["file:///a.py"], typed, 3)
    assert timings.prompt_n <= 1  # the slot holds the typed text


def test_shared_clients_keep_their_documents_on_the_slots_the_engine_chose(server_url: str) -> None:
    """``engineSlots: shared``: each lsp-llm server lets the engine choose a
    document's slot, then keeps the document there. A request whose slot is
    busy (with its own cancelled predecessor, here a long generation) waits
    for it, rather than take the other client's slot and evict its document."""
    from lsp_llm.engine.remote import RemotePool

    with LlamaServer(server_url, timeout_s=120) as one, LlamaServer(server_url, timeout_s=120) as two:
        pools = []
        for c in (one, two):
            c.connect()
            c.shared = True
            assert c.info is not None
            pools.append(RemotePool(c, c.info, headroom=8, exact=False))
        mine, theirs = pools
        a, b = ids(one, CODE), ids(one, OTHER)
        mine.sync("file:///a.py", a, None, b"")
        theirs.sync("file:///b.py", b, None, b"")
        slot_a, slot_b = mine.chosen["file:///a.py"], theirs.chosen["file:///b.py"]
        assert slot_a != slot_b  # the engine gave each document an idle slot of its own
        busy = threading.Thread(target=lambda: one.greedy([slot_a], [a], 120))
        busy.start()
        try:
            while not any(s.get("id") == slot_a and s.get("is_processing") for s in one.slots()):
                assert busy.is_alive(), "the generation ended before it was seen"
                time.sleep(0.01)
            mine.top_next("file:///a.py", a + ids(one, b" found")[1:], 3, lambda: False)
        finally:
            busy.join()
        assert mine.chosen["file:///a.py"] == slot_a
        theirs.top_next("file:///b.py", b, 3, lambda: False)
        assert theirs.stats["file:///b.py"].reused_last >= len(b) - 1  # b's slot still holds b
