"""A real llama-server on loopback for the bench's remote and team sections:
PyPI's ``xllamacpp`` (the test extra) embeds llama.cpp's HTTP server; it runs
in a process of its own so that its CPU is not the bench's.

    with hosted(model, slots=2, threads=2, n_ctx=4096, log=path) as host:
        host.url        # http://127.0.0.1:PORT
        metrics(host.url)  # llama-server's /metrics counters

    python -m lsp_llm.tools.bench.llama_host MODEL SLOTS THREADS N_CTX PORT  # serves until stdin closes

Settings: ``cache_prompt`` on, the full sliding-window cache (Gemma 3: without it a
prompt shorter than the window re-evaluates ~5 tokens per request), no weight
repacking, ``/metrics`` and ``/slots`` on, ``n_ctx`` tokens per slot.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

START_S = 180.0  # model load on a busy machine
PROMPT_TOTAL = "llamacpp:prompt_tokens_total"  # prompt tokens evaluated (not taken from the cache)
PREDICTED_TOTAL = "llamacpp:tokens_predicted_total"
PROMPT_SECONDS = "llamacpp:prompt_seconds_total"
PREDICTED_SECONDS = "llamacpp:tokens_predicted_seconds_total"


@dataclass(frozen=True)
class Host:
    url: str
    pid: int
    slots: int
    n_ctx: int  # per slot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def params(model: str, slots: int, threads: int, n_ctx: int, port: int) -> Any:
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = model
    p.n_ctx = n_ctx * slots  # shared by the slots
    p.n_parallel = slots
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.hostnames = ["127.0.0.1"]  # loopback only
    p.port = port
    p.no_extra_bufts = True  # weight repacking hangs or is slow on some CPUs
    p.swa_full = True
    p.cache_prompt = True
    p.endpoint_metrics = True
    p.endpoint_slots = True
    return p


def available() -> str | None:
    """Why the hosted llama-server cannot run here, or None when it can."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return "xllamacpp is not installed (pip install 'lsp-llm[test]' or pip install xllamacpp)"
    return None


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = START_S) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/health").status_code == 200:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"llama-server at {url} not ready within {timeout:g} s")


@contextlib.contextmanager
def hosted(model: str, slots: int, threads: int, n_ctx: int, log: Path) -> Iterator[Host]:
    """A llama-server in a child process, serving until the block ends."""
    port = free_port()
    cmd = [sys.executable, "-m", "lsp_llm.tools.bench.llama_host", model, str(slots), str(threads), str(n_ctx),
           str(port)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        yield Host(url, proc.pid, slots, n_ctx)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the child's cue to exit
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def metrics(url: str, client: httpx.Client | None = None) -> dict[str, float]:
    """llama-server's ``/metrics`` (Prometheus text) as name -> value."""
    with contextlib.nullcontext(client) if client is not None else httpx.Client(timeout=30.0) as c:
        text = c.get(f"{url}/metrics").text
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                out[parts[0]] = float(parts[1])
    return out


def main(argv: list[str]) -> int:
    import xllamacpp as xlc

    model, slots, threads, n_ctx, port = argv[0], *map(int, argv[1:5])
    server = xlc.Server(params(model, slots, threads, n_ctx, port))
    sys.stdin.read()  # until the parent closes stdin (or dies)
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
