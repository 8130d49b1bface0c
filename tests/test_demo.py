"""`lsp-llm demo`: the README's first command, end to end on the default model."""

from __future__ import annotations

import subprocess
import sys


def test_demo_types_and_completes() -> None:
    r = subprocess.run([sys.executable, "-m", "lsp_llm", "demo", "--keystrokes", "4"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "cold completion" in out and "keystrokes: 4" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("'")]
    assert len(rows) == 4
    for row in rows:  # key, ms, decode, reused, fed, memo, items
        fields = row.split()
        assert int(fields[4]) <= 4  # a keystroke re-feeds a few tokens
        assert int(fields[3]) > 100  # and reuses the rest
