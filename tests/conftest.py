"""Shared fixtures: a tiny generated model (fast, real engine and real
tokenizer) and the embedded default model (end to end)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_model  # noqa: E402

from lsp_llm.engine.calibrate import calibrate  # noqa: E402
from lsp_llm.engine.default_model import cache_dir, default_model_path  # noqa: E402
from lsp_llm.engine.model import Model  # noqa: E402
from lsp_llm.engine.scheduler import Engine  # noqa: E402

THREADS = 2


@pytest.fixture(scope="session")
def default_model_file() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_path(default_model_file: Path) -> Path:
    """Built once per version of tiny_model.py and cached (about 10 s)."""
    digest = hashlib.sha256(Path(tiny_model.__file__).read_bytes()).hexdigest()[:12]
    out = cache_dir() / "test" / f"tiny-{digest}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tiny_model.build(tmp, default_model_file)
        tmp.replace(out)
    return out


@pytest.fixture(scope="session")
def tiny_fim_model_path(default_model_file: Path) -> Path:
    """The tiny model with FIM tokens declared in its vocabulary (cached)."""
    digest = hashlib.sha256(Path(tiny_model.__file__).read_bytes()).hexdigest()[:12]
    out = cache_dir() / "test" / f"tiny-fim-{digest}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tiny_model.build(tmp, default_model_file, fim=True)
        tmp.replace(out)
    return out


@pytest.fixture(scope="session")
def tiny_fim(tiny_fim_model_path: Path) -> Model:
    model = Model(tiny_fim_model_path, threads=THREADS)
    calibrate(model, None)
    return model


@pytest.fixture(scope="session")
def tiny(tiny_model_path: Path) -> Model:
    model = Model(tiny_model_path, threads=THREADS)
    calibrate(model, None)
    return model


@pytest.fixture(scope="session")
def gemma(default_model_file: Path) -> Model:
    model = Model(default_model_file, threads=THREADS)
    calibrate(model, None)
    return model


@pytest.fixture(scope="session")
def tiny_exact(tiny_model_path: Path) -> Model:
    """The tiny model with ``exactItems`` (flash attention in short calls)."""
    model = Model(tiny_model_path, threads=THREADS, exact_items=True)
    calibrate(model, None)
    return model


@pytest.fixture(scope="session")
def gemma_exact(default_model_file: Path) -> Model:
    model = Model(default_model_file, threads=THREADS, exact_items=True)
    calibrate(model, None)
    return model


@pytest.fixture
def engine(tiny: Model):
    """An engine thread on the tiny model: 2 live sessions of 1,024 tokens."""
    e = Engine(max_sessions=2, n_ctx=1024, n_branches=8, headroom=40)
    e.submit(lambda: e.set_model(tiny)).result()
    yield e
    e.stop()
    assert not e.alive  # no orphan thread
