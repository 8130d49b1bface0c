"""The remote backend: documents on a serving engine (llama-server's native
API, ``llama_server.LlamaServer``, or OpenAI-compatible completions,
``openai_api.OpenAIEngine``; both ``http_engine.HttpEngine``), behind the
same scheduler as the in-process pool. Nothing here knows which API it drives.

Each live document is pinned to a slot (LRU over the server's slots), and its
prompt always goes as token ids, so the server's prompt cache sees the same
prefix as the document's token mirror: ``sync`` (the scheduler's eager
re-feed, ``n_predict: 0``) leaves the slot holding the document's newest
text, and the request that follows reuses it. A document beyond the slots
is sent again when it comes back (the cache re-reads what differs), unless
the server can save slots (``--slot-save-path``): then the evicted document's
slot is saved to the server's disk (``action=save``, a file named by a hash
of the URI) and restored (``action=restore``) when the document comes back,
so only what changed meanwhile is read. An API without slots ignores the
slot: its prefix cache does the reuse.

Ghost text on a model with FIM tokens goes through ``/infill`` (text before
and after the cursor; the server lays out the FIM prompt) on a slot of its
own, keyed like the in-process FIM session (``uri#fim``): the server puts
``<PRE>`` before the prefix, so the FIM prompt shares nothing past BOS with
the document's plain prompt, and on the document's slot each suggestion and
the popup request after it would re-read the whole document.

The engine is not assumed exact: ``exact`` is what ``measure_exact`` found at
connect (the same prompt cold, warm and after a rewind), and nothing here
reuses work across cache states (no greedy memo, no remembered logits).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .greedy import GreedyMemo, Tips
from .http_engine import EngineError, HttpEngine, ServerInfo, Timings, TopToken
from .pool import DocState, DocStats, window
from .session import ShouldStop, common_prefix

log = logging.getLogger(__name__)

# A feed of at most this many new tokens finishes even when its work is
# preempted: stopping it on a server costs more than it saves (the slot stays
# busy until the server sees the closed connection, so the request that
# preempted it, whose prompt starts with the same text, queues behind it or
# takes another document's slot).
SHORT_FEED = 64


class RemoteModel:
    """The engine's vocabulary as the documents and features use a model's:
    tokens and their pieces come from the server (``/tokenize`` with pieces,
    cached)."""

    fim = None  # the token-level FIM prompt is not built: FIM goes through /infill (RemotePool.infill)
    batch_rule = None

    def __init__(self, server: HttpEngine, info: ServerInfo) -> None:
        self.server = server
        self.info = info
        self.name = info.model
        self.description = f"{info.model} on {server.label}"
        self.add_bos = info.add_bos
        self.bos = info.bos_id

    def tokenize(self, data: bytes, add_bos: bool = False) -> list[int]:
        ids = [t.id for t in self.server.tokenize(data)]
        return ([self.bos] if add_bos and self.add_bos and self.bos is not None else []) + ids

    def piece(self, token: int) -> bytes:
        return self.server.piece(token)

    def is_eog(self, token: int) -> bool:
        return token == self.info.eos_id

    def abort(self) -> None:
        """(At exit: a remote call stops at its own should_stop.)"""

    def close(self) -> None:
        self.server.close()


class RemotePool:
    """The scheduler's backend on a serving engine: a slot per live document."""

    remote = True
    exact_memo = None  # nothing is reused across cache states
    saved_mb = 0.0
    decode_ms_total = 0.0

    def __init__(self, server: HttpEngine, info: ServerInfo, headroom: int, exact: bool) -> None:
        self.server = server
        self.model = RemoteModel(server, info)
        self.exact = exact
        self.n_ctx = info.n_ctx
        self.n_branches = 16
        self.headroom = headroom
        self.max_sessions = max(1, info.n_slots)
        self.saved_bytes = 0
        self.sessions: OrderedDict[str, int] = OrderedDict()  # document -> its slot, LRU
        self.fed: dict[str, list[int]] = {}  # document -> the prompt its slot was last brought to
        self.saved: OrderedDict[str, int] = OrderedDict()  # document -> tokens saved on the server's disk
        # shared (``engineSlots``): several lsp-llm servers on this engine, so
        # the engine chooses each document's slot (see ``slot``)
        self.shared = bool(getattr(server, "shared", False))
        self.chosen: dict[str, int] = {}  # shared: document -> the slot the engine last ran it on
        self.slot_files = info.slot_files and not self.shared  # (shared: no slot of its own)
        self.can_infill = info.infill is True
        self.infill_total = 0  # ghost-text requests answered through /infill
        self.stats: dict[str, DocStats] = {}
        self.memo = GreedyMemo()  # (unused: never exact by assumption)
        self.tips = Tips()
        self.on_progress: Callable[[str, int, int], None] | None = None

    # -- what the scheduler asks ------------------------------------------------------
    def state(self, uri: str) -> DocState:
        if uri in self.sessions:
            return DocState.LIVE
        return DocState.SAVED if uri in self.saved else DocState.UNREAD

    def can_read(self, focus: str | None) -> bool:
        return len(self.sessions) < self.max_sessions

    def slot(self, uri: str, focus: str | None = None) -> int:
        """The slot a document's request goes to. Its own: a free one, or
        the least recently used one of another document (not the focus's),
        saved first where the server can; a saved document's slot is
        restored. Shared, the engine chooses (-1): the idle slot whose prompt
        shares the most with the request. Then the document stays on the slot
        the engine last ran it on (``_ran``), so that a request waits for
        that slot, busy with its own cancelled predecessor, rather than take
        another typist's."""
        own = self._own_slot(uri, focus)
        if not self.shared:
            return own
        chosen = self.chosen.get(uri, -1)
        return chosen if chosen < self.max_sessions else -1

    def _own_slot(self, uri: str, focus: str | None) -> int:
        if uri in self.sessions:
            self.sessions.move_to_end(uri)
            return self.sessions[uri]
        taken = set(self.sessions.values())
        free = [s for s in range(self.max_sessions) if s not in taken]
        if free:
            slot = free[0]
        else:
            old = next((u for u in self.sessions if u != focus), next(iter(self.sessions)))
            slot = self.sessions.pop(old)
            self.fed.pop(old, None)
            self._save(old, slot)
        self.sessions[uri] = slot
        self._restore(uri, slot)
        return slot

    def _save(self, uri: str, slot: int) -> None:
        """An evicted document's slot written to the server's disk (where it can)."""
        st = self.stats.get(uri)
        if st is None:
            return
        cached, st.cached = st.cached, 0
        if not self.slot_files or not cached:
            return
        try:
            self.saved[uri] = self.server.save_slot(slot, slot_file(uri))
        except EngineError as e:
            log.warning("%s: slot %d not saved: %s", uri, slot, e)

    def _restore(self, uri: str, slot: int) -> None:
        """A saved document's slot read back: the next request reads only what changed."""
        if self.saved.pop(uri, None) is None:
            return
        try:
            restored = self.server.restore_slot(slot, slot_file(uri))
        except EngineError as e:
            log.warning("%s: slot %d not restored: %s", uri, slot, e)
            return
        if restored:
            self.stats.setdefault(uri, DocStats()).restored += 1

    def sync(self, uri: str, target: list[int], should_stop: ShouldStop | None, healed: bytes,
             deadline: float | None = None, rows: int | None = None, focus: str | None = None) -> int:
        """The slot's cache brought to the document's prompt (eager re-feed)."""
        fitted = self.fit(target)
        slot = self.slot(uri, focus)
        reusable = common_prefix(self.fed.get(uri, []), fitted)
        stop = _never if should_stop is None or len(fitted) - reusable <= SHORT_FEED else should_stop
        timings = self.server.feed(slot, fitted, stop)
        self._ran(uri, fitted, timings)
        self.fed[uri] = fitted
        self._note(uri, len(fitted), timings)
        return slot

    def fit(self, target: list[int]) -> list[int]:
        return window(target, self.n_ctx, self.headroom, bool(self.model.add_bos))[0]

    def drop(self, uri: str) -> None:
        self.sessions.pop(uri, None)
        self.chosen.pop(uri, None)
        self.fed.pop(uri, None)
        self.saved.pop(uri, None)

    def resize(self, max_sessions: int) -> None:
        """The server's slots decide."""

    def set_model(self, model: Any, n_ctx: int | None = None) -> None:
        """The server's model is the only one (the documents were sent with its tokens)."""
        if model is not self.model:
            raise RuntimeError("a remote engine's model is the server's")
        self.close_all()

    def close_all(self) -> None:
        self.sessions.clear()
        self.chosen.clear()
        self.fed.clear()
        self.saved.clear()

    # -- what the features ask ------------------------------------------------------------
    def top_next(self, uri: str, prompt: list[int], n: int, should_stop: ShouldStop,
                 focus: str | None = None) -> list[TopToken]:
        """The n likeliest next tokens after prompt, on the document's slot."""
        fitted = self.fit(prompt)
        top, timings = self.server.top_next(self.slot(uri, focus), fitted, n, should_stop)
        self._ran(uri, fitted, timings)
        self.fed[uri] = fitted
        self._note(uri, len(fitted), timings, request=True)
        return top

    def greedy(self, uri: str, prompt: list[int], n_predict: int, should_stop: ShouldStop,
               stop: list[str] | None = None, t_max_ms: int = 0) -> list[int]:
        """The greedy continuation of prompt on the document's slot (ended at a
        line break past ``t_max_ms`` where the API can)."""
        fitted = self.fit(prompt)
        [(tokens, timings)] = self.server.greedy([self.slot(uri)], [fitted], n_predict, should_stop, stop, t_max_ms)
        self._ran(uri, fitted, timings)
        st = self.stats.setdefault(uri, DocStats())
        st.generated_last += timings.predicted_n
        st.generated_total += timings.predicted_n
        return tokens

    def infill(self, key: str, prefix: str, suffix: str, n_predict: int, should_stop: ShouldStop,
               stop: list[str] | None = None, focus: str | None = None, t_max_ms: int = 0) -> list[int]:
        """The greedy middle between prefix and suffix (``/infill``) on the slot of ``key``
        (the document's FIM key: see the module's notes)."""
        slot = self.slot(key, focus)
        tokens, timings = self.server.infill(slot, prefix, suffix, n_predict, should_stop, stop, t_max_ms)
        self._ran(key, [], timings)
        self._note(key, timings.cache_n + timings.prompt_n, timings, request=True)
        st = self.stats[key]
        st.generated_last = timings.predicted_n
        st.generated_total += timings.predicted_n
        self.infill_total += 1
        return tokens

    def _ran(self, uri: str, prompt: list[int], timings: Timings) -> None:
        """Shared: the slot the engine ran the document's ``prompt`` on is
        where its next request goes (call before ``fed`` takes the prompt).
        One that no longer held the document (another client took it: under
        half of the tokens this client left there that the prompt shares were
        reused) is let go, and the engine chooses again."""
        if not self.shared or timings.slot < 0:
            return
        reusable = common_prefix(self.fed.get(uri, []), prompt)
        if uri in self.chosen and timings.cache_n < reusable // 2:
            del self.chosen[uri]
        else:
            self.chosen[uri] = timings.slot

    def _note(self, uri: str, tokens: int, timings: Timings, request: bool = False) -> None:
        """The tokens the server reused and evaluated for a document: what a
        keystroke costs the engine."""
        st = self.stats.setdefault(uri, DocStats())
        st.cached = tokens
        st.fed_total += timings.prompt_n
        if request:
            st.reused_last, st.fed_last, st.generated_last = timings.cache_n, timings.prompt_n, 0
            st.requests_total += 1
        st.syncs += not request

    def describe(self) -> dict[str, Any]:
        """For ``lsp-llm.stats``: which engine serves, its model, the slots in use, exactness."""
        return {"engine": self.server.api, "url": self.server.url, "model": self.model.name,
                "slots": self.max_sessions, "slots_in_use": len(self.sessions), "exact": self.exact,
                "infill": self.can_infill, "infill_requests": self.infill_total,
                "slot_files": self.slot_files, "saved_documents": len(self.saved)}


def slot_file(uri: str) -> str:
    """The file a document's slot is saved to on the server (a name the server accepts)."""
    return f"lsp-llm-{hashlib.sha256(uri.encode()).hexdigest()[:24]}.bin"


def _never() -> bool:
    return False
