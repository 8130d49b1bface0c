"""RSS of the lsp-llm server with 1, 4 and 8 documents open.

Each row is a fresh server: it opens N documents of about ``tokens`` tokens
(the first lines of real files) and reads each one whole with a completion
at its end; then the server's resident set (VmRSS) and its peak (VmHWM) are
read from /proc.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from ..client import StdioServer
from .engines import Settings, peak_rss_bytes, rss_bytes
from .traces import TokenCounter, _line_after_tokens, read_source

MB = 2**20


@dataclass
class MemoryRow:
    documents: int
    tokens_each: int  # tokens of each document (the last one read)
    rss_mb: float  # after the last completion
    peak_rss_mb: float
    max_sessions: int


def head_text(path: Path, tokens: int, count: TokenCounter) -> str:
    """The first lines of a file, about ``tokens`` tokens."""
    lines = read_source(path)
    return "\n".join(lines[: _line_after_tokens(lines, tokens, count)]) + "\n"


async def measure(settings: Settings, texts: list[str]) -> tuple[int, int]:
    """Open texts in a fresh server, complete at the end of each; (RSS, peak) in bytes."""
    editor = await StdioServer.launch(settings.command(quiet=True), {"lineTokens": settings.gen_tokens},
                                      settings.timeout_s)
    try:
        for i, text in enumerate(texts):
            uri = f"file:///bench/memory/doc{i}.py"
            editor.open(uri, text)
            end = (text.count("\n"), len(text) - text.rfind("\n") - 1)
            await asyncio.wait_for(editor.complete(uri, text, end).future, settings.timeout_s)
        return rss_bytes(editor.pid), peak_rss_bytes(editor.pid)
    finally:
        await editor.stop()


def memory_rows(settings: Settings, paths: list[Path], tokens: int, count: TokenCounter,
                documents: tuple[int, ...] = (1, 4, 8)) -> list[MemoryRow]:
    texts = [head_text(p, tokens, count) for p in paths]
    rows = []
    for n in documents:
        chosen = [_nth(texts, i) for i in range(n)]
        rss, peak = asyncio.run(measure(settings, chosen))
        rows.append(MemoryRow(n, count(chosen[-1]), rss / MB, peak / MB, settings.max_sessions))
    return rows


def _nth(texts: list[str], i: int) -> str:
    """The i-th document: the texts in turn, made distinct when they repeat."""
    text = texts[i % len(texts)]
    return text if i < len(texts) else text + f"# copy {i}\n"


def markdown(rows: list[MemoryRow]) -> list[str]:
    if not rows:
        return []
    r0 = rows[0]
    lines = [f"**Memory** (lsp-llm server, maxSessions {r0.max_sessions}; each document ~{r0.tokens_each:,} "
             "tokens, read whole by a completion at its end; a fresh server per row)", "",
             "| documents open | RSS MB | peak RSS MB |", "|---:|---:|---:|"]
    lines += [f"| {r.documents} | {r.rss_mb:,.0f} | {r.peak_rss_mb:,.0f} |" for r in rows]
    return lines + [""]
