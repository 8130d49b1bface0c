"""The one rule for text inserted before what the line already holds.

Editors close pairs as you type: in ``print(|)`` the ``)`` is already there.
A completion the model wrote for the text before the cursor repeats it
(``"bye")``), so inserted as is it would leave ``print("bye"))``. Popup items
and ghost text both ask ``covered``: how much of the text after the cursor
an insertion replaces.
"""

from __future__ import annotations

OPENERS, CLOSERS, QUOTES = b"([{", b")]}", b"'\"`"
_PAIR = {ord(c): ord(o) for o, c in zip("([{", ")]}")}


def covered(text: bytes, rest: bytes) -> int:
    """How many bytes of ``rest`` (the cursor's line after the cursor) the
    insertion of ``text`` replaces:

    - the leading closing brackets and quotes of ``rest`` that ``text``
      closes itself, in order (``"bye")`` before ``)``; ``x"`` before ``")``
      takes the quote). A closer that closes what ``text`` opened is its own
      (``f(x)`` before ``)`` takes nothing);
    - all of it (less trailing blanks) when it is more than closers and the
      first line of ``text`` repeats it (``a, b)`` before ``b)``);
    - else nothing: the insertion goes before it."""
    line = text.split(b"\n", 1)[0]
    stripped = rest.strip()
    if stripped.strip(CLOSERS + QUOTES) and stripped in line:
        return len(rest.rstrip())
    return _closers_taken(line, rest)


def _closers_taken(line: bytes, rest: bytes) -> int:
    opened: list[int] = []  # brackets and quotes that line opened itself
    taken = 0
    for c in line:
        if opened and opened[-1] in QUOTES and c != opened[-1]:
            continue  # inside a string that line opened
        if c in OPENERS:
            opened.append(c)
        elif c in CLOSERS or c in QUOTES:
            mine = _PAIR.get(c, c)
            if opened and opened[-1] == mine:
                opened.pop()
            elif taken < len(rest) and rest[taken] == c:
                taken += 1
            elif c in QUOTES:
                opened.append(c)
    return taken
