"""The server gives freed memory back (``lsp/memory.py``): blocks of a
logits row's size come from pages of their own, so freeing them returns
the memory instead of leaving holes in the heap that RSS keeps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lsp_llm.lsp import memory

# After a 4 MB block is freed, glibc's threshold rises to 4 MB; then 1 MB
# rows (logits on a 262k vocabulary) come from the heap, with small blocks
# between them that pin it when the rows are freed.
CHURN = """
import json, sys
from lsp_llm.lsp.memory import give_back_freed_memory, heap_stats
if sys.argv[1] == "set":
    give_back_freed_memory()
big = bytearray(4 << 20)
del big
rows, small = [], []
for _ in range(40):
    rows.append(bytearray(1 << 20))
    small.append(bytearray(4096))
del rows
print(json.dumps(heap_stats()))
"""


def churn(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(memory._MALLINFO2 is None, reason="glibc 2.33+ only (mallinfo2)")
def test_freed_rows_are_given_back() -> None:
    kept = churn("default")
    assert kept["c_free_kept_mb"] >= 30, kept  # glibc's default: the freed rows stay in the heap
    given = churn("set")
    assert given["big_blocks_unmapped"]
    assert given["c_free_kept_mb"] < 2, given
