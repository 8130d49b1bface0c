"""A human typing pace: seeded pauses before each keystroke of a trace.

The clock of a paced run is the trace's, not the engine's: keystroke i
happens at ``sum(delays[:i + 1])`` seconds after the start, whether or not
the engine has answered the one before.

Pauses (uniform, in seconds):

* an ordinary keystroke: ``key`` (120-250 ms, about 60 words a minute);
* the first keystroke of a line, after Enter or a jump to another line:
  ``line`` (400-900 ms: reading, thinking about the next line);
* the first keystroke after switching to another file: ``switch`` (1-2 s).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .traces import Keystroke

LINE_STARTS = ("enter", "open_above", "jump_line")


@dataclass(frozen=True)
class Pace:
    key: tuple[float, float] = (0.120, 0.250)
    line: tuple[float, float] = (0.400, 0.900)
    switch: tuple[float, float] = (1.0, 2.0)


TYPING = Pace()


def pause_kind(prev: Keystroke | None, k: Keystroke) -> str:
    """Which pause comes before keystroke k: key, line or switch."""
    if prev is None:
        return "key"
    if prev.doc != k.doc:
        return "switch"
    if prev.kind in LINE_STARTS:
        return "line"
    return "key"


def delays(keys: list[Keystroke], seed: int, pace: Pace = TYPING) -> list[float]:
    """Seconds to wait before each keystroke (the first one included)."""
    rng = random.Random(f"pace-{seed}")
    out = []
    prev = None
    for k in keys:
        lo, hi = getattr(pace, pause_kind(prev, k))
        out.append(rng.uniform(lo, hi))
        prev = k
    return out


def schedule(delays_s: list[float]) -> list[float]:
    """Times of the keystrokes (seconds from the start of the run)."""
    out, t = [], 0.0
    for d in delays_s:
        t += d
        out.append(t)
    return out
