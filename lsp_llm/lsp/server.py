"""The protocol edge: pygls wiring. Handlers stay thin; the work lives in
``documents`` (text and tokens), ``engine`` (the llama.cpp thread) and
``completion`` (candidates)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from lsprotocol import types as t
from pygls.exceptions import JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

from .. import __version__
from ..config import Settings, apply_log_level
from ..engine.default_model import cache_dir
from ..engine.llama_server import EngineError
from ..engine.model import ModelError
from ..engine.pool import LongRead
from ..engine.scheduler import Engine
from ..engine.session import Cancelled, DecodeError
from ..features.after_cursor import covered
from ..features.completion import Ask, Candidate, answer, answer_remote, from_memo, next_keystrokes
from ..features.inline import FIM_SESSION, Inline, Suggestion, extend_task, request_at, suggest, suggest_remote
from ..features.inline import Request as InlineRequest
from ..text.documents import Document, DocumentError, DocumentStore, Encoding, count, decode, encode
from . import lifecycle
from .jobs import Latest, Ticket
from .memory import heap_stats
from .progress import ProgressReporter

log = logging.getLogger(__name__)

STATS_COMMAND = "lsp-llm.stats"
DOCUMENT_COMMAND = "lsp-llm.document"
SHUTDOWN_WAIT_S = 0.9  # at exit, how long the engine thread gets to wind down
TRIGGERS = [".", "(", "[", ",", " ", "="]
_DROPPED = object()  # a message answered with an error while parsing it
AT_ARRIVAL = (t.TEXT_DOCUMENT_COMPLETION, t.TEXT_DOCUMENT_INLINE_COMPLETION)  # take their text when read
MAX_ARRIVED = 64  # arrivals kept for requests whose handler has not run yet
MAX_CONNECT_DELAY_S = 30.0  # the longest wait between tries to reach a remote engine
T = TypeVar("T")


class Protocol(LanguageServerProtocol):
    """pygls's protocol with our own document mirror (pygls keeps none) and
    an answer for every request, even a malformed one."""

    @lsp_method(t.INITIALIZE)
    def lsp_initialize(self, params: t.InitializeParams) -> Generator[Any, Any, t.InitializeResult]:
        general = params.capabilities.general
        if general is not None and general.position_encodings:
            encs = list(general.position_encodings)
            if t.PositionEncodingKind.Utf8 in encs:  # cheapest for us: prefer it
                encs.remove(t.PositionEncodingKind.Utf8)
                general.position_encodings = [t.PositionEncodingKind.Utf8, *encs]
        return (yield from super().lsp_initialize(params))

    def _user(self, method: str, params: Any) -> Generator[Any, Any, None]:
        if (handler := self.fm.features.get(method)) is not None:
            yield handler, (params,), None

    @lsp_method(t.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: t.DidOpenTextDocumentParams) -> Generator[Any, Any, None]:
        yield from self._user(t.TEXT_DOCUMENT_DID_OPEN, params)

    @lsp_method(t.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: t.DidChangeTextDocumentParams) -> Generator[Any, Any, None]:
        yield from self._user(t.TEXT_DOCUMENT_DID_CHANGE, params)

    @lsp_method(t.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: t.DidCloseTextDocumentParams) -> Generator[Any, Any, None]:
        yield from self._user(t.TEXT_DOCUMENT_DID_CLOSE, params)

    def structure_message(self, data: dict[str, Any]) -> Any:
        try:
            return super().structure_message(data)
        except Exception as e:
            if "jsonrpc" in data and "id" in data and "method" in data:
                err = e if isinstance(e, JsonRpcInvalidParams) else JsonRpcInvalidParams()
                err.message = f"invalid params for {data['method']}: {e.__cause__ or e}"
                self._send_response(data["id"], None, err.to_response_error())
                return _DROPPED
            raise

    def _execute_handler(self, msg_id: Any, handler: Any, callback: Any, args: Any = None,
                         kwargs: Any = None) -> None:
        """pygls 2.1 files every handler it runs that is a generator or a
        coroutine among the requests in flight, and only a request's answer
        takes it out: a notification's (didOpen, didChange, didClose, under
        a fresh id) and each step a generator handler yields stayed for good.
        Every keystroke kept a future, a lock and an id (in the soak, ~7,000
        Python objects a minute). Each is taken out when it is done, on the
        event loop after the callback (``shutdown`` cancels them while it
        iterates over them)."""
        super()._execute_handler(msg_id, handler, callback, args, kwargs)
        if (future := self._request_futures.get(msg_id)) is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (no loop: taken out at once)
            future.add_done_callback(lambda done: self._forget(msg_id, done))
            return
        future.add_done_callback(lambda done: _soon(loop, self._forget, msg_id, done))

    def _forget(self, msg_id: Any, future: Any) -> None:
        if self._request_futures.get(msg_id) is future:
            del self._request_futures[msg_id]

    @property
    def in_flight(self) -> int:
        """Requests being handled (``lsp-llm.stats``: 1 when the server is
        idle, the stats request itself)."""
        return len(self._request_futures)

    def handle_message(self, message: Any) -> None:
        if message is _DROPPED:
            return
        if getattr(message, "method", None) in AT_ARRIVAL and hasattr(message, "id") and not self._shutdown:
            self._server.arrive(message.id, message.method, message.params)
        if self._shutdown and getattr(message, "method", t.EXIT) != t.EXIT and hasattr(message, "id") \
                and hasattr(message, "method"):
            self._send_response(message.id, None,
                                JsonRpcInvalidRequest("the server is shutting down").to_response_error())
            return
        if getattr(message, "method", None) == t.EXIT:
            # `exit` ends the process here, within SHUTDOWN_WAIT_S: decode calls stop midway (the
            # model aborts them: under load one call takes seconds), the engine thread gets up to
            # SHUTDOWN_WAIT_S to free its contexts, then os._exit: no second wait (cli), and no
            # interpreter teardown (0.3-0.7 s of freeing objects, around a thread maybe still in llama.cpp)
            import os

            engine = self._server.engine
            if (abort := getattr(engine.model, "abort", None)) is not None:  # (a remote model has none)
                abort()
            if not engine.stop(SHUTDOWN_WAIT_S):
                log.warning("exit: the engine thread did not end in %.1f s; ending the process", SHUTDOWN_WAIT_S)
            logging.shutdown()
            os._exit(0 if self._shutdown else 1)
        super().handle_message(message)


class Server(LanguageServer):
    def __init__(self, settings: Settings) -> None:
        super().__init__("lsp-llm", __version__, protocol_cls=Protocol, max_workers=2)
        self.settings = settings
        self.engine = Engine(settings.max_sessions, settings.n_ctx, n_branches=16,
                             headroom=settings.headroom, saved_mb=settings.saved_mb)
        self.latest = Latest(self.engine)
        self.inline = Inline()
        self.store = DocumentStore(None, self.engine)
        self.model_name = "(loading)"
        self.loading: str | None = None  # the model being loaded beside the serving one
        self.ready: asyncio.Future[bool] | None = None
        self._serving: Settings | None = None  # the settings the serving model was loaded with
        self._progress = ProgressReporter(self)
        self._arrived: dict[Any, Arrival] = {}  # by request id, until its handler takes it
        self._faults: set[str] = set()  # kinds of remote engine fault told to the user
        self._connect_delay = 1.0  # seconds before the next try to reach a remote engine
        self.engine.on_progress = self._progress.from_engine

    @property
    def encoding(self) -> Encoding:
        """The position encoding negotiated at initialize (pygls picks the
        client's first supported one; we put UTF-8 first when offered)."""
        return Encoding.of(self.workspace.position_encoding)

    def tell(self, kind: t.MessageType, text: str) -> None:
        (log.error if kind == t.MessageType.Error else log.warning)(text)
        self.window_show_message(t.ShowMessageParams(type=kind, message=f"lsp-llm: {text}"))

    # -- model ------------------------------------------------------------------
    async def load_model(self) -> bool:
        """Load (or reload) the model beside the serving one, with progress,
        then swap it in with its vocabulary (see ``lifecycle``). A failed
        reload keeps the old model serving. With ``engineUrl``: connect."""
        s = self.settings
        if s.engine_url:
            return await self.connect_engine(s)
        title = "lsp-llm: loading " + (Path(s.model).name if s.model else "the default model")
        self.loading = Path(s.model).name if s.model else "the default model"
        loading = asyncio.wrap_future(lifecycle.load_beside(s, cache_dir()))  # the old model serves meanwhile
        async with self._progress.task(title):
            try:
                try:
                    model = await loading
                    n_ctx = lifecycle.n_ctx_for(s, model)
                    ahead = await lifecycle.read_ahead(self.store, self.engine, model, n_ctx)
                finally:
                    self.loading = None
                await asyncio.wrap_future(lifecycle.swap(self.store, self.engine, model, n_ctx, s, ahead))
            except Exception as e:  # ModelError and llama.cpp failures alike
                return self._load_failed(e)
        self.model_name, self._serving = model.name, s
        log.info("model %s ready (%s); batch rule %s", model.name, model.description, model.batch_rule)
        return True

    async def connect_engine(self, s: Settings) -> bool:
        """Connect to a serving engine and move the documents onto it. While
        it cannot be reached: one message, then retries with backoff, and
        completions answer empty at once."""
        async with self._progress.task(f"lsp-llm: connecting to {s.engine_url}"):
            try:
                pool = await asyncio.wrap_future(lifecycle.connect_beside(s))
                await asyncio.wrap_future(lifecycle.swap_remote(self.store, self.engine, pool))
            except EngineError as e:
                self.engine_fault(e)
                self._retry_connect(s)
                return False
        self.model_name, self._serving, self._connect_delay = pool.model.name, s, 1.0
        self._faults.clear()
        log.info("serving on %s (exact across cache states: %s)", pool.model.description, pool.exact)
        return True

    def _retry_connect(self, s: Settings) -> None:
        def again() -> None:
            if self.settings is s and self._serving is not s:  # not replaced or connected meanwhile
                self.ready = asyncio.ensure_future(self.load_model())

        asyncio.get_running_loop().call_later(self._connect_delay, again)
        self._connect_delay = min(self._connect_delay * 2, MAX_CONNECT_DELAY_S)

    def engine_fault(self, e: EngineError) -> None:
        """A remote engine's fault: told once per kind until it serves again."""
        if e.kind not in self._faults:
            self._faults.add(e.kind)
            self.tell(t.MessageType.Error, e.message)
        else:
            log.warning("%s", e.message)

    def _load_failed(self, e: Exception) -> bool:
        """Tell the user; the model already serving, if any, goes on (and the
        settings that would reload go back to its own)."""
        if self._serving is None or self.engine.model is None:
            self.model_name = "(none)"
            self.tell(t.MessageType.Error, str(e))
            return False
        self.tell(t.MessageType.Error, f"{e}; still serving {self.model_name}")
        self.settings = replace(self.settings, **{k: getattr(self._serving, k) for k in Settings.RELOAD})
        return True

    async def wait_ready(self) -> bool:
        """Whether a model serves: the one loaded (a reload swaps models
        between jobs), else the first load's outcome."""
        if self.engine.model is not None:
            return True
        return bool(self.ready is not None and await asyncio.shield(self.ready))

    def apply_settings(self, raw: Any, initial: bool) -> None:
        new, errors = self.settings.update(raw)
        for e in errors:
            self.tell(t.MessageType.Error, f"settings: {e}")
        old, self.settings = self.settings, new
        apply_log_level(new.log_level)
        self.engine.headroom = new.headroom
        self.engine.saved_bytes = new.saved_mb << 20
        if new.max_sessions != old.max_sessions:
            self.engine.submit(lambda: self.engine.resize(new.max_sessions))
        if not initial and any(getattr(new, k) != getattr(old, k) for k in Settings.RELOAD):
            self.ready = asyncio.ensure_future(self.load_model())

    # -- requests see the text they were sent against -----------------------------
    def arrive(self, msg_id: Any, method: str, params: Any) -> None:
        """A completion request was read: take what it needs from its
        document now, before the messages read after it (a didChange in the
        same write) are applied. LSP handles messages in order."""
        doc = self.store.docs.get(params.text_document.uri)
        if doc is None:
            return  # the handler says the document is unknown
        if method == t.TEXT_DOCUMENT_INLINE_COMPLETION and not self.settings.inline:
            return
        prepare = self.completion_at if method == t.TEXT_DOCUMENT_COMPLETION else self.inline_at
        if len(self._arrived) >= MAX_ARRIVED:  # requests that never ran (cancelled unstarted)
            self._arrived.pop(next(iter(self._arrived)))
        if self.engine.model is None:  # the first load: prepared when it ends, if the text has not changed
            self._arrived[msg_id] = Arrival(doc.data, None)
            return
        try:
            self._arrived[msg_id] = Arrival(doc.data, prepare(doc.uri, params.position))
        except DocumentError as e:
            self._arrived[msg_id] = Arrival(doc.data, e)
        except EngineError as e:  # a remote tokenizer: the request answers empty
            self.engine_fault(e)
            self._arrived[msg_id] = Arrival(doc.data, DocumentError(e.message))

    async def at_arrival(self, params: Any, prepare: Callable[[str, t.Position], T]) -> T | None:
        """What a request took from its document when it was read (see
        ``arrive``). None when the text changed while the first model loaded:
        the request was about text that is gone."""
        arrival = self._arrived.pop(self.protocol.msg_id, None)
        if arrival is not None and arrival.prepared is not None:
            if isinstance(arrival.prepared, DocumentError):
                raise arrival.prepared
            return arrival.prepared
        if not await self.wait_ready():
            raise DocumentError("no model is loaded (see the earlier error)")
        uri = params.text_document.uri
        if arrival is not None and self.store.get(uri).data is not arrival.data:
            log.debug("%s: changed after a request that waited for the model; answered empty", uri)
            return None
        return prepare(uri, params.position)

    # -- completion -------------------------------------------------------------------
    def completion_at(self, uri: str, pos: t.Position) -> CompletionAt:
        """Everything a completion at pos needs from the document (event loop)."""
        doc = self.store.trusted(uri)
        enc = self.encoding
        offset = doc.offset(pos.line, pos.character, enc)
        self.store.move_cursor(uri, offset)
        start = doc.word_start(offset)
        prompt, healed = doc.prompt(offset)
        s = self.settings
        ask = Ask(uri, prompt, healed, start < offset, s.items, s.line_tokens, quick=s.wait_for == "top")
        return CompletionAt(ask, decode(doc.data[start:offset]), _pos(doc, start, enc), _pos(doc, offset, enc),
                            _rest_of_line(doc.data, offset), enc)

    async def complete(self, at: CompletionAt) -> t.CompletionList:
        """Items for a completion taken from its document (``completion_at``)."""
        ask, uri = at.ask, at.ask.uri
        got = from_memo(self.engine, ask)  # often all known: no engine job, no wait
        if got is not None and got.candidates:  # (nothing shown: the engine job decides)
            self.latest.supersede((uri, "completion"))
            try:
                self.engine.prepare(uri, "completion", next_keystrokes(self.engine, ask, got), ask.prompt)
            except ModelError:  # the model switched meanwhile: no plan for the old one
                pass
            return at.items(got.candidates)
        cands = await self._newest(uri, "completion", lambda ticket: self._answer(ask, ticket))
        return at.items(cands or [])

    async def _newest(self, uri: str, kind: str, work: Callable[[Ticket], T]) -> T | None:
        """A request's engine job, the newest of its kind per document
        (``Latest.run``) within ``readBudgetMs``: None when a newer request
        replaced it, a long read goes on in the background, or the engine
        failed (told once). A llama.cpp failure is the request's error."""
        try:
            got = await self.latest.run((uri, kind), work, self.settings.read_budget_ms / 1000)
        except DecodeError as e:  # the session was reset; the next request feeds it again
            log.error("%s: %s", uri, e)
            raise DocumentError(f"llama.cpp failed on {uri}: {e}") from None
        except EngineError as e:
            self.engine_fault(e)
            return None
        self._faults.clear()
        return got

    @staticmethod
    def _within_budget(ticket: Ticket, fn: Callable[[Callable[[], bool]], T]) -> T:
        """A remote engine's work within the request's budget (``readBudgetMs``),
        as a long read in-process: past it, the request answers empty."""
        def stop() -> bool:
            return ticket.should_stop() or (ticket.deadline is not None and time.monotonic() > ticket.deadline)

        try:
            return fn(stop)
        except Cancelled:
            if ticket.should_stop():
                raise
            raise LongRead() from None

    def _answer(self, ask: Ask, ticket: Ticket) -> list[Candidate]:
        """Engine thread: the items, then idle work for the next keystrokes."""
        started = ticket.age_ms()
        if self.engine.pool.remote:
            return self._within_budget(ticket, lambda stop: answer_remote(self.engine, ask, stop).candidates)
        got = answer(self.engine, ask, ticket.should_stop, ticket.deadline)
        st = self.engine.stats.get(ask.uri)
        if st is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("completion for %s: %.0f ms (waited %.0f), fed %d, decoded %d rows, %d memo steps, %d items",
                      ask.uri, ticket.age_ms(), started, st.fed_last, st.generated_last, st.memo_steps_last,
                      len(got.candidates))
        if self.engine.exact_memo is not None and not ticket.cancel.is_set():  # (superseded: its plan is old)
            self.engine.prepare(ask.uri, "completion", next_keystrokes(self.engine, ask, got), ask.prompt)
        return got.candidates

    # -- ghost text ---------------------------------------------------------------------
    def inline_at(self, uri: str, pos: t.Position) -> InlineAt:
        """Everything ghost text at pos needs from the document (event loop),
        and the answer itself when type-through has it."""
        t0 = time.perf_counter()
        doc = self.store.trusted(uri)
        enc = self.encoding
        offset = doc.offset(pos.line, pos.character, enc)
        self.store.move_cursor(uri, offset)
        here, rest = _pos(doc, offset, enc), _rest_of_line(doc.data, offset)
        req = request_at(doc, offset, self.settings, self.engine)
        hit = self.inline.type_through(uri, doc.data, offset)
        if hit is not None:
            st = self.inline.stats.setdefault(uri, hit.stats)
            st.type_through += 1
            st.type_through_ms = (time.perf_counter() - t0) * 1000
            self._prepare_inline(req)
        return InlineAt(req, here, rest, enc, doc.data[:offset], doc.data[offset:], hit)

    async def suggest_inline(self, at: InlineAt) -> InlineAnswer | None:
        """Ghost text: from the type-through cache, else an engine job (the
        newest request per document wins)."""
        if at.hit is not None:
            return at.answer(at.hit)
        uri = at.req.uri
        found = await self._newest(uri, "inline", lambda ticket: self._suggest(at.req, ticket))
        if found is None:
            return None  # a newer request replaced it, a long read goes on, or the engine failed
        old = self.inline.stats.get(uri)
        if old is not None:
            found.stats.type_through = old.type_through
        self.inline.stats[uri] = found.stats
        self.inline.show(uri, at.before, at.after, found)
        return at.answer(found)

    def _suggest(self, req: InlineRequest, ticket: Ticket) -> Suggestion:
        """Engine thread: the suggestion, then idle work that extends it."""
        if self.engine.pool.remote:
            return suggest_remote(self.engine, req, ticket.should_stop)
        found = suggest(self.engine, req, ticket.should_stop, ticket.deadline)
        if not ticket.cancel.is_set():
            self._prepare_inline(req)
        return found

    def _prepare_inline(self, req: InlineRequest) -> None:
        """Idle work: the rest of the suggestion, and what follows it once accepted."""
        if self.engine.exact_memo is not None:
            self.engine.prepare(req.uri, "inline", [extend_task(self.engine, req, self.settings.inline_lines)],
                                req.doc_prompt)


@dataclass(frozen=True)
class Arrival:
    """A completion request's document as it stood when the request was read."""

    data: bytes  # the document's text (the same object until an edit)
    prepared: CompletionAt | InlineAt | DocumentError | None  # None: no model yet


def _rest_of_line(data: bytes, offset: int) -> bytes:
    end = data.find(b"\n", offset)
    return data[offset : len(data) if end < 0 else end].rstrip(b"\r")


def _after(here: t.Position, rest: bytes, covers: int, enc: Encoding) -> t.Position:
    """The position covers bytes into the rest of the cursor's line."""
    return t.Position(here.line, here.character + count(rest[:covers], enc))


@dataclass(frozen=True)
class CompletionAt:
    """A completion request, taken from its document: the ask, the partial
    word the items replace, and the rest of the line they may cover."""

    ask: Ask
    partial: str
    start: t.Position  # of the partial word
    here: t.Position  # the cursor
    rest: bytes  # the cursor's line after the cursor
    encoding: Encoding

    def items(self, cands: list[Candidate]) -> t.CompletionList:
        return t.CompletionList(is_incomplete=True, items=[self._item(i, c) for i, c in enumerate(cands)])

    def _item(self, rank: int, c: Candidate) -> t.CompletionItem:
        new_text = self.partial + c.text
        label = new_text.strip() or new_text
        end = _after(self.here, self.rest, covered(encode(c.text), self.rest), self.encoding)
        return t.CompletionItem(
            label=label,
            kind=t.CompletionItemKind.Snippet if c.whole_line else t.CompletionItemKind.Text,
            detail=f"{c.probability:.1%}" + (" · to end of line" if c.whole_line else ""),
            sort_text=f"{rank:03d}",
            filter_text=new_text,
            text_edit=t.TextEdit(range=t.Range(self.start, end), new_text=new_text),
            insert_text_format=t.InsertTextFormat.PlainText,
            data={"probability": c.probability},
        )


@dataclass(frozen=True)
class InlineAt:
    """A ghost text request, taken from its document."""

    req: InlineRequest
    here: t.Position  # the cursor
    rest: bytes  # the cursor's line after the cursor
    encoding: Encoding
    before: bytes  # the document before the cursor
    after: bytes  # and after it
    hit: Suggestion | None  # the answer, from type-through

    def answer(self, suggestion: Suggestion) -> InlineAnswer:
        return InlineAnswer(suggestion, self.here, _after(self.here, self.rest, suggestion.covers, self.encoding))


@dataclass(frozen=True)
class InlineAnswer:
    suggestion: Suggestion
    here: t.Position  # the cursor
    end: t.Position  # the end of the text after the cursor that the suggestion replaces

    def item(self) -> t.InlineCompletionItem:
        return t.InlineCompletionItem(insert_text=self.suggestion.text, range=t.Range(self.here, self.end))


def build(settings: Settings) -> Server:
    server = Server(settings)

    @server.feature(t.INITIALIZE)
    def initialize(ls: Server, params: t.InitializeParams) -> None:
        ls.apply_settings(params.initialization_options, initial=True)

    @server.feature(t.INITIALIZED)
    async def initialized(ls: Server, params: t.InitializedParams) -> None:
        ls._progress.loop = asyncio.get_running_loop()
        ls.ready = asyncio.ensure_future(ls.load_model())

    @server.feature(t.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: Server, params: t.DidChangeConfigurationParams) -> None:
        ls.apply_settings(params.settings, initial=False)

    @server.feature(t.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: Server, params: t.DidOpenTextDocumentParams) -> None:
        d = params.text_document
        _guard(lambda: ls.store.open(d.uri, d.text, d.version))

    @server.feature(t.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: Server, params: t.DidChangeTextDocumentParams) -> None:
        changes = []
        for c in params.content_changes:
            if isinstance(c, t.TextDocumentContentChangePartial):
                r = c.range
                changes.append(((r.start.line, r.start.character, r.end.line, r.end.character), c.text))
            else:
                changes.append((None, c.text))
        doc = params.text_document
        try:
            ls.store.change(doc.uri, doc.version, changes, ls.encoding)
        except EngineError as e:  # a remote engine's tokenizer: the text is applied, its tokens come later
            ls.engine_fault(e)
        except DocumentError as e:
            if doc.uri in ls.store.docs:  # a bad change to an open document: the mirror is stale
                ls.tell(t.MessageType.Warning, f"{e}; completions for this file pause until it is reopened")
            else:
                log.warning("%s", e)

    @server.feature(t.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: Server, params: t.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        _guard(lambda: ls.store.close(uri))
        ls.inline.forget(uri)
        ls.engine.forget(uri + FIM_SESSION)

    @server.feature(t.TEXT_DOCUMENT_COMPLETION, t.CompletionOptions(trigger_characters=TRIGGERS))
    async def completion(ls: Server, params: t.CompletionParams) -> t.CompletionList:
        try:
            at = await ls.at_arrival(params, ls.completion_at)
            return await ls.complete(at) if at is not None else t.CompletionList(is_incomplete=True, items=[])
        except DocumentError as e:
            log.warning("completion: %s", e)
            return t.CompletionList(is_incomplete=True, items=[])

    @server.feature(t.TEXT_DOCUMENT_INLINE_COMPLETION, t.InlineCompletionOptions())
    async def inline_completion(ls: Server, params: t.InlineCompletionParams) -> t.InlineCompletionList:
        if not ls.settings.inline:
            return t.InlineCompletionList(items=[])
        try:
            at = await ls.at_arrival(params, ls.inline_at)
            answer = await ls.suggest_inline(at) if at is not None else None
        except DocumentError as e:
            log.warning("inline completion: %s", e)
            return t.InlineCompletionList(items=[])
        if answer is None or not answer.suggestion.text:
            return t.InlineCompletionList(items=[])
        return t.InlineCompletionList(items=[answer.item()])

    @server.command(STATS_COMMAND)
    def stats(ls: Server, *args: Any) -> Any:
        if args:
            uri = args[0]
            if not isinstance(uri, str) or uri not in ls.store.docs:
                raise JsonRpcInvalidParams(f"{STATS_COMMAND}: unknown document {uri!r}")
            out = ls.engine.stats[uri].as_dict() if uri in ls.engine.stats else {}
            if uri in ls.inline.stats:
                out["inline"] = ls.inline.stats[uri].as_dict()
            return out
        return {
            "model": ls.model_name,
            "loading": ls.loading,
            "n_ctx": ls.engine.n_ctx,
            "batch_rule": str(ls.engine.model.batch_rule) if ls.engine.model else None,
            "decode_ms_total": round(ls.engine.decode_ms_total, 3),
            "memo_steps": len(ls.engine.memo),
            **ls.engine.idle_stats(),
            "fim": bool(ls.settings.fim and ls.engine.model is not None and ls.engine.model.fim is not None),
            "documents": {u: s.as_dict() for u, s in list(ls.engine.stats.items())},
            "engine": ls.engine.pool.describe(),
            "heap": heap_stats(),
            "requests_in_flight": ls.protocol.in_flight,
        }

    @server.command(DOCUMENT_COMMAND)
    def document(ls: Server, *args: Any) -> Any:
        uri = args[0] if args else None
        if not isinstance(uri, str) or uri not in ls.store.docs:
            raise JsonRpcInvalidParams(f"{DOCUMENT_COMMAND}: unknown document {uri!r}")
        return ls.store.mirror(uri, ls.encoding).as_dict()

    @server.feature(t.SHUTDOWN)
    def shutdown(ls: Server, *args: Any) -> None:
        # answered at once: the running job stops within its decode call
        # (the model aborts them all), queued ones fail; `exit` waits a
        # moment for the engine thread
        if (abort := getattr(ls.engine.model, "abort", None)) is not None:  # (a remote model has none)
            abort()
        ls.engine.stop(0)

    return server


def _soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """fn(*args) on loop, from any thread; nothing once the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _guard(fn: Any) -> None:
    """Notifications: bad input is logged and ignored; the server keeps serving."""
    try:
        fn()
    except DocumentError as e:
        log.warning("%s", e)


def _pos(doc: Document, offset: int, enc: Encoding) -> t.Position:
    line, ch = doc.position(offset, enc)
    return t.Position(line=line, character=ch)
