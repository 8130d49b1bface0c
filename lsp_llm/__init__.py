"""lsp-llm: code completions from a local LLM, one KV-cached session per open document."""

__version__ = "0.1.0"
