"""Typed settings: command-line flags, initializationOptions and
workspace/didChangeConfiguration all land here, validated.

Keys are camelCase on the wire (``nCtx``); snake_case is accepted too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, replace
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # GGUF path; None: the embedded default model
    n_ctx: int = 4096  # context size of each session
    threads: int = _default_threads()
    max_sessions: int = 4  # live llama.cpp contexts (LRU)
    items: int = 5  # word items per completion
    line_tokens: int = 12  # max tokens of the to-end-of-line item
    wait_for: str = "top"  # "top": a request waits for the likeliest word item only; "all": every item
    read_budget_ms: int = 1000  # a request waits this long for a long read, then answers empty (isIncomplete)
    saved_mb: int = 256  # host memory for the KV state of documents beyond maxSessions
    inline: bool = True  # ghost text (textDocument/inlineCompletion)
    inline_lines: int = 2  # max lines of ghost text (chosen by `lsp-llm bench --tune`)
    inline_tokens: int = 64  # max tokens of ghost text
    inline_budget_ms: int = 300  # answer with what is ready (at least a line) after this long
    inline_stop: tuple[str, ...] = ()  # ghost text ends before any of these strings
    fim: bool = True  # fill in the middle, if the model declares FIM tokens
    fim_lines: int = 16  # lines after the cursor that FIM shows the model
    exact_items: bool = False  # every token of every item exact, not only the first (~20% slower)
    log_level: str = "info"
    engine_url: str = ""  # a serving engine's base URL; empty: llama.cpp in-process (model, threads, nCtx)
    engine_api: str = "llama-server"  # the engine's API: "llama-server" (native) or "openai" (base URL with /v1)
    engine_slots: str = "own"  # llama-server: "own" (a slot pinned per document) or "shared" (a team's engine)

    # settings that need a new model or new contexts when they change
    RELOAD = ("model", "n_ctx", "threads", "exact_items", "engine_url", "engine_api", "engine_slots")

    @property
    def headroom(self) -> int:
        """Room the windows leave after the prompt for generation."""
        return max(self.line_tokens, self.inline_tokens) + 16

    def update(self, raw: Any) -> tuple[Settings, list[str]]:
        """Apply a JSON object; returns the new settings and the errors
        (invalid entries are skipped, the rest still applies)."""
        if raw is None:
            return self, []
        if not isinstance(raw, dict):
            return self, [f"settings must be an object, got {type(raw).__name__}"]
        if isinstance(raw.get("lsp-llm"), dict):  # {"lsp-llm": {...}} as sent by editors
            raw = raw["lsp-llm"]
        changes: dict[str, Any] = {}
        errors: list[str] = []
        names = {f.name for f in fields(self)}
        for key, value in raw.items():
            name = _snake(key)
            if name not in names:
                errors.append(f"unknown setting {key!r}")
                continue
            try:
                changes[name] = _VALIDATORS[name](value)
            except ValueError as e:
                errors.append(f"invalid {key!r}: {e}")
        return replace(self, **changes), errors


def _snake(key: str) -> str:
    out = "".join("_" + c.lower() if c.isupper() else c for c in key)
    return out.replace("-", "_")


def _int_in(lo: int, hi: int):
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"{v} is outside {lo}..{hi}")
        return v

    return check


def _model(v: Any) -> str | None:
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise ValueError(f"expected a path string, got {v!r}")
    return os.path.expanduser(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _strings(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"expected a list of non-empty strings, got {v!r}")
    return tuple(v)


def _one_of(*choices: str):
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {v!r}")
        return v

    return check


def _url(v: Any) -> str:
    if v is None or v == "":
        return ""
    if not isinstance(v, str) or not v.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
    return v.rstrip("/")


def _log_level(v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {v!r}")
    return v.lower()


_VALIDATORS = {
    "model": _model,
    "n_ctx": _int_in(64, 1 << 20),
    "threads": _int_in(1, 512),
    "max_sessions": _int_in(1, 64),
    "items": _int_in(1, 16),
    "line_tokens": _int_in(0, 256),
    "wait_for": _one_of("top", "all"),
    "read_budget_ms": _int_in(0, 600000),
    "saved_mb": _int_in(0, 1 << 16),
    "inline": _bool,
    "inline_lines": _int_in(1, 64),
    "inline_tokens": _int_in(1, 512),
    "inline_budget_ms": _int_in(0, 60000),
    "inline_stop": _strings,
    "fim": _bool,
    "fim_lines": _int_in(0, 1000),
    "exact_items": _bool,
    "log_level": _log_level,
    "engine_url": _url,
    "engine_api": _one_of("llama-server", "openai"),
    "engine_slots": _one_of("own", "shared"),
}


def apply_log_level(level: str) -> None:
    logging.getLogger("lsp_llm").setLevel(level.upper())
