"""Emacs (Debian emacs-nox; eglot built in on 29+, elpa-eglot on 28) in batch mode with OUR
editors/emacs/lsp-llm.el: eglot connects to the real server, a user-like edit is sent, and
completion-at-point (eglot's capf) offers our items; inserting one edits the buffer correctly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from editor_helpers import EDITORS, EXPECTED, GHOST_AFTER, REPO, SAMPLE, TYPED, first_word, missing, server_cmd

HERE = Path(__file__).parent


def emacs_binary() -> str:
    exe = shutil.which("emacs")
    if not exe:
        missing("emacs not found (apt-get install emacs-nox)")
    # eglot: built into Emacs 29+; Debian's elpa-eglot on 28 (activated by site-start, so no -Q).
    probe = subprocess.run(
        [exe, "--batch", "--eval", '(princ (or (locate-library "eglot") ""))'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if not probe.stdout.strip():
        missing("eglot not available in Emacs (apt-get install elpa-eglot on Emacs 28)")
    return exe


def test_lsp_llm_el_byte_compiles_and_loads_without_lsp_mode(tmp_path: Path):
    exe = emacs_binary()
    src = tmp_path / "lsp-llm.el"
    shutil.copy(EDITORS / "emacs" / "lsp-llm.el", src)
    out = subprocess.run(
        [
            exe,
            "--batch",
            "-L",
            str(tmp_path),
            "--eval",
            "(setq byte-compile-error-on-warn t)",
            "-f",
            "batch-byte-compile",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # Loads without eglot or lsp-mode loaded; registers itself once eglot loads.
    out = subprocess.run(
        [
            exe,
            "--batch",
            "-L",
            str(tmp_path),
            "--eval",
            "(progn (require 'lsp-llm) (princ (featurep 'lsp-mode)) (princ \" \")"
            " (require 'eglot) (princ (and (rassq #'lsp-llm-eglot-contact eglot-server-programs) t)))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "nil t"


def test_emacs_eglot_completion_at_point(sample_project: Path, tmp_path: Path):
    exe = emacs_binary()
    out_file = tmp_path / "result.json"
    env = dict(
        os.environ,
        LSP_LLM_REPO=str(REPO),
        LSP_LLM_CMD=json.dumps(server_cmd()),
        LSP_LLM_FILE=str(sample_project / "hello.py"),
        LSP_LLM_TYPED=TYPED,
        LSP_LLM_EXPECTED=EXPECTED,
        LSP_LLM_OUT=str(out_file),
        HOME=str(tmp_path),
    )  # a clean user: no ~/.emacs.d
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))  # keep the server's model cache
    t0 = time.monotonic()
    proc = subprocess.run(
        [exe, "--batch", "-l", str(HERE / "emacs_test.el")],
        cwd=sample_project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - t0
    assert out_file.exists(), f"no result (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    res = json.loads(out_file.read_text())
    if res.get("ok") is not True:
        pytest.fail(
            f"emacs test failed: {res.get('error')}\nstderr:\n{res.get('stderr', '')[-3000:]}\n"
            f"events:\n{res.get('events_tail', '')}\nemacs:\n{proc.stderr[-3000:]}"
        )
    print(
        f"Emacs {res['emacs']}, eglot {res['eglot']}: connected in {res['connect_s']:.1f}s, "
        f"capf in {res['capf_s']:.2f}s, total {elapsed:.1f}s"
    )
    print(f"candidates: {res['candidates']} details: {res['details']} chosen: {res['chosen']!r}")

    assert res["registered"] is True  # lsp-llm.el put itself into eglot-server-programs
    assert res["major_mode"] == "python-mode"
    assert res["managed"] is True
    assert res["server_name"] == "lsp-llm"
    assert res["init_options"] == {"items": 5, "logLevel": "info"}

    # The user-like edit reached the buffer, and completion-at-point offered our items for it.
    assert res["line_before"].strip() == TYPED
    assert res["input"] == TYPED
    cands = res["candidates"]
    assert cands and all(c.startswith(TYPED) for c in cands), cands
    assert all(d and "%" in d for d in res["details"]), res["details"]  # our probability detail
    # Inserting one: eglot's exit function applies our textEdit over the typed prefix.
    chosen = res["chosen"]
    assert chosen and len(chosen) > len(TYPED)
    assert res["line_after"] == res["line_before"][: -len(TYPED)] + chosen
    lines = res["buffer"].splitlines()
    assert lines[6] == res["line_after"]
    assert lines[:6] == SAMPLE.splitlines()[:6] and lines[7:] == SAMPLE.splitlines()[6:]
    stats = res["stats"]
    assert isinstance(stats, dict) and stats.get("last_ms") is not None, stats


def run_emacs_script(script: str, sample_project: Path, tmp_path: Path) -> dict:
    """emacs --batch -l SCRIPT on the sample file; returns its JSON result (fails the test on error)."""
    exe = emacs_binary()
    out_file = tmp_path / "result.json"
    env = dict(
        os.environ,
        LSP_LLM_REPO=str(REPO),
        LSP_LLM_CMD=json.dumps(server_cmd()),
        LSP_LLM_FILE=str(sample_project / "hello.py"),
        LSP_LLM_TYPED=TYPED,
        LSP_LLM_GHOST_AFTER=str(GHOST_AFTER),
        LSP_LLM_OUT=str(out_file),
        HOME=str(tmp_path),
    )
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    t0 = time.monotonic()
    proc = subprocess.run(
        [exe, "--batch", "-l", str(HERE / script)], cwd=sample_project, env=env, capture_output=True, text=True,
        timeout=300,
    )
    print(proc.stderr[-2000:])
    print(f"emacs: {time.monotonic() - t0:.1f}s")
    assert out_file.exists(), f"no result (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    res = json.loads(out_file.read_text())
    if res.get("ok") is not True:
        server = res.get("stderr", "")[-3000:]
        pytest.fail(
            f"emacs failed: {res.get('error')}\nserver:\n{server}\nemacs:\n{proc.stderr[-3000:]}\n"
            f"events:\n{res.get('events_tail', '')}"
        )
    return res


def inserted(g: dict, text: str) -> str:
    """The buffer g was shown in with `text` at point in place of the item's range (to g["end"])."""
    buf, point, end = g["buffer"], g["point"] - 1, g["end"] - 1
    return buf[:point] + text + buf[end:]


