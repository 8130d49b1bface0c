"""Lifecycle holes (issue 17): `exit` under load ends the process within the
promised time; a context that cannot be replaced (out of memory) leaves a
session that is safe to use and to close; a freed model refuses its whole
vocabulary, even to a call that races the free. Real llama.cpp throughout;
what could crash runs in a child process, so a regression fails a test
rather than ending the test run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from lsprotocol import types as t

from lsp_llm.engine.model import Model
from lsp_llm.engine.session import Cancelled, Session
from lsp_llm.lsp.server import SHUTDOWN_WAIT_S
from lsp_llm.tools.client import StdioServer, server_command

TEXT = b"def crab(x):\n    return x + 1\n\n" * 40


def child(code: str, *args: object, timeout: float = 300) -> tuple[int, list[str]]:
    """Run code in a child Python (argv: args); its exit code and output lines."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout.split()


# -- a freed model ------------------------------------------------------------------------------
FREED = """
    import sys
    from lsp_llm.engine.model import Model, ModelError

    m = Model(sys.argv[1], threads=2)
    m.close()
    m.close()
    for name, use in [("is_eog", lambda: m.is_eog(1)), ("is_control", lambda: m.is_control(1)),
                      ("tokenize", lambda: m.tokenize(b"def crab", True)), ("piece", lambda: m.piece(1000)),
                      ("context", lambda: m.new_context(512, 2))]:
        try:
            use()
            print(name + ":answered", flush=True)
        except ModelError:
            print(name + ":refused", flush=True)
"""


def test_a_freed_model_refuses_its_whole_vocabulary(tiny_model_path: Path) -> None:
    """Every use of a freed model's memory is refused (ModelError). is_eog
    and is_control read the freed vocabulary; a context from a freed model
    crashed."""
    rc, out = child(FREED, tiny_model_path)
    assert (rc, out) == (0, [f"{name}:refused" for name in ("is_eog", "is_control", "tokenize", "piece", "context")])


RACE = """
    import sys, threading, time
    from lsp_llm.engine.model import Model, ModelError

    m = Model(sys.argv[1], threads=2)
    data = b"def crab(x):\\n    return x + 1\\n\\n" * 30000  # about a second to tokenize
    expected = len(m.tokenize(data, True))
    got = []

    def tokenize():
        try:
            got.append(len(m.tokenize(data, True)) == expected)
        except ModelError:
            got.append("refused")

    th = threading.Thread(target=tokenize)
    th.start()
    time.sleep(0.2)  # inside llama_tokenize
    m.close()  # another thread frees the model
    th.join()
    print("whole" if got == [True] else got, flush=True)
    try:
        m.is_eog(1)
    except ModelError:
        print("refused", flush=True)
"""


def test_a_free_waits_for_a_tokenization_in_flight(tiny_model_path: Path) -> None:
    """A model freed on one thread while another tokenizes with it (the
    event loop and the engine thread): the tokenization ends whole, then the
    vocabulary is refused. A check-then-use guard let the free happen under
    the call."""
    rc, out = child(RACE, tiny_model_path)
    assert (rc, out) == (0, ["whole", "refused"])


def test_the_prefix_index_is_unchanged(tiny: Model) -> None:
    """The index, now built under one hold of the guard, is the one built
    token by token."""
    fresh = Model(tiny.path, threads=2)
    try:
        index = fresh.tokens_starting_with(b"")
        ids = [t for t in range(tiny.n_vocab) if tiny.piece(t) and not tiny.is_control(t)]
        ids.sort(key=tiny.piece)
        assert np.array_equal(index, np.array(ids))
        assert np.array_equal(fresh.tokens_starting_with(b"re"), tiny.tokens_starting_with(b"re"))
    finally:
        fresh.close()


# -- a context that cannot be replaced ----------------------------------------------------------
RESIZE = """
    import resource, sys
    import numpy as np
    from lsp_llm.engine.model import Model, ModelError
    from lsp_llm.engine.session import Session

    def vm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1])

    model = Model(sys.argv[1], threads=2)
    s = Session(model, n_ctx=1 << 20, n_branches=2)
    tokens = model.tokenize(b"def crab(x):\\n    return x + 1\\n\\n" * 20, True)
    s.sync(tokens[:100])
    before = s.logits.copy()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, ((vm_kb() + (256 << 10)) << 10, hard))  # 256 MB more, at most
    try:
        s.make_room(1 << 20)  # a context of a million cells: llama.cpp runs out of memory
        print("resized")
    except ModelError:
        print("refused")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    print("empty" if not s.tokens and s.logits is None else "holds", flush=True)
    s.sync(tokens[:120])  # used again: a context again, the document read again
    s.sync(tokens[:100])
    print("exact" if np.array_equal(s.logits, before) else "differs", flush=True)
    s.close()
    s.close()
    print("closed", flush=True)
"""


def test_a_context_that_cannot_be_replaced_leaves_a_safe_session(tiny_model_path: Path) -> None:
    """Out of memory while a session grows (RLIMIT_AS makes it real): the
    error is raised, the session is empty and points at no freed context,
    its next use opens one and reads again (exactly), and close (twice) is
    safe. The old ``_resize`` freed the context first and kept the pointer:
    the next use crashed (SIGSEGV)."""
    rc, out = child(RESIZE, tiny_model_path)
    assert (rc, out) == (0, ["refused", "empty", "exact", "closed"])


