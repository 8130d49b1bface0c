"""Requests as engine jobs: the newest request wins, and no request waits
long for a read.

- A request for a document supersedes the older request of the same kind
  for it that is still waiting or running: the older one stops at its next
  decode boundary and is answered at once (``None``: the handler answers an
  empty, incomplete list), and the engine moves on to the new text.
- A request carries a deadline (its budget from arrival). A long read of
  its document (after an edit far above the cursor, or a big file's first
  open: as many tokens as report ``$/progress``) still going then stops the
  request, which answers ``None``, while the read goes on as a background
  sync with progress. Short reads and generation are always waited for.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from ..engine.pool import LongRead
from ..engine.scheduler import Engine
from ..engine.session import Cancelled

log = logging.getLogger(__name__)

T = TypeVar("T")
Key = tuple[str, str]  # (document uri, kind of request)


@dataclass
class Ticket:
    """A request's handle on its engine job."""

    deadline: float | None  # time.monotonic() after which a long read is left to the background
    cancel: threading.Event = field(default_factory=threading.Event)
    superseded: bool = False
    created: float = field(default_factory=time.monotonic)

    def age_ms(self) -> float:
        return (time.monotonic() - self.created) * 1000

    def should_stop(self) -> bool:
        return self.cancel.is_set()


class Latest:
    """One live engine job per (document, kind): the newest request's."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._live: dict[Key, Ticket] = {}

    def supersede(self, key: Key, budget_s: float | None = None) -> Ticket:
        """A ticket for the newest request; the older one's job stops."""
        ticket = Ticket(None if budget_s is None else time.monotonic() + budget_s)
        old = self._live.get(key)
        if old is not None:
            old.superseded = True
            old.cancel.set()
        self._live[key] = ticket
        return ticket

    async def run(self, key: Key, fn: Callable[[Ticket], T], budget_s: float | None) -> T | None:
        """Run fn(ticket) on the engine thread. None when a newer request
        replaced this one, or when its long read outlasted the budget.
        Raises CancelledError if the client cancelled."""
        ticket = self.supersede(key, budget_s)
        fut: Future[T] = self.engine.submit(lambda: fn(ticket), ticket.cancel)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # the client cancelled: stop the engine between decode calls
            ticket.cancel.set()
            log.debug("%s request for %s cancelled by the client after %.0f ms", key[1], key[0], ticket.age_ms())
            raise
        except LongRead:
            return None
        except Cancelled:
            if ticket.superseded:
                log.debug("%s request for %s superseded after %.0f ms", key[1], key[0], ticket.age_ms())
                return None
            raise asyncio.CancelledError() from None
        finally:
            if self._live.get(key) is ticket:
                del self._live[key]
