"""Transports to an MCP app's own server: a child process over stdio, or Streamable HTTP.

The access proxy opens one :class:`Upstream` per client session with
:func:`open_upstream` and passes JSON-RPC messages through it unchanged; authorization
happens before :meth:`Upstream.send` and after :meth:`Upstream.receive`, never here.

- ``mcp+stdio://``: the app's ``command`` and ``args`` run as a child process with the
  proxy's environment, one JSON value per line on stdin and stdout (MCP's stdio
  framing). Its stderr is logged, never forwarded to the client.
- ``mcp+http://`` and ``mcp+https://``: MCP's Streamable HTTP transport (spec
  2025-03-26 and 2025-06-18) at the URI without ``mcp+``. Each message is POSTed in its
  own task so a slow tool call does not hold up the others; answers come back as JSON
  or as an SSE stream. Once the session is initialized, a GET stream carries what the
  server sends on its own (when the server offers one). An HTTP failure becomes a
  JSON-RPC error for each request it concerned, so the client is always answered.

The headers given to :func:`open_upstream` (a rewritten ``Authorization`` carrying a
JWT) go on every HTTP request and are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tbot_py.client import wire
from tbot_py.mcp import tunnel

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)

#: A parsed JSON-RPC message, and what one line or one HTTP body carries: a message or a batch.
Message = dict[str, Any]
Payload = Message | list[Message]

STDIO_SCHEME = "mcp+stdio://"
HTTP_SCHEMES = ("mcp+http://", "mcp+https://")
#: JSON-RPC "internal error": what a request gets when the HTTP exchange carrying it failed.
INTERNAL_ERROR_CODE = -32603
#: How long close() waits for a stdio server after closing its stdin, and again after SIGTERM.
STOP_GRACE_S = 2.0
#: How long an HTTP upstream may take to accept a connection.
CONNECT_TIMEOUT_S = 10.0
SESSION_ID_HEADER = "Mcp-Session-Id"
PROTOCOL_VERSION_HEADER = "MCP-Protocol-Version"
_JSON = "application/json"
_SSE = "text/event-stream"
_INITIALIZED = "notifications/initialized"
_LOGGED_LINE_CHARS = 2000


class UpstreamError(Exception):
    """The app's MCP server cannot be started or is gone; the message is one line."""


class Upstream(Protocol):
    """One session's connection to an app's MCP server."""

    async def start(self) -> None:
        """Spawn the server or prepare the HTTP session; UpstreamError if that fails."""

    async def send(self, payload: Payload) -> None:
        """Pass one client message or batch on, in the order given."""

    async def receive(self) -> Payload | None:
        """The server's next message or batch; None once the upstream has ended."""

    async def close(self) -> None:
        """End the process or HTTP session; safe to call more than once."""


def open_upstream(app: wire.MCPApp, headers: Mapping[str, str], *, name_for_logs: str) -> Upstream:
    """The transport ``app.uri`` asks for (not started); ``headers`` apply to HTTP only."""
    uri = app.uri.lower()  # schemes are case-insensitive (RFC 3986 §3.1)
    if uri.startswith(STDIO_SCHEME):
        return StdioUpstream(app.command, app.args, name_for_logs=name_for_logs)
    if uri.startswith(HTTP_SCHEMES):
        url = app.uri[len("mcp+") :]
        return HttpUpstream(url, headers, name_for_logs=name_for_logs)
    raise UpstreamError(
        f'app "{name_for_logs}" has uri {app.uri!r}; an MCP app needs mcp+stdio://, '
        "mcp+http:// or mcp+https://"
    )


