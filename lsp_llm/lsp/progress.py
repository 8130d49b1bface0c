"""``$/progress`` for long work (model loads, long reads), when the client
supports it.

Every begin gets an end, whatever the order of events: a feed may end on the
engine before the client has answered ``window/workDoneProgress/create``;
the end then follows the begin at once. A client that never answers costs at
most ``CREATE_TIMEOUT_S`` and sees no progress; it never holds up the work.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from lsprotocol import types as t
from pygls.lsp.server import LanguageServer

log = logging.getLogger(__name__)

CREATE_TIMEOUT_S = 2.0


@dataclass
class Feed:
    """One long feed on the engine, as far as the client has been told."""

    title: str
    token: str | None = None  # once the client accepted it and begin was sent
    ended: bool = False


class ProgressReporter:
    def __init__(self, server: LanguageServer) -> None:
        self.server = server
        self.loop: asyncio.AbstractEventLoop | None = None
        self._feed: Feed | None = None  # engine thread: the feed now running

    def supported(self) -> bool:
        caps = self.server.client_capabilities
        return bool(caps and caps.window and caps.window.work_done_progress)

    async def begin(self, title: str) -> str | None:
        """A new token, created with the client and begun; None if the client
        does not support progress, refuses or does not answer in time."""
        if not self.supported():
            return None
        token = str(uuid.uuid4())
        create = asyncio.ensure_future(self.server.work_done_progress.create_async(token))
        done, _ = await asyncio.wait({create}, timeout=CREATE_TIMEOUT_S)
        if not done:
            log.debug("the client did not answer a progress token in %.0f s", CREATE_TIMEOUT_S)
            create.add_done_callback(_consume)  # a late answer is ignored
            return None
        if create.cancelled() or create.exception() is not None:
            log.debug("the client refused a progress token: %r", None if create.cancelled() else create.exception())
            return None
        self.server.work_done_progress.begin(token, t.WorkDoneProgressBegin(title=title, percentage=0))
        return token

    def end(self, token: str | None) -> None:
        if token is not None:
            self.server.work_done_progress.end(token, t.WorkDoneProgressEnd())
            # pygls keeps every token it saw (openlawlibrary/pygls#607): an
            # ended one is forgotten here, or a server up for days keeps them all
            self.server.work_done_progress.tokens.pop(token, None)

    @asynccontextmanager
    async def task(self, title: str) -> AsyncIterator[None]:
        token = await self.begin(title)
        try:
            yield
        finally:
            self.end(token)

    def from_engine(self, uri: str, done: int, total: int) -> None:
        """Engine thread: a long feed started (done=0), moved, or ended (-1).
        Feeds run one at a time, so the events between a start and an end
        are that feed's."""
        if self.loop is None:
            return
        if done == 0:
            self._feed = Feed(f"lsp-llm: reading {uri.rsplit('/', 1)[-1]} ({total} tokens)")
        feed = self._feed
        if feed is not None:
            self.loop.call_soon_threadsafe(self._on_feed, feed, done, total)
        if done < 0:
            self._feed = None

    def _on_feed(self, feed: Feed, done: int, total: int) -> None:
        if done == 0:
            asyncio.ensure_future(self._begin_feed(feed))
        elif done < 0:
            feed.ended = True
            self.end(feed.token)
        elif feed.token is not None:
            self.server.work_done_progress.report(
                feed.token, t.WorkDoneProgressReport(percentage=min(100, done * 100 // max(total, 1))))

    async def _begin_feed(self, feed: Feed) -> None:
        feed.token = await self.begin(feed.title)
        if feed.ended:  # it ended while the client was asked: end it now
            self.end(feed.token)


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" warning
