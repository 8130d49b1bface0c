"""The model's lifecycle: load a model, then swap it in with its vocabulary
as one step.

The old and the new vocabulary must never meet:

1. ``load`` runs on a thread of its own (``load_beside``), beside the engine
   thread: the old model keeps serving requests meanwhile, with the cores
   shared. If loading or calibration fails, the new model is freed and the
   old one stays.
   Then ``read_ahead`` reads the focus document on the new model, on a
   thread of its own too, so the first request after the swap does not
   read it again.
2. ``swap`` runs on the event loop, in one step (no await): every document is
   re-tokenized with the new vocabulary (the old model is still alive), and
   the engine is told to switch once the jobs already queued have run (their
   ids are the old vocabulary's). The documents' new targets replace the old
   ones in the same step, so no old id reaches the new model.
3. The engine thread switches, frees the old model (by then nothing holds
   its vocabulary) and adopts the session read ahead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import textwrap
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from ..config import Settings
from ..engine.default_model import default_model_path
from ..engine.http_engine import HttpEngine
from ..engine.llama_server import LlamaServer
from ..engine.model import BatchRule, Model
from ..engine.openai_api import OpenAIEngine
from ..engine.remote import RemotePool
from ..engine.scheduler import Engine
from ..engine.session import Session
from ..text.documents import DocumentStore, Vocab

Calibrate = Callable[[Model, Path | None], BatchRule]
log = logging.getLogger(__name__)


def load_beside(s: Settings, cache: Path | None) -> Future[Model]:
    """``load`` on a daemon thread of its own (an unfinished load never holds
    up the process's exit)."""
    fut: Future[Model] = Future()

    def run() -> None:
        try:
            fut.set_result(load(s, cache))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting server
            fut.set_exception(e)

    threading.Thread(target=run, name="lsp-llm-load", daemon=True).start()
    return fut


async def read_ahead(store: DocumentStore, engine: Engine, model: Model, n_ctx: int) -> dict[str, Session]:
    """Event loop: the focus document read on the new model, on a thread of
    its own beside the serving model, before the swap
    (``SessionPool.read_ahead``), so the first request after the swap feeds
    only what was typed since. Nothing when there is no focus or no
    in-process model serving, or when the read fails (the document is then
    read after the swap, as any other)."""
    uri, pool = engine.focus, engine.pool
    if uri is None or pool.remote or engine.model is None:
        return {}
    fut: Future[Session] = Future()
    try:
        target = store.target_in(uri, vocab_of(model)).prompt
    except Exception as e:  # noqa: BLE001 - a stale or closed document: nothing to read ahead
        log.info("%s: not read ahead: %s", uri, e)
        return {}

    def run() -> None:
        try:
            fut.set_result(pool.read_ahead(model, n_ctx, target))
        except BaseException as e:  # noqa: BLE001 - the swap goes on without it
            fut.set_exception(e)

    threading.Thread(target=run, name="lsp-llm-read-ahead", daemon=True).start()
    try:
        return {uri: await asyncio.wrap_future(fut)}
    except asyncio.CancelledError:  # the reload was given up: its session is freed when the read ends
        fut.add_done_callback(lambda f: f.exception() is None and f.result().close())
        raise
    except Exception as e:  # noqa: BLE001
        log.warning("%s: not read ahead: %s", uri, e)
        return {}


def load(s: Settings, cache: Path | None, calibrate: Calibrate | None = None) -> Model:
    """Load and calibrate the model the settings name (any thread: it shares
    nothing with the serving model). On failure the new model is freed and
    the error raised."""
    if calibrate is None:
        from ..engine.calibrate import calibrate
    model = Model(Path(s.model) if s.model else default_model_path(), threads=s.threads,
                  exact_items=s.exact_items)
    try:
        calibrate(model, cache)
        model.tokens_starting_with(b"")  # builds the prefix index now, not on the first keystroke
    except BaseException:
        model.close()
        raise
    return model


def n_ctx_for(s: Settings, model: Model) -> int:
    return min(s.n_ctx, model.n_ctx_train) if model.n_ctx_train > 0 else s.n_ctx


def vocab_of(model: Model) -> Vocab:
    return Vocab(lambda b: model.tokenize(b, add_bos=False), model.piece,
                 model.bos if model.add_bos else None,
                 lambda b: len(model.tokens_starting_with(b)) > 0, model.fim)


def swap(store: DocumentStore, engine: Engine, model: Model, n_ctx: int, s: Settings | None = None,
         ahead: dict[str, Session] | None = None) -> Future:
    """Event loop, one step: the documents take the new vocabulary and the
    engine switches to model after its queued jobs (back from a remote
    engine: on a new in-process pool), adopting the sessions read ahead.
    The future is done when the engine has switched (and freed the old
    model)."""
    targets = store.set_vocab(vocab_of(model))
    s = s or Settings()
    pool = None if not engine.pool.remote else engine.local_pool(s.max_sessions, n_ctx, engine.n_branches,
                                                                   s.headroom, s.saved_mb)
    return engine.swap_model(model, n_ctx, targets, pool, ahead)


# -- a remote engine ----------------------------------------------------------------------
API_KEY_VARIABLE = "LSP_LLM_API_KEY"
ENGINE_APIS: dict[str, type[HttpEngine]] = {"llama-server": LlamaServer, "openai": OpenAIEngine}


def connect_beside(s: Settings) -> Future[RemotePool]:
    """Connect to the serving engine the settings name, on a daemon thread:
    its model, slots, and whether it is exact across cache states (measured
    now on a sample, never assumed). Raises EngineError."""
    fut: Future[RemotePool] = Future()

    def run() -> None:
        try:
            fut.set_result(connect(s))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting server
            fut.set_exception(e)

    threading.Thread(target=run, name="lsp-llm-connect", daemon=True).start()
    return fut


EXACT_PROBES = (150, 400)  # prompt lengths (tokens) that measure_exact tries


def exact_sample() -> bytes:
    """Real code for the exactness probes, the same everywhere this Python
    runs: the start of the standard library's ``textwrap.py``."""
    return (Path(textwrap.__file__).read_bytes())[:4000]


def connect(s: Settings) -> RemotePool:
    server = ENGINE_APIS[s.engine_api](s.engine_url, os.environ.get(API_KEY_VARIABLE) or None)
    if isinstance(server, LlamaServer):
        server.shared = s.engine_slots == "shared"
    try:
        info = server.connect()
        bos = [info.bos_id] if info.add_bos and info.bos_id is not None else []
        sample = bos + [t.id for t in server.tokenize(exact_sample())]
        # real code cut at two lengths: a near-certain next token (repeated text) would hide
        # a difference in the rest of the distribution
        exact = all(server.measure_exact(sample[:n]) for n in EXACT_PROBES)
    except BaseException:
        server.close()
        raise
    return RemotePool(server, info, s.headroom, exact)


def swap_remote(store: DocumentStore, engine: Engine, pool: RemotePool) -> Future:
    """``swap`` onto a remote engine: the documents take its vocabulary."""
    model = pool.model
    targets = store.set_vocab(Vocab(lambda b: model.tokenize(b), model.piece,
                                    model.bos if model.add_bos else None, lambda _b: False))
    return engine.swap_model(model, pool.n_ctx, targets, pool)
