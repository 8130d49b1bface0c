"""Lifecycle holes (issue 17): a context that cannot be replaced (out of
memory) leaves a session that is safe to use and to close; a freed model
refuses its whole vocabulary, even to a call that races the free. Real llama.cpp throughout;
what could crash runs in a child process, so a regression fails a test
rather than ending the test run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from lsp_llm.engine.model import Model

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
