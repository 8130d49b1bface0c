"""LSP over stdin/stdout with no thread between the pipe and the event loop.

pygls reads stdin through its thread pool: one hop to a worker thread and
back for every header line and body, three a message. While llama.cpp keeps
both cores busy, each hop waits for the scheduler, and a keystroke's
``didChange`` plus the request after it paid milliseconds for it. Here an
asyncio pipe reader feeds pygls's own message loop (``pygls.io_.run_async``)
straight from epoll. When stdin is not a pipe (a file, say), pygls's reader
serves instead.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

from pygls.io_ import StdoutWriter, run_async
from pygls.lsp.server import LanguageServer

log = logging.getLogger(__name__)

READ_LIMIT = 1 << 24  # bytes a header line may take before the reader gives up


class _NotAPipe(Exception):
    pass


class _PipeReader:
    """pygls's reader interface over an asyncio stream: at the end of input,
    what was read (as a file's read would), not an exception."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.stream = stream

    async def readline(self) -> bytes:
        return await self.stream.readline()

    async def readexactly(self, n: int) -> bytes:
        try:
            return await self.stream.readexactly(n)
        except asyncio.IncompleteReadError as e:
            return e.partial


def serve(server: LanguageServer) -> None:
    """Serve LSP on this process's stdin and stdout until exit or end of input."""
    try:
        asyncio.run(_serve_pipe(server))
    except _NotAPipe as e:
        log.info("stdin is not a pipe (%s): reading it through a thread", e.__cause__)
        server.start_io()
    except BrokenPipeError:
        log.error("the client closed the connection; shutting down")
    except (KeyboardInterrupt, SystemExit):  # `exit` ends the process with sys.exit
        pass
    finally:
        server.shutdown()


async def _serve_pipe(server: LanguageServer) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    except (ValueError, OSError) as e:  # "Pipe transport is only for pipes, sockets and character devices"
        raise _NotAPipe() from e
    server.protocol.set_writer(StdoutWriter(sys.stdout.buffer))
    await run_async(stop_event=threading.Event(), reader=_PipeReader(reader), protocol=server.protocol,
                    error_handler=server.report_server_error)  # (pygls's logger for its own lines)
