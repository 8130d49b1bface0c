"""Helpers for the editor integration tests (real editors, real server, default model).

A test whose editor is missing skips with the reason, except under CI=true, where a missing
required editor fails the test instead: CI must not pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import sys
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
