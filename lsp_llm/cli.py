"""Command line: ``lsp-llm`` serves LSP; ``lsp-llm demo`` and ``lsp-llm bench``
drive a real server over stdio as an editor would."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .config import LOG_LEVELS, Settings


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lsp-llm",
        description="Language server with code completions from a local LLM (llama.cpp). "
        "Subcommands: 'lsp-llm demo' types into a file and shows completions; "
        "'lsp-llm bench' measures latency against other engines; "
        "'lsp-llm soak' drives it for a long run and reports crashes, unanswered requests and RSS.",
    )
    p.add_argument("--version", action="version", version=f"lsp-llm {__version__}")
    p.add_argument("--model", metavar="PATH", help="GGUF model file (default: the embedded Gemma 3 270M)")
    p.add_argument("--n-ctx", type=int, default=Settings.n_ctx, help="context size per document session")
    p.add_argument("--threads", type=int, default=Settings.threads, help="llama.cpp threads")
    p.add_argument("--max-sessions", type=int, default=Settings.max_sessions,
                   help="documents kept live in llama.cpp contexts (LRU)")
    p.add_argument("--exact-items", action="store_true",
                   help="every token of every item bit-identical to a fresh evaluation, not only the first "
                   "(flash attention in short calls: reads and item growth about 20%% slower)")
    p.add_argument("--stdio", action="store_true", help="serve over stdio (the default; accepted for clients)")
    p.add_argument("--tcp", action="store_true", help="serve over TCP instead of stdio")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2087)
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument("--engine-url", default="", metavar="URL",
                   help="a serving engine's base URL (llama-server: http://host:8080; openai: with /v1); "
                   "default: llama.cpp in-process. The API key comes from LSP_LLM_API_KEY")
    p.add_argument("--engine-api", choices=("llama-server", "openai"), default="llama-server")
    p.add_argument("--engine-slots", choices=("own", "shared"), default="own",
                   help="llama-server's slots: one pinned per document (own), or chosen by the engine (shared: "
                   "several lsp-llm servers, a team, on one engine)")
    return p


def settings_from(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    raw = {"model": args.model, "n_ctx": args.n_ctx, "threads": args.threads,
           "max_sessions": args.max_sessions, "exact_items": args.exact_items, "log_level": args.log_level,
           "engine_url": args.engine_url, "engine_api": args.engine_api, "engine_slots": args.engine_slots}
    return Settings().update(raw)


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lsp_llm").setLevel(level.upper())


def serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    settings, errors = settings_from(args)
    setup_logging(settings.log_level)
    if errors:
        for e in errors:
            print(f"lsp-llm: {e}", file=sys.stderr)
        return 2
    if settings.model:
        from .engine.model import ModelError, check_gguf

        try:
            check_gguf(Path(settings.model))
        except ModelError as e:
            print(f"lsp-llm: {e}", file=sys.stderr)
            return 2
    from .lsp import stdio
    from .lsp.memory import give_back_freed_memory
    from .lsp.server import build

    give_back_freed_memory()
    server = build(settings)
    log = logging.getLogger("lsp_llm")
    try:
        if args.tcp:
            log.info("serving LSP on %s:%d", args.host, args.port)
            server.start_tcp(args.host, args.port)
        else:
            log.info("serving LSP on stdio")
            stdio.serve(server)
    finally:
        server.engine.stop(timeout=1.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .tools.demo import main as demo

        return demo(argv[1:])
    if argv and argv[0] == "bench":
        from .tools.bench import main as bench

        return bench(argv[1:])
    if argv and argv[0] == "soak":
        from .tools.soak import main as soak

        return soak(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    try:
        return serve(argv)
    except KeyboardInterrupt:
        return 130