def check_shown(g: dict) -> None:
    """Ghost text is shown at point as one overlay in our face, and its keys are active."""
    assert g["text"] and g["text"].strip(), g
    assert g["end"] >= g["point"]
    tail = g["buffer"][g["point"] - 1 : g["end"] - 1]  # the rest of the line the item replaces
    shown = g["text"][: len(g["text"]) - len(tail)] if tail and g["text"].endswith(tail) else g["text"]
    assert g["overlays"] == [[g["point"], shown, "lsp-llm-ghost"]], g
    assert g["keys"] is True


def test_emacs_ghost_text(sample_project: Path, tmp_path: Path):
    res = run_emacs_script("emacs_ghost_test.el", sample_project, tmp_path)
    assert res["inline_mode"] is True  # on by itself in a buffer eglot manages with lsp-llm

    # 1. Ghost text appears; it is the server's item; the popup (capf) items are there beside it.
    g = res["accept_before"]
    check_shown(g)
    items = res["direct"]["items"]
    assert items and items[0]["insertText"].endswith(g["text"]), (items, g["text"])
    assert res["capf"] and all(c.startswith(TYPED) for c in res["capf"]), res["capf"]
    assert res["ghost_after_capf"] == g["text"]
    # TAB inserted exactly the item's text at point.
    after = res["accept_after"]
    assert after["buffer"] == inserted(g, g["text"])
    assert after["point"] == g["point"] + len(g["text"])

    # 2. C-g hid it and left the buffer as it was; it did not come back by itself.
    g, after = res["dismiss_before"], res["dismiss_after"]
    check_shown(g)
    assert after["overlays"] == [] and after["text"] is None and after["keys"] is None, after
    assert after["buffer"] == g["buffer"] and after["point"] == g["point"]

    # 3. M-f inserted the first word; the rest stayed shown, and TAB inserted it.
    g, after = res["word_before"], res["word_after"]
    check_shown(g)
    word = first_word(g["text"])
    assert after["buffer"] == inserted(dict(g, end=g["point"]), word)
    rest = g["text"][len(word) :]
    assert after["text"] == (rest or None), after
    if rest:
        check_shown(after)
        assert res["word_rest"]["buffer"] == inserted(g, g["text"])

    # 4. Switched off: no lsp-llm items in completion-at-point, no ghost text.
    assert not res["capf_off"], res["capf_off"]
    off = res["inline_off"]
    assert off["overlays"] == [] and off["text"] is None
    assert off["buffer"].splitlines()[off["buffer"][: off["point"] - 1].count("\n")].strip() == TYPED
