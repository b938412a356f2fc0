"""A small HTTP/1.1 client over asyncio streams and TLS, for one origin.

It does what :class:`tbot_py.client.http.AuthClient` needs and no more: requests
with an optional JSON body, responses delimited by Content-Length, chunked
encoding or the end of the connection, and a few idle keep-alive connections so
that concurrent renewals reuse their TLS sessions. Parsing is strict and bounded:
anything malformed or oversized raises :class:`HTTPProtocolError` with one line.

Failures surface as the exceptions asyncio raises (``ssl.SSLError``,
``TimeoutError``, ``ConnectionError`` and other ``OSError``), or
``HTTPProtocolError``; the caller turns them into user-facing errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

T = TypeVar("T")

MAX_LINE = 8 * 1024  # status, header and chunk-size lines
MAX_HEADERS = 100
MAX_BODY = 16 * 1024 * 1024
MAX_INFORMATIONAL = 10  # 1xx answers (103 Early Hints) before the real one
#: Idle connections kept per origin: the daemon renews up to 8 outputs at once.
MAX_IDLE = 8
_READ_SIZE = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [\t\x20-\x7e\x80-\xff]*)?")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,10}")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
#: Characters left as they are in a request target: RFC 3986 path and query characters, and
#: ``%`` so that a caller's own escapes are kept. Everything else is percent-encoded.
_TARGET_SAFE = "/?:@!$&'()*+,;=-._~%"


class HTTPProtocolError(Exception):
    """The server's answer is not HTTP/1.1 we accept; the message is one line about it."""


class _StaleConnection(Exception):
    """A reused connection failed before any byte of the answer arrived."""


@dataclass(frozen=True)
class Response:
    """A whole response. Header names are lower case; repeated headers are joined by ", "."""

    status: int
    headers: dict[str, str]
    body: bytes


def split_host_port(addr: str) -> tuple[str, int]:
    """``(host, port)`` from ``host:port`` or ``[v6]:port``; ValueError when malformed."""
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {addr!r}")
    return host, int(port)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def looks_alive(self) -> bool:
        """False once the server has closed the idle connection (or it broke)."""
        return not (
            self.reader.at_eof()
            or self.reader.exception() is not None
            or self.writer.transport.is_closing()
        )

    def abort(self) -> None:
        # No close_notify exchange: waiting on a peer that may be gone would delay exit,
        # and nothing is left to protect on a connection we are done with.
        self.writer.transport.abort()


