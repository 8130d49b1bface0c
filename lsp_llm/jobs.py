"""Requests as engine jobs: the newest request wins, and no request waits
long for a read.

- A request for a document supersedes the older request of the same kind
  for it that is still waiting or running: the older one stops at its next
  decode boundary and is answered at once (``None``: the handler answers an
  empty, incomplete list), and the engine moves on to the new text.
- A request waits at most its budget for the document's session to be read
  (after an edit far above the cursor, or a big file's first open). Then it
  answers ``None`` while the read goes on as a background sync, with
  ``$/progress``; generation, once the read is done, is always waited for.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from .engine import Engine
from .session import Cancelled

log = logging.getLogger(__name__)

T = TypeVar("T")
Key = tuple[str, str]  # (document uri, kind of request)


@dataclass
class Ticket:
    """A request's handle on its engine job."""

    cancel: threading.Event = field(default_factory=threading.Event)
    fed: threading.Event = field(default_factory=threading.Event)  # the session holds the prompt
    superseded: bool = False

    def should_stop(self) -> bool:
        return self.cancel.is_set()


class Latest:
    """One live engine job per (document, kind): the newest request's."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._live: dict[Key, Ticket] = {}

    def supersede(self, key: Key) -> Ticket:
        ticket = Ticket()
        old = self._live.get(key)
        if old is not None:
            old.superseded = True
            old.cancel.set()
        self._live[key] = ticket
        return ticket

    async def run(self, key: Key, fn: Callable[[Ticket], T], budget_s: float | None) -> T | None:
        """Run fn(ticket) on the engine thread. None when a newer request
        replaced this one, or when the read outlasted the budget. Raises
        CancelledError if the client cancelled."""
        ticket = self.supersede(key)
        fut: Future[T] = self.engine.submit(lambda: fn(ticket), ticket.cancel)
        waiting = asyncio.wrap_future(fut)
        try:
            await asyncio.wait({waiting}, timeout=budget_s)
            if not waiting.done() and not ticket.fed.is_set():
                log.info("%s: the read outlasts %.1f s; answering empty while it goes on", key[0], budget_s or 0)
                ticket.cancel.set()  # the background sync takes the read over
                waiting.add_done_callback(_consume)
                return None
            return await waiting
        except asyncio.CancelledError:  # the client cancelled: stop the engine between decode calls
            ticket.cancel.set()
            raise
        except Cancelled:
            if ticket.superseded:
                return None
            raise asyncio.CancelledError() from None
        finally:
            if self._live.get(key) is ticket:
                del self._live[key]


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" warning