# -- exit under load --------------------------------------------------------------------------
CAPS = t.ClientCapabilities(window=t.WindowClientCapabilities(work_done_progress=True))
EXIT_BOUND_S = SHUTDOWN_WAIT_S + 0.6  # the promise (0.9 s), and slack for a loaded machine
# a process held to one CPU, then running `python -m lsp_llm` (sys.argv: the CPU, then its arguments)
ON_ONE_CPU = ("import os, runpy, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); "
              "sys.argv = [sys.argv[0], *sys.argv[2:]]; runpy.run_module('lsp_llm', run_name='__main__')")
BUSY = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def opened(server: StdioServer, uri: str, text: str) -> None:
    server.client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))


async def complete(server: StdioServer, uri: str, line: int, col: int) -> t.CompletionList:
    return await server.request(t.TEXT_DOCUMENT_COMPLETION, t.CompletionParams(
        text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(line, col)), 60)


class Ended:
    """When a child process ended (it became a zombie), seen by a thread that
    looks every millisecond: the loaded machine delays the event loop's
    child watcher by up to 0.4 s more."""

    def __init__(self, pid: int) -> None:
        self._path = Path(f"/proc/{pid}/stat")
        self._at: float | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            try:
                state = self._path.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "gone"
            if state in ("Z", "X", "gone"):
                self._at = time.monotonic()
                return
            time.sleep(0.001)

    def at(self) -> float:
        self._thread.join(30)
        assert self._at is not None
        return self._at


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux (CPU affinity, /proc)")
async def test_exit_under_load_ends_the_process_within_a_second(default_model_file: Path) -> None:
    """The default model's reads on one CPU that four busy processes share
    with the server (a decode call then takes seconds, as on a loaded
    machine): `exit` ends the process within SHUTDOWN_WAIT_S and some slack.
    It took 3.0-4.1 s here (0.2-0.9 s now): the exit handler waited 0.9 s for
    the engine thread, inside a request's decode call (not interruptible),
    then `cli` waited 1.0 s more, then the interpreter's teardown."""
    cpu = max(os.sched_getaffinity(0))
    cmd = server_command(str(default_model_file))
    assert cmd[:3] == [sys.executable, "-m", "lsp_llm"]
    server = StdioServer([sys.executable, "-c", ON_ONE_CPU, str(cpu), *cmd[3:]])
    busy: list[subprocess.Popen] = []
    try:
        await server.start(CAPS)
        uri = "file:///tmp/quit.py"
        opened(server, uri, "def crab(x):\n    return x + 1\n")
        for _ in range(100):  # the model serves
            if (await complete(server, uri, 1, 4)).items:
                break
            await asyncio.sleep(0.2)
        busy = [subprocess.Popen([sys.executable, "-c", BUSY, str(cpu)]) for _ in range(4)]
        text = TEXT.decode() * 6
        for i in range(4):  # long reads, and requests waiting on them
            opened(server, f"file:///tmp/quit{i}.py", text)
        pending = [asyncio.ensure_future(complete(server, f"file:///tmp/quit{i}.py", 100 + i, 0)) for i in range(4)]
        await asyncio.sleep(0.3)  # a request's read under way (within its read budget: a job's decode call)
        await server.request(t.SHUTDOWN, None, timeout=10)
        proc = server.client._server
        ended = Ended(proc.pid)
        t0 = time.monotonic()
        server.client.exit(None)
        rc = await asyncio.wait_for(proc.wait(), 30)
        took = ended.at() - t0
        await asyncio.gather(*pending, return_exceptions=True)
        print(f"exit -> process ended: {took * 1000:.0f} ms")
        assert rc == 0
        assert took < EXIT_BOUND_S, f"the process ended {took:.2f} s after exit"
    finally:
        for p in busy:
            p.kill()
            p.wait()
        await server.stop()


def test_abort_stops_a_decode_call_midway(default_model_file: Path) -> None:
    """``Model.abort`` (shutdown and exit): the call in flight stops within a
    graph node, it does not run to its end (its rows are not held), and the
    session never decodes again. A model of its own: abort is for good."""
    model = Model(default_model_file, threads=2)
    s = Session(model, n_ctx=2048, n_branches=2)
    th: threading.Thread | None = None
    try:
        target = model.tokenize(TEXT * 2, True)[:1000]
        s.sync(target[:129], rows=128)  # BOS, then one call of 128 rows (the weights paged in)
        error: list[BaseException] = []

        def feed() -> None:  # 7 calls of 128 rows, 100-500 ms each here (more under load)
            try:
                s.sync(target, rows=128)
            except BaseException as e:  # noqa: BLE001 - checked below
                error.append(e)

        th = threading.Thread(target=feed)
        th.start()
        while len(s.tokens) < 129 + 128:  # the feed's second call has begun
            time.sleep(0.001)
        held = len(s.tokens)
        model.abort()
        th.join(60)
        assert not th.is_alive() and error and isinstance(error[0], Cancelled)
        assert len(s.tokens) == held == 129 + 128  # the call in flight did not finish
        with pytest.raises(Cancelled):  # for good
            s.sync(target)
        assert len(s.tokens) == held
    finally:
        if th is not None:
            th.join()  # (the session is freed only once no call uses it)
        s.close()
        model.close()
