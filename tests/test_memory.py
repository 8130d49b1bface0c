"""The server gives freed memory back (``lsp/memory.py``): blocks of a
context's buffers' size come from pages of their own, so freeing them
returns the memory instead of leaving holes in the heap that RSS keeps;
blocks of a logits row's size stay in the heap, reused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lsp_llm.lsp import memory

# After a 16 MB block is freed, glibc's threshold rises to 16 MB; then 8 MB
# buffers (a context's, re-sized) come from the heap, with small blocks
# between them that pin it when the buffers are freed. 1 MB rows (logits on
# a 262k vocabulary) come and go many times a keystroke.
CHURN = """
import json, sys
from lsp_llm.lsp.memory import give_back_freed_memory, heap_stats
if sys.argv[1] == "set":
    give_back_freed_memory()
big = bytearray(16 << 20)
del big
buffers, small = [], []
for _ in range(10):
    buffers.append(bytearray(8 << 20))
    small.append(bytearray(4096))
del buffers
mapped = heap_stats()["c_mapped_blocks"]
row = bytearray(1 << 20)
row_mapped = heap_stats()["c_mapped_blocks"] - mapped
del row
print(json.dumps({**heap_stats(), "row_mapped": row_mapped}))
"""


def churn(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(memory._MALLINFO2 is None, reason="glibc 2.33+ only (mallinfo2)")
def test_freed_buffers_are_given_back_and_rows_stay_in_the_heap() -> None:
    kept = churn("default")
    assert kept["c_free_kept_mb"] >= 60, kept  # glibc's default: the freed buffers stay in the heap
    given = churn("set")
    assert given["big_blocks_unmapped"]
    assert given["c_free_kept_mb"] < 8, given  # (a freed row's 1 MB, the heap's top)
    assert given["row_mapped"] == 0, given  # a row comes from the heap: no page faults a keystroke
