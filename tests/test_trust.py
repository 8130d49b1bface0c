"""Answers for the text they were asked about, through the real server over a
pipe, with messages written together the way a busy client writes them:

- a request's position refers to the text as it stood when the request was
  read, even when a didChange follows in the same write (LSP handles
  messages in order), and while the first model loads;
- items respect the closing brackets and quotes an editor already put after
  the cursor;
- a lone surrogate (legal in a JSON string) is one code point everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from lsp_llm.features.after_cursor import covered

SERVER = [sys.executable, "-m", "lsp_llm", "--threads", "2"]
OPTIONS = {"waitFor": "all", "readBudgetMs": 60000}  # every item, after the read


class Pipe:
    """The server as a subprocess, written to in whole frames, several at once."""

    def __init__(self, encodings: list[str] | None = None, initialized: bool = True,
                 command: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(command or SERVER, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.next_id = 1
        self.messages: list[str] = []  # window/showMessage texts, as they came
        general = {"positionEncodings": encodings} if encodings else {}
        got = self.ask("initialize", {"processId": None, "rootUri": None, "initializationOptions": OPTIONS,
                                      "capabilities": {"general": general}})
        self.encoding = got["result"]["capabilities"].get("positionEncoding", "utf-16")
        if initialized:  # the model loads
            self.frames({"method": "initialized", "params": {}})

    def frames(self, *messages: dict[str, Any]) -> None:
        data = b""
        for m in messages:
            body = json.dumps({"jsonrpc": "2.0", **m}).encode()  # ASCII: lone surrogates as \\ud800
            data += b"Content-Length: %d\r\n\r\n" % len(body) + body
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def request(self, method: str, params: Any) -> dict[str, Any]:
        msg = {"id": self.next_id, "method": method, "params": params}
        self.next_id += 1
        return msg

    def answer(self, msg_id: int) -> dict[str, Any]:
        """Read frames until the response to msg_id (notifications are skipped)."""
        out = self.proc.stdout
        assert out is not None
        while True:
            length = 0
            while (line := out.readline().strip()):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if not length:
                raise EOFError("the server closed its output")
            body = json.loads(out.read(length))
            if body.get("method") == "window/showMessage":
                self.messages.append(body["params"]["message"])
            if body.get("id") == msg_id and "method" not in body:
                return body

    def ask(self, method: str, params: Any) -> dict[str, Any]:
        msg = self.request(method, params)
        self.frames(msg)
        return self.answer(msg["id"])

    def close(self) -> None:
        self.ask("shutdown", None)
        self.frames({"method": "exit"})
        self.proc.wait(30)


def did_open(uri: str, text: str) -> dict[str, Any]:
    return {"method": "textDocument/didOpen",
            "params": {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}}}


def did_change(uri: str, version: int, line: int, start: int, end: int, text: str) -> dict[str, Any]:
    rng = {"start": {"line": line, "character": start}, "end": {"line": line, "character": end}}
    return {"method": "textDocument/didChange",
            "params": {"textDocument": {"uri": uri, "version": version},
                       "contentChanges": [{"range": rng, "text": text}]}}


def completion_at(uri: str, line: int, character: int) -> dict[str, Any]:
    return {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}}


def items(pipe: Pipe, uri: str, line: int, character: int) -> list[dict[str, Any]]:
    """The items at a position, once the document is read (retried while empty)."""
    for _ in range(20):
        got = pipe.ask("textDocument/completion", completion_at(uri, line, character))["result"]
        if got["items"]:
            return got["items"]
    raise AssertionError("no items")


TEXT = "import os\n\n\ndef main(args):\n    value = comp"
LINE, END = 4, 16  # the end of "    value = comp": "comp" starts at column 12


@pytest.fixture(scope="module")
def pipe() -> Any:
    p = Pipe()
    yield p
    p.close()


def test_a_request_answers_for_the_text_it_was_sent_against(pipe: Pipe) -> None:
    uri = "file:///tmp/order.py"
    pipe.frames(did_open(uri, TEXT))
    assert items(pipe, uri, LINE, END)  # read
    # the request, then an edit before it on its line, in one write
    req = pipe.request("textDocument/completion", completion_at(uri, LINE, END))
    pipe.frames(req, did_change(uri, 2, LINE, 0, 0, "x"))
    got = pipe.answer(req["id"])["result"]["items"]
    assert got
    for item in got:
        assert item["textEdit"]["range"]["start"] == {"line": LINE, "character": 12}, item
        assert item["textEdit"]["range"]["end"]["character"] >= END, item
        assert item["textEdit"]["newText"].startswith("comp"), item


def test_a_request_read_while_the_first_model_loads_is_not_answered_for_newer_text() -> None:
    p = Pipe(initialized=False)
    uri = "file:///tmp/loading.py"
    req = p.request("textDocument/completion", completion_at(uri, LINE, END))
    p.frames({"method": "initialized", "params": {}}, did_open(uri, TEXT), req, did_change(uri, 2, LINE, 0, 0, "x"))
    got = p.answer(req["id"])["result"]
    for item in got["items"]:  # empty (the text it was about is gone), or for that text
        assert item["textEdit"]["range"]["start"] == {"line": LINE, "character": 12}, item
    p.close()


# -- brackets and quotes an editor closed already ------------------------------------
@pytest.mark.parametrize(("text", "rest", "taken"), [
    (b'"bye, " + name)', b")", 1),  # print(|)
    (b"'hi', end='')", b")", 1),
    (b"a, b)", b"b)", 2),  # the rest, repeated
    (b"f(x)", b")", 0),  # its own pair
    (b"name", b")", 0),
    (b'hello"', b'")', 1),  # print("|")
    (b'hello")', b'")', 2),
    (b"1, 2]", b"]", 1),  # [|]
    (b"'a': 1}", b"}", 1),  # {|}
    (b"x`", b"`", 1),
    (b"x):", b")", 1),  # def f(|)
    (b"a) + g(b", b") + 1", 1),  # only the closers it takes
    (b"items[0]", b"]", 0),
    (b'"a)b"', b")", 0),  # a bracket inside its own string
    (b"x\n    y)", b")", 0),  # the first line only
])
def test_covered_takes_what_the_insertion_closes(text: bytes, rest: bytes, taken: int) -> None:
    assert covered(text, rest) == taken


def apply(text: str, edit: dict[str, Any]) -> str:
    """One line's edit (UTF-16 units equal characters here: ASCII)."""
    lines = text.split("\n")
    rng = edit["range"]
    row = lines[rng["start"]["line"]]
    assert rng["start"]["line"] == rng["end"]["line"]
    lines[rng["start"]["line"]] = row[: rng["start"]["character"]] + edit["newText"] + row[rng["end"]["character"]:]
    return "\n".join(lines)


