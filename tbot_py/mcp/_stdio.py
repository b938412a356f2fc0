"""The connector's end towards the MCP client: this process's stdin and stdout as streams."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import threading
from typing import Any, Protocol

from tbot_py.mcp import tunnel


class ClientOut(Protocol):
    """Where lines for the MCP client go (an asyncio StreamWriter on stdout fits)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


async def open_stdio() -> tuple[asyncio.StreamReader, ClientOut]:
    """Streams on this process's stdin and stdout, whatever they are.

    Pipes and sockets go through the event loop; files, terminals and /dev/null,
    which epoll cannot watch, are read in a thread and written blocking.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=tunnel.stream_limit())
    stdin = os.fdopen(os.dup(sys.stdin.fileno()), "rb", buffering=0)
    if _is_pipe(stdin.fileno()):
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    else:
        threading.Thread(target=_feed, args=(loop, reader, stdin), daemon=True).start()
    stdout = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    if not _is_pipe(stdout.fileno()):
        return reader, _FileOut(stdout)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, stdout)
    return reader, asyncio.StreamWriter(transport, protocol, None, loop)


def _is_pipe(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _feed(loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader, file: Any) -> None:
    while chunk := file.read(65536):
        loop.call_soon_threadsafe(reader.feed_data, chunk)
    loop.call_soon_threadsafe(reader.feed_eof)


class _FileOut:
    """Blocking writes to a regular file, which the event loop cannot watch."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: bytes) -> None:
        self._file.write(data)

    async def drain(self) -> None:
        return None
