"""Typed settings and the command line."""

from __future__ import annotations

import subprocess
import sys

from lsp_llm.config import Settings


def test_valid_settings_apply_and_invalid_ones_are_reported() -> None:
    s, errors = Settings().update({"lsp-llm": {"nCtx": 2048, "maxSessions": 2, "items": 0, "logLevel": "LOUD",
                                               "model": 3, "threads": True, "extra": 1}})
    assert (s.n_ctx, s.max_sessions) == (2048, 2)
    assert s.items == Settings.items and s.log_level == "info" and s.model is None
    assert len(errors) == 5
    assert any("items" in e and "outside" in e for e in errors)
    assert any("extra" in e for e in errors)


def test_settings_must_be_an_object() -> None:
    s, errors = Settings().update(["nope"])
    assert s == Settings() and errors


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lsp_llm", *args], capture_output=True, text=True, timeout=60)


def test_missing_model_is_one_line_and_nonzero(tmp_path) -> None:
    r = run_cli("--model", str(tmp_path / "nope.gguf"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "nope.gguf" in r.stderr and "Traceback" not in r.stderr


def test_not_a_gguf_is_one_line_and_nonzero(tmp_path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    r = run_cli("--model", str(bad))
    assert r.returncode == 2 and "not a GGUF" in r.stderr and "Traceback" not in r.stderr


def test_unreadable_model_is_one_line_and_nonzero(tmp_path) -> None:
    r = run_cli("--model", str(tmp_path))  # a directory
    assert r.returncode == 2 and "not a file" in r.stderr


def test_bad_flag_values_exit_nonzero() -> None:
    r = run_cli("--n-ctx", "0")
    assert r.returncode == 2 and "n_ctx" in r.stderr
