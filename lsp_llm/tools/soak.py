"""``lsp-llm soak``: a long run against the real server over stdio on the
default model, as an editor would drive it for hours: typing (single and
multi-change edits with non-ASCII and CRLF text), completions, a
cancellation storm, close/reopen, bad input. It checks the mirror against
the editor's text (``lsp-llm.document``), counts every request and its
answer, and samples the server's RSS over time.

Stops after ``--edits``, ``--completions`` and ``--cancels`` are all done,
or after ``--minutes``. Not part of the test suite (the fuzz tests are).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lsprotocol import types as t
from pygls.exceptions import JsonRpcException

from .client import StdioServer, server_command
from .editor_text import EditorText

ANSWER_S = 60.0
SOURCE = Path(sysconfig.get_paths()["stdlib"]) / "sched.py"
UNICODE = "# naïve café: 😀 中文\r\nname = 'é' + \"😀\"\r\n\r\ndef greet(who):\r\n    return 'héllo ' + who\r\n"
TYPED = list("abcdefghij_().:= ") + ["é", "😀", "中", "\n", "\r\n", "    ", "return ", "self."]


@dataclass
class Figures:
    minutes: float = 0.0
    edits: int = 0
    completions: int = 0  # answered with a list
    with_items: int = 0
    cancels: int = 0  # requests cancelled by the client
    cancelled: int = 0  # ... answered RequestCancelled (the others had their answer already)
    requests: int = 0  # every request sent
    answered: int = 0
    unanswered: int = 0  # no answer within ANSWER_S
    bad_inputs: int = 0
    bad_answered_right: int = 0
    bad_answered_wrong: int = 0  # another answer, or none: a failure
    mirror_checks: int = 0
    mirror_mismatches: int = 0
    bad_ranges: int = 0  # textEdits breaking the after-cursor rule or not covering the item's start
    crashes: int = 0
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (minute, MB)
    # what the server holds at each RSS sample: (minute, memo steps, saved documents, saved MB)
    held: list[tuple[float, int, int, float]] = field(default_factory=list)
    doc_chars: list[tuple[float, int]] = field(default_factory=list)  # (minute, characters in the documents)
    late: list[tuple[float, str]] = field(default_factory=list)  # (minute, method) of each unanswered request
    heap: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (minute, the stats' "heap")

    def summary(self) -> str:
        start, end = self.rss_mb[0][1], self.rss_mb[-1][1]
        peak = max(mb for _, mb in self.rss_mb)
        series = ", ".join(f"{m:.1f} min {mb:.0f}" for m, mb in self.rss_mb)
        return (f"{self.minutes:.1f} min: {self.edits} edits, {self.completions} completions "
                f"({self.with_items} with items), {self.cancels} cancels ({self.cancelled} answered "
                f"RequestCancelled), {self.requests} requests, {self.answered} answered, "
                f"{self.unanswered} unanswered; {self.bad_inputs} bad inputs ({self.bad_answered_right} answered "
                f"as expected, {self.bad_answered_wrong} not); mirror checks {self.mirror_checks}, "
                f"mismatches {self.mirror_mismatches}; "
                f"bad ranges {self.bad_ranges}; crashes {self.crashes}\n"
                f"RSS MB: start {start:.0f}, end {end:.0f}, peak {peak:.0f}, growth {end - start:+.0f}\n"
                f"RSS over time (MB): {series}\n"
                f"document characters: {self._chars()}; unanswered: {self.late or 'none'}")

    def _chars(self) -> str:
        if not self.doc_chars:
            return "not sampled"
        sizes = [n for _, n in self.doc_chars]
        return f"start {sizes[0]:,}, end {sizes[-1]:,}, max {max(sizes):,}"


def rss_mb(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.fig = Figures()
        self.server: StdioServer | None = None
        self.docs: list[EditorText] = []
        self.cursors: dict[str, int] = {}
        self.opened_chars: dict[str, int] = {}
        self.t0 = time.monotonic()

    def minutes(self) -> float:
        return (time.monotonic() - self.t0) / 60

    def done(self) -> bool:
        a, f = self.args, self.fig
        return self.minutes() >= a.minutes or (
            f.edits >= a.edits and f.completions >= a.completions and f.cancels >= a.cancels)

    async def start(self) -> None:
        self.server = StdioServer(server_command(self.args.model, self.args.threads))
        await self.server.start(t.ClientCapabilities(window=t.WindowClientCapabilities(work_done_progress=True)))
        enc = self.server.encoding
        self.docs = [EditorText(SOURCE.as_uri(), SOURCE.read_text(), enc),
                     EditorText("file:///soak/u.py", UNICODE, enc)]
        for doc in self.docs:
            self.opened_chars[doc.uri] = len(doc.text)
            self.open(doc)

    def open(self, doc: EditorText) -> None:
        assert self.server is not None
        self.server.client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=doc.uri, language_id="python", version=doc.version, text=doc.text)))

    async def request(self, method: str, params: object, raw: bool = False) -> object:
        """Counts the request and its answer; an error answer is re-raised."""
        assert self.server is not None
        self.fig.requests += 1
        try:
            send = self.server.raw_request if raw else self.server.request
            result = await send(method, params, ANSWER_S)
        except asyncio.TimeoutError:
            self.fig.unanswered += 1
            self.fig.late.append((round(self.minutes(), 2), method))
            raise
        except JsonRpcException:
            self.fig.answered += 1
            raise
        self.fig.answered += 1
        return result

    def cursor(self, doc: EditorText) -> int:
        """Where the user types: it moves with the typing, and now and then
        jumps elsewhere in the middle of the document."""
        b = doc.boundaries()
        at = self.cursors.get(doc.uri)
        if at is None or self.rng.random() < 0.02:
            at = b[min(len(b) - 1, int(len(b) * self.rng.uniform(0.3, 0.7)))]
        at = max(x for x in b if x <= min(at, len(doc.text)))  # a valid boundary
        self.cursors[doc.uri] = at
        return at

    def edit(self, doc: EditorText) -> None:
        """A keystroke at the cursor (typing, a backspace, a word deleted),
        sometimes sent with a second change a little earlier (multi-change)."""
        assert self.server is not None
        at = self.cursor(doc)
        b = doc.boundaries()
        i = b.index(at)
        changes = []
        if self.rng.random() < 0.15 and i > 20:  # a second change before the cursor
            j = b[i - self.rng.randint(5, 20)]
            changes.append(doc.change(j, j, self.rng.choice(TYPED)))
            at = self.cursor(doc)
            b, i = doc.boundaries(), doc.boundaries().index(at)
        grows = self.args.growth < 0 or len(doc.text) < self.opened_chars[doc.uri] + self.args.growth
        if grows and self.rng.random() < 0.8:
            text = self.rng.choice(TYPED)
            changes.append(doc.change(at, at, text))
            self.cursors[doc.uri] = at + len(text)
        else:
            start = b[max(0, i - self.rng.choice([1, 1, 4]))]
            changes.append(doc.change(start, at, ""))
            self.cursors[doc.uri] = start
        doc.version += 1
        self.server.client.text_document_did_change(t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=doc.uri, version=doc.version),
            content_changes=changes))
        self.fig.edits += 1

    async def complete(self, doc: EditorText) -> None:
        at = self.cursor(doc)
        pos, text = doc.position(at), doc.text
        try:
            res = await self.request(t.TEXT_DOCUMENT_COMPLETION, t.CompletionParams(
                text_document=t.TextDocumentIdentifier(uri=doc.uri), position=pos))
        except (asyncio.TimeoutError, JsonRpcException):
            return
        assert isinstance(res, t.CompletionList)
        self.fig.completions += 1
        self.fig.with_items += bool(res.items)
        before = EditorText(doc.uri, text, doc.encoding)
        self.fig.bad_ranges += sum(not before.edit_fits(at, item) for item in res.items)

    async def cancel(self, doc: EditorText) -> None:
        assert self.server is not None
        request = self.server.send(t.TEXT_DOCUMENT_COMPLETION, t.CompletionParams(
            text_document=t.TextDocumentIdentifier(uri=doc.uri), position=doc.position(self.cursor(doc))))
        self.fig.requests += 1
        self.fig.cancels += 1
        await asyncio.sleep(self.rng.uniform(0, 0.03))
        request.cancel(even_if_answered=True)  # a late cancel is input the server must take too
        try:
            await asyncio.wait_for(request.future, ANSWER_S)
        except asyncio.TimeoutError:
            self.fig.unanswered += 1
            self.fig.late.append((round(self.minutes(), 2), "cancelled " + t.TEXT_DOCUMENT_COMPLETION))
            return
        except JsonRpcException as e:
            self.fig.cancelled += e.code == -32800
        self.fig.answered += 1

    async def bad(self) -> None:
        """Bad input: each must get its error (InvalidParams), its empty
        answer (an unknown document), or be logged and ignored (a change to
        a document never opened) with the server still serving; anything
        else counts as a failure."""
        doc = self.rng.choice(self.docs)
        self.fig.bad_inputs += 1
        right = False
        kind = self.rng.random()
        try:
            if kind < 0.4:
                try:
                    await self.request(t.TEXT_DOCUMENT_COMPLETION, {
                        "textDocument": {"uri": doc.uri}, "position": {"line": -1, "character": 0}}, raw=True)
                except JsonRpcException as e:
                    right = e.code == -32602
            elif kind < 0.8:
                res = await self.request(t.TEXT_DOCUMENT_COMPLETION, t.CompletionParams(
                    text_document=t.TextDocumentIdentifier(uri="file:///soak/nowhere.py"), position=t.Position(0, 0)))
                right = isinstance(res, t.CompletionList) and not res.items
            else:
                assert self.server is not None
                self.server.client.text_document_did_change(t.DidChangeTextDocumentParams(
                    text_document=t.VersionedTextDocumentIdentifier(uri="file:///soak/never-opened.py", version=2),
                    content_changes=[t.TextDocumentContentChangeWholeDocument(text="x")]))
                got = await self.request(t.WORKSPACE_EXECUTE_COMMAND, t.ExecuteCommandParams(
                    command="lsp-llm.document", arguments=[doc.uri]))
                right = isinstance(got, dict) and got.get("sha256") == doc.sha256
        except (JsonRpcException, asyncio.TimeoutError):
            pass
        self.fig.bad_answered_right += right
        self.fig.bad_answered_wrong += not right

    async def check_mirrors(self) -> None:
        for doc in self.docs:
            try:
                got = await self.request(t.WORKSPACE_EXECUTE_COMMAND, t.ExecuteCommandParams(
                    command="lsp-llm.document", arguments=[doc.uri]))
            except (asyncio.TimeoutError, JsonRpcException):
                self.fig.mirror_mismatches += 1
                continue
            self.fig.mirror_checks += 1
            assert isinstance(got, dict)
            if (got["sha256"], got["version"], got["length"]) != (doc.sha256, doc.version, doc.length):
                self.fig.mirror_mismatches += 1

    async def warm_up(self) -> None:
        """The model loaded and the documents read: RSS is measured from here."""
        assert self.server is not None
        for doc in self.docs:
            for _ in range(120):
                await self.server.request(t.TEXT_DOCUMENT_COMPLETION, t.CompletionParams(
                    text_document=t.TextDocumentIdentifier(uri=doc.uri), position=doc.position(self.cursor(doc))),
                    ANSWER_S)
                st = await self.server.stats(doc.uri)
                if st.get("cached", 0) > 0 and st.get("fed_last", 1) == 0:
                    break
                await asyncio.sleep(0.5)
        self.t0 = time.monotonic()

    async def sample(self) -> None:
        assert self.server is not None
        minute = round(self.minutes(), 2)
        self.fig.rss_mb.append((minute, round(rss_mb(self.server.pid), 1)))
        self.fig.doc_chars.append((minute, sum(len(doc.text) for doc in self.docs)))
        try:
            st = await self.server.stats(timeout=ANSWER_S)
        except (asyncio.TimeoutError, JsonRpcException):
            return
        self.fig.held.append((minute, st.get("memo_steps", 0), st.get("saved_documents", 0), st.get("saved_mb", 0.0)))
        self.fig.heap.append((minute, st.get("heap", {})))
        if self.args.json:  # written as it goes: an interrupted run still leaves its curve
            Path(self.args.json).write_text(json.dumps(asdict(self.fig), indent=1))

    async def reopen(self, doc: EditorText) -> None:
        assert self.server is not None
        self.server.client.text_document_did_close(t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(doc.uri)))
        doc.version += 1
        self.open(doc)

    async def step(self, i: int) -> None:
        doc = self.docs[i % 7 == 0]  # mostly the big file, sometimes the Unicode one
        for _ in range(5):
            self.edit(doc)
        await self.complete(doc)
        if i % 2 == 0:
            await self.cancel(doc)
        if i % 10 == 0:
            await self.check_mirrors()
        if i % 25 == 0:
            await self.bad()
        if i % 200 == 199:
            await self.reopen(doc)

    async def run(self) -> Figures:
        await self.start()
        assert self.server is not None
        await self.warm_up()
        await self.sample()
        last, i = time.monotonic(), 0
        try:
            while not self.done():
                if not self.server.alive:
                    self.fig.crashes += 1
                    print(f"lsp-llm soak: the server died:\n{chr(10).join(self.server.stderr)}", file=sys.stderr)
                    await self.start()
                await self.step(i)
                i += 1
                if time.monotonic() - last >= self.args.sample_s:
                    last = time.monotonic()
                    await self.sample()
                    print(f"  {self.minutes():5.1f} min: {self.fig.edits} edits, {self.fig.completions} completions, "
                          f"{self.fig.cancels} cancels, RSS {self.fig.rss_mb[-1][1]:.0f} MB", file=sys.stderr)
            await self.check_mirrors()
            await self.sample()
        finally:
            await self.server.stop()
        self.fig.minutes = round(self.minutes(), 2)
        return self.fig


def plot(fig: Figures, png: Path) -> None:
    """RSS over the run, with the greedy memo's steps and the saved sequences' MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax: Any
    _, ax = plt.subplots(figsize=(8, 4))
    ax.plot([m for m, _ in fig.rss_mb], [mb for _, mb in fig.rss_mb], label="server RSS (MB)", color="C0")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    if fig.held:
        ax.plot([h[0] for h in fig.held], [h[3] for h in fig.held], label="saved sequences (MB)", color="C2")
        memo = ax.twinx()
        memo.plot([h[0] for h in fig.held], [h[1] for h in fig.held], label="greedy memo (steps)", color="C1")
        if fig.doc_chars:
            memo.plot([m for m, _ in fig.doc_chars], [n for _, n in fig.doc_chars],
                      label="documents (characters)", color="C3", linestyle="--")
        memo.set_ylabel("memo steps, document characters")
        memo.legend(loc="lower right")
    ax.legend(loc="upper left")
    minutes = max(fig.minutes, fig.rss_mb[-1][0] if fig.rss_mb else 0.0)
    ax.set_title(f"lsp-llm soak: {minutes:.0f} minutes, {fig.edits:,} edits, {fig.completions:,} completions")
    plt.tight_layout()
    plt.savefig(png, dpi=100)
    plt.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lsp-llm soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=30.0, help="stop after this long at the latest")
    p.add_argument("--edits", type=int, default=10_000)
    p.add_argument("--completions", type=int, default=2_000)
    p.add_argument("--cancels", type=int, default=1_000)
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--growth", type=int, default=4000,
                   help="characters a document may grow past its opened length; typing past it deletes "
                   "(a steady length, as a user's file over a day); -1: no bound, the document grows all run")
    p.add_argument("--sample-s", type=float, default=15.0, help="seconds between RSS samples")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON (as the run goes)")
    p.add_argument("--plot", metavar="PNG", help="also plot RSS and what the server holds over time")
    p.add_argument("--from-json", metavar="PATH", help="no run: summarize (and --plot) a run's JSON")
    args = p.parse_args(argv)
    if args.from_json:
        known = {f.name for f in fields(Figures)}  # (a run of another version may have more)
        fig = Figures(**{k: v for k, v in json.loads(Path(args.from_json).read_text()).items() if k in known})
    else:
        fig = asyncio.run(Soak(args).run())
    print(fig.summary())
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(asdict(fig), indent=1))
    if args.plot:
        plot(fig, Path(args.plot))
    failed = fig.crashes or fig.unanswered or fig.mirror_mismatches or fig.bad_ranges or fig.bad_answered_wrong
    return 1 if failed else 0