class ConnectionPool:
    """HTTPS connections to one origin: a fresh one per request unless one is idle."""

    def __init__(self, addr: str, ctx: ssl.SSLContext, *, timeout: float, user_agent: str) -> None:
        self._host, self._port = split_host_port(addr)
        self._host_header = addr.removesuffix(":443")
        self._ctx = ctx
        self._timeout = timeout
        self._user_agent = user_agent
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    @property
    def is_closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    async def close(self) -> None:
        """Close every connection, idle or in use; later requests raise RuntimeError."""
        self._closed = True
        connections = list(self._open)
        self._open.clear()
        self._idle.clear()
        for conn in connections:
            conn.abort()
        for conn in connections:
            # Lets the transports finish closing inside the loop, so none is left for the
            # garbage collector to warn about. A connection that broke earlier re-raises here.
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        content_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request and read the whole answer, on an idle connection if there is one.

        ``headers`` are sent after the client's own; an ``Accept`` among them replaces
        ``Accept: */*``. A name or value that could split the head (CR, LF) is a ValueError.

        A reused connection that fails before the answer starts (the server closed it while
        it was idle) is replaced by a fresh one and the request sent once more; no other
        failure is retried.
        """
        if self._closed:
            raise RuntimeError("the HTTP client is closed")
        head = self._request_head(method, target, body, content_type, headers)
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, head, body)
            except _StaleConnection:
                pass
        return await self._exchange(await self._connect(), head, body)

    def _request_head(
        self,
        method: str,
        target: str,
        body: bytes | None,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        extra = dict(headers or {})
        for name, value in extra.items():
            # Never show the value: it is often a credential (Authorization).
            if not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
                raise ValueError(f"header {name[:40]!r} has a name or value that is not allowed")
        lines = [
            f"{method} {quote(target, safe=_TARGET_SAFE)} HTTP/1.1",
            f"Host: {self._host_header}",
            f"User-Agent: {self._user_agent}",
        ]
        if not any(name.lower() == "accept" for name in extra):
            lines.append("Accept: */*")
        lines += [f"{name}: {value}" for name, value in extra.items()]
        if body is not None:
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.looks_alive():
                return conn
            self._discard(conn)
        return None

    def _discard(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.abort()

    def _release(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            self._discard(conn)
            return
        conn.reused = True
        self._idle.append(conn)

    async def _connect(self) -> _Connection:
        async with asyncio.timeout(self._timeout):
            reader, writer = await asyncio.open_connection(
                self._host, self._port, ssl=self._ctx, server_hostname=self._host, limit=MAX_LINE
            )
        conn = _Connection(reader, writer)
        self._open.add(conn)
        return conn

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes | None) -> Response:
        """One request and its answer on ``conn``, which is released or discarded after."""
        try:
            status_line = await self._send(conn, head + (body or b""))
            response, keep_alive = await self._read_response(conn.reader, status_line)
        except BaseException:
            self._discard(conn)
            raise
        if keep_alive:
            self._release(conn)
        else:
            self._discard(conn)
        return response

    async def _send(self, conn: _Connection, request: bytes) -> bytes:
        """Write ``request`` and read the status line; _StaleConnection as described above."""
        try:
            conn.writer.write(request)
            await self._timed(conn.writer.drain())
            return await self._timed(_read_line(conn.reader))
        except asyncio.IncompleteReadError as exc:
            if conn.reused and not exc.partial:
                raise _StaleConnection from exc
            raise HTTPProtocolError(
                "the server closed the connection without sending a complete response"
            ) from None
        except ConnectionError as exc:
            if conn.reused:
                raise _StaleConnection from exc
            raise

    async def _read_response(
        self, reader: asyncio.StreamReader, status_line: bytes
    ) -> tuple[Response, bool]:
        """The answer whose status line was read, and whether the connection can be reused."""
        try:
            version, status, headers = await self._timed(_read_head(reader, status_line))
            informational = 0
            while 100 <= status < 200 and status != 101:
                informational += 1
                if informational > MAX_INFORMATIONAL:
                    raise HTTPProtocolError(f"more than {MAX_INFORMATIONAL} 1xx answers")
                line = await self._timed(_read_line(reader))
                version, status, headers = await self._timed(_read_head(reader, line))
            if status == 101:
                raise HTTPProtocolError("the server switched protocols (HTTP 101)")
            encoding = headers.get("content-encoding", "identity").lower()
            if encoding != "identity":
                raise HTTPProtocolError(f"response has Content-Encoding {encoding!r}")
            body, delimited = await self._read_body(reader, status, headers)
        except asyncio.IncompleteReadError:
            raise HTTPProtocolError(
                "the server closed the connection in the middle of the response"
            ) from None
        connection = {t.strip() for t in headers.get("connection", "").lower().split(",")}
        keep_alive = delimited and version == 1 and "close" not in connection
        return Response(status, headers, body), keep_alive

    async def _read_body(
        self, reader: asyncio.StreamReader, status: int, headers: dict[str, str]
    ) -> tuple[bytes, bool]:
        """The body, and whether the connection can carry another request after it."""
        if status in (204, 304):
            # No body by definition; not reused, in case the server sent one anyway.
            return b"", False
        transfer_encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if transfer_encoding is not None:
            if transfer_encoding.lower() != "chunked":
                raise HTTPProtocolError(f"unsupported Transfer-Encoding {transfer_encoding!r}")
            if length is not None:
                raise HTTPProtocolError("response has both Content-Length and Transfer-Encoding")
            return await self._read_chunked(reader), True
        if length is not None:
            if not _CONTENT_LENGTH.fullmatch(length):
                raise HTTPProtocolError(f"invalid Content-Length {length[:40]!r}")
            size = int(length)
            _check_size(size)
            return await self._timed(reader.readexactly(size)), True
        body = bytearray()
        while chunk := await self._timed(reader.read(_READ_SIZE)):
            body += chunk
            _check_size(len(body))
        return bytes(body), False

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            line = await self._timed(_read_line(reader))
            match = _CHUNK_SIZE.fullmatch(line)
            if match is None:
                raise HTTPProtocolError(f"invalid chunk size line {_show(line)}")
            size = int(match.group(1), 16)
            if size == 0:
                break
            _check_size(len(body) + size)
            body += await self._timed(reader.readexactly(size))
            if await self._timed(reader.readexactly(2)) != b"\r\n":
                raise HTTPProtocolError("chunk data is not followed by CRLF")
        await self._timed(_read_headers(reader))  # trailers: read to reach the end, unused
        return bytes(body)

    async def _timed(self, step: Awaitable[T]) -> T:
        """``step``, or TimeoutError after the client's timeout."""
        async with asyncio.timeout(self._timeout):
            return await step


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    """One line without its line ending (CRLF, or a bare LF as RFC 9112 allows)."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise HTTPProtocolError(f"a response line is longer than {MAX_LINE} bytes") from None
    return line[:-2] if line.endswith(b"\r\n") else line[:-1]


async def _read_head(
    reader: asyncio.StreamReader, status_line: bytes
) -> tuple[int, int, dict[str, str]]:
    """``(minor version, status, headers)`` of the head that starts with ``status_line``."""
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise HTTPProtocolError(f"invalid status line {_show(status_line)}")
    return int(match.group(1)), int(match.group(2)), await _read_headers(reader)


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = await _read_line(reader)
        if not line:
            return headers
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise HTTPProtocolError(f"invalid header line {_show(line)}")
        name = match.group(1).decode("ascii").lower()
        value = match.group(2).decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    raise HTTPProtocolError(f"more than {MAX_HEADERS} header lines")


def _check_size(size: int) -> None:
    if size > MAX_BODY:
        raise HTTPProtocolError(f"response body is larger than {MAX_BODY // 2**20} MiB")


def _show(line: bytes) -> str:
    """A received line, quoted and cut short, for an error message."""
    return repr(line[:60].decode("latin-1")) + ("..." if len(line) > 60 else "")
