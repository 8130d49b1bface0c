"""The stdio transport (``lsp_llm.lsp.stdio``): a pipe is read by asyncio with no
thread hop, any other stdin by pygls's reader; the end of input, even in the
middle of a message, ends the server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MESSAGES = [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize",
     "params": {"capabilities": {}, "processId": None, "rootUri": None}},
    {"jsonrpc": "2.0", "method": "initialized", "params": {}},
    {"jsonrpc": "2.0", "id": 2, "method": "shutdown"},
    {"jsonrpc": "2.0", "method": "exit"},
]


def frames(messages: list[dict]) -> bytes:
    out = b""
    for m in messages:
        body = json.dumps(m).encode()
        out += b"Content-Length: %d\r\n\r\n" % len(body) + body
    return out


def responses(stdout: bytes) -> dict[int, dict]:
    """The JSON-RPC responses in the server's output, by id."""
    out = {}
    for chunk in stdout.split(b"Content-Length: ")[1:]:
        body = json.loads(chunk.split(b"\r\n\r\n", 1)[1])
        if "id" in body and "method" not in body:
            out[body["id"]] = body
    return out


@pytest.fixture
def server(tiny_model_path: Path) -> list[str]:
    return [sys.executable, "-m", "lsp_llm", "--model", str(tiny_model_path), "--threads", "2",
            "--log-level", "info"]


def test_a_pipe_and_a_file_are_both_served(server: list[str], tmp_path: Path) -> None:
    data = frames(MESSAGES)
    piped = subprocess.run(server, input=data, capture_output=True, timeout=120)
    (tmp_path / "in.bin").write_bytes(data)
    with (tmp_path / "in.bin").open("rb") as f:
        filed = subprocess.run(server, stdin=f, capture_output=True, timeout=120)
    for run in (piped, filed):
        got = responses(run.stdout)
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        assert sorted(got) == [1, 2], run.stdout[:500]
        assert got[1]["result"]["capabilities"]["completionProvider"] and got[2]["result"] is None
    assert b"not a pipe" not in piped.stderr  # read by asyncio
    assert b"not a pipe" in filed.stderr  # read by pygls's thread


def test_the_end_of_input_in_the_middle_of_a_message_ends_the_server(server: list[str]) -> None:
    data = frames(MESSAGES[:1]) + frames(MESSAGES[2:3])[:-5]  # the shutdown request is cut short
    run = subprocess.run(server, input=data, capture_output=True, timeout=120)  # no hang
    assert run.returncode == 0
    assert sorted(responses(run.stdout)) == [1]
