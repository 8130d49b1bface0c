"""Helpers for the editor integration tests (real editors, real server, default model).

A test whose editor is missing skips with the reason, except under CI=true, where a missing
required editor fails the test instead: CI must not pass by skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EDITORS = REPO / "editors"
ARTIFACTS = REPO / "test-artifacts"
CI_CACHE = Path(os.environ.get("LSP_LLM_CI_CACHE", Path.home() / ".cache" / "lsp-llm-ci"))

# A small Python file and where the user types: after "pri" the model should offer "print".
SAMPLE = '''import sys


def greet(name):
    """Say hello to name."""
    message = "Hello, " + name + "!"
    print(message)
    return message


def main(argv):
    for name in argv[1:]:
        greet(name)
'''
TYPED = "pri"
EXPECTED = "print"
# Ghost text tests type TYPED on a new line after this (1-based) line, the docstring: on the line
# before `print(message)` the server rightly suggests nothing (it would repeat the next line).
GHOST_AFTER = 5


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing(what: str) -> None:
    """Skip (locally) or fail (CI=true) because a required tool is missing."""
    msg = f"{what} (install with: bash .ci/editors.sh)"
    if in_ci():
        pytest.fail(f"required editor tool missing under CI=true: {msg}")
    pytest.skip(msg)


def server_cmd() -> list[str]:
    """The lsp-llm server: the console script next to sys.executable, else `python -m lsp_llm`."""
    script = Path(sys.executable).with_name("lsp-llm")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "lsp_llm"]


def find_tool(name: str, *candidates: Path | str) -> str | None:
    """First existing executable among candidates, then next to sys.executable, then PATH."""
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    near = Path(sys.executable).with_name(name)
    if near.exists():
        return str(near)
    return shutil.which(name)


# Accept-by-word takes this much of a suggestion (the editors implement the same rule): leading
# blanks plus one identifier, or plus one run of other non-blank characters; a line break with
# the next line's indentation is a word of its own.
FIRST_WORD = re.compile(r"\r?\n[ \t]*|[ \t]*\w+|[ \t]*[^\w\s]+|[ \t]+")


def first_word(text: str) -> str:
    m = FIRST_WORD.match(text)
    return m.group(0) if m else text


def inline_completion(
    text: str, line: int, character: int, uri: str = "file:///tmp/proj/hello.py", tries: int = 5
) -> list[dict]:
    """textDocument/inlineCompletion asked directly of a fresh server (stdio, plain JSON-RPC) for
    `text` at (line, character) (UTF-16): what an editor should show there. The server is
    deterministic, so an editor's server answers the same for the same text. A fresh server may
    answer empty while it still reads the document (its read budget): ask again, up to `tries`."""
    proc = subprocess.Popen(server_cmd(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin and proc.stdout

    def send(msg: dict) -> None:
        body = json.dumps({"jsonrpc": "2.0", **msg}).encode()
        proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        proc.stdin.flush()

    def answer(msg_id: int) -> dict:
        while True:
            length = 0
            while (header := proc.stdout.readline().strip()) != b"":
                if header.lower().startswith(b"content-length:"):
                    length = int(header.split(b":")[1])
            msg = json.loads(proc.stdout.read(length))
            if msg.get("id") == msg_id and "method" not in msg:
                assert "error" not in msg, msg
                return msg["result"]

    try:
        send({"id": 1, "method": "initialize", "params": {"processId": None, "rootUri": None, "capabilities": {}}})
        answer(1)
        send({"method": "initialized", "params": {}})
        send({"method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": text}}})
        for i in range(tries):
            send({"id": 10 + i, "method": "textDocument/inlineCompletion", "params": {
                "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
                "context": {"triggerKind": 1}}})
            result = answer(10 + i)
            items = result["items"] if isinstance(result, dict) else (result or [])
            if items:
                break
            time.sleep(0.5)
        send({"id": 3, "method": "shutdown"})
        answer(3)
        send({"method": "exit"})
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return items
