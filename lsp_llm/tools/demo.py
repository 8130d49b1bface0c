"""``lsp-llm demo``: start the real server as a subprocess and drive it over
stdio exactly as an editor would: open a real file, retype one of its lines
keystroke by keystroke, ask for completion after each keystroke, and print
the items, the latency and the tokens reused versus re-fed."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from lsprotocol import types as t
from pygls.exceptions import JsonRpcException

from .client import StdioServer, completion_items, server_command
from .editor_text import Pos

DEFAULT_FILE = Path(sysconfig.get_paths()["stdlib"]) / "sched.py"


def pick_line(lines: list[str]) -> int:
    """A real code line about 60% into the file, 20 to 70 characters long."""
    start = int(len(lines) * 0.6)
    for i in list(range(start, len(lines))) + list(range(start)):
        s = lines[i].strip()
        if 20 <= len(s) <= 70 and not s.startswith(("#", '"', "'")):
            return i
    return len(lines) - 1


async def run(args: argparse.Namespace) -> int:
    path = Path(args.file).resolve()
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    row = pick_line(lines)
    line = lines[row].rstrip("\r\n")
    indent = len(line) - len(line.lstrip())
    lines[row] = line[:indent] + "\n"
    server = StdioServer(server_command(args.model, args.threads, args.log_level))
    print(f"server: {' '.join(server.argv)}")
    try:
        t0 = time.perf_counter()
        # the cold completion waits for the whole read (a server answers empty after 1 s by default)
        await server.start(options={"readBudgetMs": 600000}, timeout=600, root_uri=path.parent.as_uri())
        doc = Line(path.as_uri(), "".join(lines), row, indent, len("".join(lines[:row])) + indent)
        server.open(doc.uri, doc.text)
        await server.stats()  # waits for nothing; just a round trip
        print(f"file: {path} ({len(text)} bytes); retyping line {row + 1}: {line.strip()!r}")
        await retype(server, doc, line[indent:][: args.keystrokes], t0)
    except JsonRpcException as e:
        print(f"lsp-llm demo: the server answered with an error: {e}", file=sys.stderr)
        return 1
    finally:
        await server.stop()
    return 0


@dataclass
class Line:
    """The document and where in it the demo types: (row, col), offset at."""

    uri: str
    text: str
    row: int
    col: int
    at: int

    def type(self, ch: str) -> Pos:
        """Insert ch at the cursor; where it went, in the old text."""
        pos = (self.row, self.col)
        self.text = self.text[: self.at] + ch + self.text[self.at :]
        self.col, self.at = self.col + len(ch), self.at + len(ch)
        return pos


async def complete(server: StdioServer, doc: Line) -> tuple[float, list[t.CompletionItem]]:
    t1 = time.perf_counter()
    res = await server.complete(doc.uri, doc.text, (doc.row, doc.col)).future
    return (time.perf_counter() - t1) * 1000, completion_items(res)


async def decode_ms_total(server: StdioServer) -> float:
    return float((await server.stats())["decode_ms_total"])


async def retype(server: StdioServer, doc: Line, typed: str, t0: float) -> None:
    cold_ms, items = await complete(server, doc)
    info = await server.stats(doc.uri)
    print(f"model ready and file read in {(time.perf_counter() - t0):.2f}s; "
          f"cold completion {cold_ms:.0f} ms ({info['tokens']} tokens before the cursor, "
          f"fed {info['fed_total']})")
    print(f"{'key':>5} {'ms':>7} {'decode':>7} {'reused':>7} {'fed':>4} {'memo':>5}  completions")
    times, overheads, fed_total = [], [], info["fed_total"]
    for ch in typed:
        decoded_before = await decode_ms_total(server)
        old = doc.text
        pos = doc.type(ch)
        server.change(doc.uri, old, pos, pos, ch)
        ms, items = await complete(server, doc)
        st = await server.stats(doc.uri)
        decode = await decode_ms_total(server) - decoded_before  # the feed on didChange included
        fed, fed_total = st["fed_total"] - fed_total, st["fed_total"]
        times.append(ms)
        overheads.append(ms - decode)
        shown = ", ".join(repr(it.label) for it in items[:4])
        print(f"{ch!r:>5} {ms:7.1f} {decode:7.1f} {st['reused_last']:7d} {fed:4d} "
              f"{st['memo_steps_last']:5d}  {shown}")
    if times:
        summary(times, overheads, cold_ms)


def summary(times: list[float], overheads: list[float], cold_ms: float) -> None:
    p50 = statistics.median(times)
    decode = sum(times) - sum(overheads)
    print(f"\nkeystrokes: {len(times)}; completion latency p50 {p50:.1f} ms, max {max(times):.1f} ms; "
          f"cold {cold_ms:.0f} ms ({cold_ms / p50:.0f}x the p50)\n"
          f"server overhead (latency minus llama.cpp decode): p50 {statistics.median(overheads):.1f} ms "
          f"a keystroke; {sum(overheads):.0f} ms in all, {100 * sum(overheads) / max(decode, 1e-9):.0f}% "
          f"of the {decode:.0f} ms of decode")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lsp-llm demo", description=__doc__)
    p.add_argument("file", nargs="?", default=str(DEFAULT_FILE), help="source file (default: stdlib sched.py)")
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keystrokes", type=int, default=40, help="at most this many keystrokes")
    p.add_argument("--log-level", default="warning")
    return asyncio.run(run(p.parse_args(argv)))