class StdioUpstream:
    """An MCP server run as a child process, spoken to over its stdin and stdout."""

    def __init__(
        self,
        command: str,
        args: Sequence[str],
        *,
        name_for_logs: str,
        grace_s: float = STOP_GRACE_S,
    ) -> None:
        self._command = command
        self._args = tuple(args)
        self._name = name_for_logs
        self._grace_s = grace_s
        self._process: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        if not self._command:
            raise UpstreamError(f'app "{self._name}" is mcp+stdio but has no mcp.command')
        try:
            self._process = await asyncio.create_subprocess_exec(
                self._command,
                *self._args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=tunnel.stream_limit(),
            )
        except OSError as exc:
            raise UpstreamError(
                f'cannot start the MCP server of app "{self._name}": '
                f"{self._command}: {exc.strerror or type(exc).__name__}"
            ) from None
        assert self._process.stderr is not None
        self._stderr_task = asyncio.create_task(self._log_stderr(self._process.stderr))

    async def send(self, payload: Payload) -> None:
        process = self._process
        if process is None or self._closed or process.returncode is not None:
            raise UpstreamError(f'the MCP server of app "{self._name}" is not running')
        assert process.stdin is not None
        try:
            process.stdin.write(tunnel.encode_line(payload))
            await process.stdin.drain()
        except ConnectionError:
            raise UpstreamError(f'the MCP server of app "{self._name}" is not running') from None

    async def receive(self) -> Payload | None:
        process = self._process
        if process is None or self._closed:
            return None
        assert process.stdout is not None
        while True:
            try:
                line = await tunnel.read_line(process.stdout)
            except tunnel.TunnelError as exc:
                logger.warning("%s: %s on stdout; ending the session", self._name, exc)
                return None
            if line is None:
                return None
            payload = _payload_or_none(line)
            if payload is not None:
                return payload
            logger.warning("%s: ignored a stdout line that is not a JSON-RPC message", self._name)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        if not await self._exited(process):
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            if not await self._exited(process):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._stderr_task is not None:
            # A grandchild may hold stderr open; its last lines are not worth waiting for.
            _, pending = await asyncio.wait({self._stderr_task}, timeout=self._grace_s)
            for task in pending:
                task.cancel()

    async def _exited(self, process: asyncio.subprocess.Process) -> bool:
        try:
            await asyncio.wait_for(process.wait(), self._grace_s)
        except TimeoutError:
            return False
        return True

    async def _log_stderr(self, stderr: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stderr.readline()
            except ValueError:  # longer than the stream's limit: dropped by readline
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text:
                logger.info("%s: %s", self._name, _printable(text))


class HttpUpstream:
    """An MCP server reached over Streamable HTTP at ``url``, with ``headers`` on every request."""

    def __init__(self, url: str, headers: Mapping[str, str], *, name_for_logs: str) -> None:
        self._url = url
        ours = {
            "accept",
            "content-type",
            SESSION_ID_HEADER.lower(),
            PROTOCOL_VERSION_HEADER.lower(),
        }
        self._headers = {k: v for k, v in headers.items() if k.lower() not in ours}
        self._name = name_for_logs
        self._session: aiohttp.ClientSession | None = None
        self._queue: asyncio.Queue[Payload | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        # A POST that opens the session or carries only notifications holds this until its
        # answer's headers arrive, so the next one goes out with the session id and after it.
        self._order = asyncio.Lock()
        self._session_id: str | None = None
        self._protocol_version: str | None = None
        self._initialize_ids: set[object] = set()
        self._stream_opened = False
        self._closed = False

    async def start(self) -> None:
        try:
            import aiohttp
        except ImportError:
            raise UpstreamError(
                f'app "{self._name}" is an HTTP MCP server, which needs aiohttp: '
                "install tbot-py[server]"
            ) from None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def send(self, payload: Payload) -> None:
        if self._session is None or self._closed:
            raise UpstreamError(f'the HTTP session with the MCP server of app "{self._name}" ended')
        self._spawn(self._post(payload))

    async def receive(self) -> Payload | None:
        payload = await self._queue.get()
        if payload is None:
            self._queue.put_nowait(None)  # every later receive() sees the end too
        return payload

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session = self._session
        if session is not None:
            if self._session_id is not None:
                await self._end_session(session)
            await session.close()
        self._queue.put_nowait(None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _request_headers(self, accept: str) -> dict[str, str]:
        headers = {**self._headers, "Accept": accept}
        if self._session_id is not None:
            headers[SESSION_ID_HEADER] = self._session_id
        if self._protocol_version is not None:
            headers[PROTOCOL_VERSION_HEADER] = self._protocol_version
        return headers

    async def _post(self, payload: Payload) -> None:
        import aiohttp

        assert self._session is not None
        messages = payload if isinstance(payload, list) else [payload]
        request_ids = [m["id"] for m in messages if "method" in m and _is_id(m.get("id"))]
        opens = [
            m["id"] for m in messages if m.get("method") == "initialize" and _is_id(m.get("id"))
        ]
        self._initialize_ids.update(opens)
        answered: set[object] = set()
        failure = ""
        holds_order = bool(opens) or not request_ids
        await self._order.acquire()
        try:
            if not holds_order:
                self._order.release()
            headers = {**self._request_headers(f"{_JSON}, {_SSE}"), "Content-Type": _JSON}
            body = json.dumps(payload, separators=(",", ":")).encode()
            async with self._session.post(self._url, data=body, headers=headers) as response:
                self._note_session_id(response)
                if holds_order:
                    holds_order = False
                    self._order.release()
                failure = await self._read_answer(response, bool(request_ids), answered)
            if not failure and any(m.get("method") == _INITIALIZED for m in messages):
                self._open_stream()
        except UpstreamError as exc:
            failure = f'the MCP server of app "{self._name}": {exc}'
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failure = f'cannot reach the MCP server of app "{self._name}": {_one_line(exc)}'
        except ValueError:  # aiohttp refusing a header; its text might quote a secret value
            failure = f'cannot send to the MCP server of app "{self._name}": a header is invalid'
        finally:
            if holds_order:
                self._order.release()
        missing = [msg_id for msg_id in request_ids if msg_id not in answered]
        if failure:
            logger.warning("%s", failure)
        if missing:
            errors = [_error_response(i, failure or self._unanswered()) for i in missing]
            for error in [errors] if isinstance(payload, list) else errors:
                self._queue.put_nowait(error)

    def _unanswered(self) -> str:
        return f'the MCP server of app "{self._name}" ended its answer without a response'

    async def _read_answer(
        self, response: aiohttp.ClientResponse, has_requests: bool, answered: set[object]
    ) -> str:
        """Queue what ``response`` carries; a one-line failure if it is an HTTP error."""
        if response.status >= 400:
            status = f"HTTP {response.status} {response.reason or ''}".rstrip()
            return f'the MCP server of app "{self._name}" answered {status}'
        content_type = response.content_type
        if response.status in (202, 204) or (
            not has_requests and content_type not in (_JSON, _SSE)
        ):
            return ""
        if content_type == _JSON:
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > tunnel.MAX_LINE_BYTES:
                    return f'the MCP server of app "{self._name}" answered too large a body'
            self._deliver(bytes(body), answered)
            return ""
        if content_type == _SSE:
            await self._read_events(response, answered)
            return ""
        return f'the MCP server of app "{self._name}" answered with content type {content_type!r}'

    async def _read_events(self, response: aiohttp.ClientResponse, answered: set[object]) -> None:
        decoder = SSEDecoder(tunnel.MAX_LINE_BYTES)
        async for chunk in response.content.iter_any():
            for data in decoder.feed(chunk):
                self._deliver(data, answered)

    def _deliver(self, data: bytes, answered: set[object]) -> None:
        payload = _payload_or_none(data)
        if payload is None:
            logger.warning("%s: ignored an answer that is not a JSON-RPC message", self._name)
            return
        for message in payload if isinstance(payload, list) else [payload]:
            if "method" in message or not _is_id(message.get("id")):
                continue
            answered.add(message["id"])
            if message["id"] in self._initialize_ids and isinstance(message.get("result"), dict):
                self._initialize_ids.discard(message["id"])
                version = message["result"].get("protocolVersion")
                if isinstance(version, str) and version:
                    self._protocol_version = version
        self._queue.put_nowait(payload)

    def _note_session_id(self, response: aiohttp.ClientResponse) -> None:
        session_id = response.headers.get(SESSION_ID_HEADER)
        if session_id and self._session_id is None:
            self._session_id = session_id

    def _open_stream(self) -> None:
        if not self._stream_opened and not self._closed:
            self._stream_opened = True
            self._spawn(self._listen())

    async def _listen(self) -> None:
        """Read the server's own messages from the GET stream, if the server offers one."""
        import aiohttp

        assert self._session is not None
        try:
            async with self._session.get(
                self._url, headers=self._request_headers(_SSE)
            ) as response:
                if response.status != 200 or response.content_type != _SSE:
                    logger.debug("%s: no server stream (HTTP %d)", self._name, response.status)
                    return
                await self._read_events(response, set())
        except (aiohttp.ClientError, OSError, TimeoutError, UpstreamError) as exc:
            logger.info("%s: the server stream ended: %s", self._name, _one_line(exc))

    async def _end_session(self, session: aiohttp.ClientSession) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=STOP_GRACE_S)
        try:
            async with session.delete(
                self._url, headers=self._request_headers(_JSON), timeout=timeout
            ):
                pass
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.debug("%s: ending the HTTP session failed: %s", self._name, _one_line(exc))


class SSEDecoder:
    """Splits a ``text/event-stream`` body into the data of its message events.

    Follows the WHATWG event-stream rules MCP relies on: ``data:`` lines join with
    newlines, a blank line ends an event, comments and ``id``/``retry`` are skipped,
    events of a type other than ``message`` are dropped. An event larger than ``limit``
    bytes is an UpstreamError.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._scanned = 0
        self._data: list[bytes] = []
        self._size = 0
        self._event_type = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of each event that ``chunk`` completes."""
        self._buffer += chunk
        events: list[bytes] = []
        while (end := self._buffer.find(b"\n", self._scanned)) >= 0:
            line = bytes(self._buffer[:end]).removesuffix(b"\r")
            del self._buffer[: end + 1]
            self._scanned = 0
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._scanned = len(self._buffer)
        if self._size + len(self._buffer) > self._limit:
            raise UpstreamError(f"an event on its stream is longer than {self._limit} bytes")
        return events

    def _line(self, line: bytes) -> bytes | None:
        if not line:
            data, event_type = self._data, self._event_type
            self._data, self._size, self._event_type = [], 0, b""
            if data and event_type in (b"", b"message"):
                return b"\n".join(data)
            return None
        field, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if field == b"data":
            self._data.append(value)
            self._size += len(value) + 1
        elif field == b"event":
            self._event_type = value
        return None


def _payload_or_none(data: bytes) -> Payload | None:
    """The message or batch ``data`` holds, or None if it is not JSON objects."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    return None


def _is_id(value: object) -> bool:
    """Whether ``value`` can be a JSON-RPC request id (a string or a number)."""
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _error_response(msg_id: object, message: str) -> Message:
    return {
        "jsonrpc": "2.0",
        "id": msg_id,
        "error": {"code": INTERNAL_ERROR_CODE, "message": message},
    }


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _printable(text: str) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return cleaned[:_LOGGED_LINE_CHARS]
