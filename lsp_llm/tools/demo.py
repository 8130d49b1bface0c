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
from pathlib import Path

from lsprotocol import types as t
from pygls.exceptions import JsonRpcException
from pygls.lsp.client import LanguageClient

DEFAULT_FILE = Path(sysconfig.get_paths()["stdlib"]) / "sched.py"


def pick_line(lines: list[str]) -> int:
    """A real code line about 60% into the file, 20 to 70 characters long."""
    start = int(len(lines) * 0.6)
    for i in list(range(start, len(lines))) + list(range(start)):
        s = lines[i].strip()
        if 20 <= len(s) <= 70 and not s.startswith(("#", '"', "'")):
            return i
    return len(lines) - 1


def server_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "lsp_llm", "--threads", str(args.threads), "--log-level", args.log_level]
    if args.model:
        cmd += ["--model", args.model]
    return cmd


async def run(args: argparse.Namespace) -> int:
    path = Path(args.file).resolve()
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    row = pick_line(lines)
    line = lines[row].rstrip("\r\n")
    indent = len(line) - len(line.lstrip())
    typed = line[indent:][: args.keystrokes]
    lines[row] = line[:indent] + "\n"
    uri = path.as_uri()

    client = LanguageClient("lsp-llm-demo", "0.1")
    cmd = server_command(args)
    print(f"server: {' '.join(cmd)}")
    await client.start_io(*cmd)
    try:
        t0 = time.perf_counter()
        await client.initialize_async(t.InitializeParams(
            capabilities=t.ClientCapabilities(general=t.GeneralClientCapabilities(
                position_encodings=[t.PositionEncodingKind.Utf16])),
            # the cold completion waits for the whole read (a server answers empty after 1 s by default)
            initialization_options={"readBudgetMs": 600000},
            process_id=None, root_uri=path.parent.as_uri()))
        client.initialized(t.InitializedParams())
        client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=uri, language_id="python", version=1, text="".join(lines))))
        info = await client.workspace_execute_command_async(
            t.ExecuteCommandParams(command="lsp-llm.stats"))  # waits for nothing; just a round trip
        print(f"file: {path} ({len(text)} bytes); retyping line {row + 1}: {line.strip()!r}")

        async def complete(col: int) -> tuple[float, list[t.CompletionItem]]:
            t1 = time.perf_counter()
            res = await client.text_document_completion_async(t.CompletionParams(
                text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(row, col)))
            ms = (time.perf_counter() - t1) * 1000
            items = res.items if isinstance(res, t.CompletionList) else (res or [])
            return ms, items

        cold_ms, items = await complete(indent)
        info = await client.workspace_execute_command_async(
            t.ExecuteCommandParams(command="lsp-llm.stats", arguments=[uri]))
        print(f"model ready and file read in {(time.perf_counter() - t0):.2f}s; "
              f"cold completion {cold_ms:.0f} ms ({info['tokens']} tokens before the cursor, "
              f"fed {info['fed_total']})")
        print(f"{'key':>5} {'ms':>7} {'decode':>7} {'reused':>7} {'fed':>4} {'memo':>5}  completions")

        async def decode_ms_total() -> float:
            st = await client.workspace_execute_command_async(t.ExecuteCommandParams(command="lsp-llm.stats"))
            return float(st["decode_ms_total"])

        times, overheads = [], []
        version, fed_total = 1, info["fed_total"]
        for i, ch in enumerate(typed):
            version += 1
            col = indent + i
            decoded_before = await decode_ms_total()
            client.text_document_did_change(t.DidChangeTextDocumentParams(
                text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[t.TextDocumentContentChangePartial(
                    range=t.Range(t.Position(row, col), t.Position(row, col)), text=ch)]))
            ms, items = await complete(col + 1)
            st = await client.workspace_execute_command_async(
                t.ExecuteCommandParams(command="lsp-llm.stats", arguments=[uri]))
            decode = await decode_ms_total() - decoded_before  # the feed on didChange included
            fed, fed_total = st["fed_total"] - fed_total, st["fed_total"]
            times.append(ms)
            overheads.append(ms - decode)
            shown = ", ".join(repr(it.label) for it in items[:4])
            print(f"{ch!r:>5} {ms:7.1f} {decode:7.1f} {st['reused_last']:7d} {fed:4d} "
                  f"{st['memo_steps_last']:5d}  {shown}")
        if times:
            p50 = statistics.median(times)
            decode = sum(times) - sum(overheads)
            print(f"\nkeystrokes: {len(times)}; completion latency p50 {p50:.1f} ms, max {max(times):.1f} ms; "
                  f"cold {cold_ms:.0f} ms ({cold_ms / p50:.0f}x the p50)\n"
                  f"server overhead (latency minus llama.cpp decode): p50 {statistics.median(overheads):.1f} ms "
                  f"a keystroke; {sum(overheads):.0f} ms in all, {100 * sum(overheads) / max(decode, 1e-9):.0f}% "
                  f"of the {decode:.0f} ms of decode")
    except JsonRpcException as e:
        print(f"lsp-llm demo: the server answered with an error: {e}", file=sys.stderr)
        return 1
    finally:
        await _stop(client)
    return 0


async def _stop(client: LanguageClient) -> None:
    """Shut the server down; kill it if it does not exit within seconds."""
    try:
        await asyncio.wait_for(client.shutdown_async(None), 10)
        client.exit(None)
    except Exception as e:  # noqa: BLE001 - the server may already be gone
        print(f"lsp-llm demo: shutdown failed: {e!r}", file=sys.stderr)
    server = client._server  # pygls keeps the process here and waits for it in stop()
    if server is not None:
        try:
            await asyncio.wait_for(server.wait(), 10)
        except asyncio.TimeoutError:
            server.kill()
    await client.stop()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lsp-llm demo", description=__doc__)
    p.add_argument("file", nargs="?", default=str(DEFAULT_FILE), help="source file (default: stdlib sched.py)")
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keystrokes", type=int, default=40, help="at most this many keystrokes")
    p.add_argument("--log-level", default="warning")
    return asyncio.run(run(p.parse_args(argv)))
