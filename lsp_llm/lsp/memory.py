"""The server's memory: how the C heap gives freed memory back, and where
the memory is, for the stats command and the soak (the C heap as glibc's
``mallinfo2`` sees it: in use, free but kept, and mapped blocks; Python's
own objects; with ``PYTHONTRACEMALLOC`` set, the Python lines that hold the
most)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import tracemalloc
from typing import Any

MB = 1 << 20
TOP_LINES = 8
# glibc's mmap threshold starts at 128 KB but rises to the largest block
# freed so far (up to 32 MB), after which llama.cpp's buffers of a context
# that is replaced or re-sized come from the heap, which keeps what they
# free: in a soak, free heap kept (``c_free_kept_mb``) went from 37 to 145 MB
# in 6 minutes, in steps at each context re-size. Fixed thresholds: blocks of 4 MB and more (a
# context's buffers) get pages of their own, unmapped when freed; smaller
# ones (a logits row is 1 MB on a 262k vocabulary, a top-k's temporaries 2
# MB) stay in the heap and are reused, and up to 32 MB free at its top is
# kept rather than given back and faulted in again on the next keystroke
# (a 128 KB threshold made a logits row's copy and top-k 4x slower).
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)

log = logging.getLogger(__name__)
_given_back = False  # whether ``give_back_freed_memory`` set the threshold


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc() -> Any:
    path = ctypes.util.find_library("c")
    return ctypes.CDLL(path) if path else None


def _mallinfo2(libc: Any) -> Any:
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:  # not glibc, or older than 2.33
        return None
    fn.restype = _MallInfo2
    return fn


_LIBC = _libc()
_MALLINFO2 = _mallinfo2(_LIBC)


def give_back_freed_memory() -> bool:
    """At start, before the model loads: big blocks get pages of their own
    (``MMAP_THRESHOLD``, ``TRIM_THRESHOLD``). Not where glibc is absent or
    the user set ``MALLOC_MMAP_THRESHOLD_`` (theirs stands). Returns whether
    it was set."""
    global _given_back
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or _MALLINFO2 is None:
        return False
    if not (_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        log.debug("mallopt refused the thresholds")
        return False
    _given_back = True
    return True


def heap_stats() -> dict[str, Any]:
    """MB by holder; fields absent where the platform cannot say."""
    out: dict[str, Any] = {"python_blocks": sys.getallocatedblocks(), "big_blocks_unmapped": _given_back}
    if _MALLINFO2 is not None:
        m = _MALLINFO2()
        out |= {"c_in_use_mb": round(m.uordblks / MB, 1), "c_free_kept_mb": round(m.fordblks / MB, 1),
                "c_mapped_mb": round(m.hblkhd / MB, 1), "c_mapped_blocks": m.hblks}
    if tracemalloc.is_tracing():
        out["python_traced_mb"] = round(tracemalloc.get_traced_memory()[0] / MB, 1)
        top = tracemalloc.take_snapshot().statistics("lineno")[:TOP_LINES]
        out["python_top"] = [[str(s.traceback), round(s.size / MB, 2), s.count] for s in top]
    return out