PAIRS = [  # an editor's auto-closed pair, the cursor between; whether the line item closes it (this model)
    ('def greet(name):\n    print("hello, " + name)\n\n\ndef bye(name):\n    print(', ")", True),
    ("def total(xs):\n    return sum([x * 2 for x in xs])\n\n\nvalues = [", "]", False),
    ('names = {"a": 1, "b": 2}\nages = {', "}", False),
    ('def greet(name):\n    print("hello, " + name)\n\n\ndef bye(name):\n    print("', '")', True),
]


@pytest.mark.parametrize(("before", "after", "closes"), PAIRS)
def test_items_do_not_repeat_a_closing_bracket_already_there(pipe: Pipe, before: str, after: str,
                                                             closes: bool) -> None:
    uri = f"file:///tmp/pairs{PAIRS.index((before, after, closes))}.py"
    text = before + after
    line = before.count("\n")
    col = len(before.split("\n")[-1])
    pipe.frames(did_open(uri, text))
    got = items(pipe, uri, line, col)
    for item in got:
        new = apply(text, item["textEdit"]).split("\n")[line]
        for o, c in ("()", "[]", "{}"):
            assert new.count(c) <= new.count(o), (new, item["textEdit"])
        assert new.count('"') % 2 == 0 or '"' not in after, (new, item["textEdit"])
    line_items = [i for i in got if "end of line" in i.get("detail", "")]
    if closes:  # the case that matters: the line item writes the closer the editor put there
        assert line_items and any(after[0] in i["textEdit"]["newText"] for i in line_items), line_items


# -- lone surrogates ------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
def test_a_lone_surrogate_is_one_code_point(encoding: str) -> None:
    p = Pipe([encoding])
    assert p.encoding == encoding
    uri = "file:///tmp/surrogate.py"
    text = "a\ud800b = 1\nx = a\ud800b"
    p.frames(did_open(uri, text))
    # replace b with cc: column 2 in UTF-16 and UTF-32 units, 4 in UTF-8 (the surrogate takes 3 bytes)
    col = 4 if encoding == "utf-8" else 2
    p.frames(did_change(uri, 2, 0, col, col + 1, "cc"))
    client = "a\ud800cc = 1\nx = a\ud800b"
    mirror = p.ask("workspace/executeCommand", {"command": "lsp-llm.document", "arguments": [uri]})["result"]
    units = {"utf-8": len(client.encode("utf-8", "surrogatepass")),
             "utf-16": len(client.encode("utf-16-le", "surrogatepass")) // 2, "utf-32": len(client)}
    assert mirror["length"] == units[encoding] and not mirror["stale"]
    # the partial word before the cursor keeps its surrogate
    end = 9 if encoding == "utf-8" else 7
    for item in items(p, uri, 1, end):
        assert item["textEdit"]["newText"].startswith("a\ud800b"), item
        assert item["textEdit"]["range"]["start"] == {"line": 1, "character": 4}, item
    p.close()
