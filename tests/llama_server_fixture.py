"""A real llama-server in this process (PyPI's xllamacpp embeds llama.cpp's HTTP server)."""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

START_S = 120.0  # model load on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _params(model: Path, slots: int, threads: int, api_keys: list[str] | None, port: int | None = None,
            slot_save: Path | None = None, prompt_cache: bool = True) -> Any:
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = str(model)
    p.n_ctx = 4096 * slots  # shared by the slots
    p.n_parallel = slots
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.hostnames = ["127.0.0.1"]  # loopback only
    p.port = port or free_port()
    p.no_extra_bufts = True  # weight repacking hangs or is slow on some CPUs
    # Gemma 3's sliding-window layers: without a full-size cache, a prompt shorter than the
    # window re-evaluates ~5 tokens from a checkpoint on every request (cache_n = n - 5)
    p.swa_full = True
    if api_keys:
        p.api_keys = api_keys
    if slot_save is not None:
        p.slot_save_path = f"{slot_save}/"  # the server appends the file name as is
    if not prompt_cache:
        p.cache_ram_mib = 0  # no host-memory prompt cache: an evicted slot's prompt is read again
    return p


def _wait_ready(url: str, api_key: str | None) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + START_S
    with httpx.Client(base_url=url, headers=headers, timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"llama-server at {url} not ready within {START_S:g} s")


@contextmanager
def llama_server(
    model: Path, slots: int = 2, threads: int = 2, api_keys: list[str] | None = None, port: int | None = None,
    slot_save: Path | None = None, prompt_cache: bool = True,
) -> Iterator[str]:
    """The base URL of a llama-server serving ``model`` until the block ends (``slot_save``: its
    ``--slot-save-path``; ``prompt_cache=False``: no host-memory prompt cache)."""
    import xllamacpp as xlc

    params = _params(model, slots, threads, api_keys, port, slot_save, prompt_cache)
    server = xlc.Server(params)
    url = f"http://127.0.0.1:{params.port}"
    try:
        _wait_ready(url, api_keys[0] if api_keys else None)
        yield url
    finally:
        del server  # serves until the object is deleted
        gc.collect()
