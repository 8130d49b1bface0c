"""Fixtures for the editor integration tests; helpers live in editor_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from editor_helpers import ARTIFACTS, SAMPLE


@pytest.fixture
def sample_project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / ".git").mkdir()  # a root marker, as in a real checkout
    (proj / "hello.py").write_text(SAMPLE)
    return proj


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
