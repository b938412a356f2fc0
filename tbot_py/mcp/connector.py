"""The stdio connector behind ``tbot-py mcp connect``: an MCP client's stdio to the access proxy.

The MCP client runs the connector as its stdio server. The connector opens an mTLS
connection to the access proxy (ALPN :data:`tunnel.ALPN`, the bot's certificate from
its identity file, the proxy checked against the file's CAs), sends the hello for one
app and then copies JSON-RPC lines both ways (:class:`Bridge`).

The identity file is renewed on disk by tbot-py every few minutes, and the proxy ends
a session when its certificate expires. So the bridge keeps the MCP session alive
across connections, make-before-break: on a new identity it opens a new connection,
replays the client's ``initialize`` (with a private id whose answer the client never
sees) and ``notifications/initialized``, sends new messages there and lets the old
connection finish the requests it carries. Once a session's end (the hello answer's
``expires``) passes, new messages wait for a new connection instead of going into a
session the proxy is closing. A lost connection is redialled with backoff; each
request that was in flight on it is answered with an error, never dropped. Logs go
to stderr only; stdout belongs to the MCP protocol.

This module must stay light (no aiohttp, no auth service, no authz): the MCP client
starts it for every session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tbot_py.errors import Error
from tbot_py.mcp import tunnel
from tbot_py.mcp._stdio import ClientOut, open_stdio
from tbot_py.mcp.dial import (
    POLL_INTERVAL_S,
    ProxyAddress,
    ProxyError,
    open_tunnel,
    watch_identity,
)

log = logging.getLogger(__name__)

#: The JSON-RPC error a request in flight on a lost connection is answered with.
LOST_CODE = -32000
LOST_MESSAGE = "connection to the access proxy was lost; retry the request"
#: How long a new connection may take to answer the replayed ``initialize``.
REPLAY_TIMEOUT_S = 30.0
#: Requests sent while reconnecting wait through this many failed attempts (about 3 s
#: of backoff: a renewed identity often lands just as the old session expires), then
#: each further failure answers them with the error.
PATIENT_ATTEMPTS = 4
#: How long requests still in flight may take to be answered once stdin has closed.
EOF_GRACE_S = 2.0

Payload = Any  # one JSON-RPC message (dict) or a batch (list), as decoded
#: An open session: its streams and when the proxy will end it (None: not said).
Tunnel = tuple[asyncio.StreamReader, asyncio.StreamWriter, datetime | None]
Dial = Callable[[], Awaitable[Tunnel]]
Clock = Callable[[], datetime]


@dataclass(frozen=True)
class Backoff:
    """The wait before the next reconnect attempt: doubles from ``delay`` up to ``limit``."""

    delay: float = 0.2
    limit: float = 5.0

    def next(self) -> Backoff:
        return Backoff(min(self.delay * 2, self.limit), self.limit)


class _Connection:
    """One connection to the proxy and the requests it carries."""

    def __init__(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.number = number
        self.reader = reader
        self.writer = writer
        self.in_flight: dict[str, Any] = {}  # key -> id of client requests not yet answered
        self.asked: set[str] = set()  # keys of server requests the client has not answered
        self.replay_id = ""
        self.replayed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.retiring = False
        self.ended = False

    def idle(self) -> bool:
        return not self.in_flight and not self.asked


class Bridge:
    """Copies JSON-RPC lines between the MCP client and the proxy, across reconnections.

    ``dial`` opens a fresh connection (hello answered ok) with the identity on disk at
    that moment; ``identity_changes`` yields when a renewal should switch connections.
    When a session's ``expires`` passes (by ``clock``) new messages go to a new
    connection: past that instant the proxy no longer serves them.
    """

    def __init__(
        self,
        client_in: asyncio.StreamReader,
        client_out: ClientOut,
        dial: Dial,
        identity_changes: AsyncIterator[None] | None = None,
        *,
        backoff: Backoff = Backoff(),
        clock: Clock = lambda: datetime.now(UTC),
    ) -> None:
        self._clock = clock
        self._in = client_in
        self._out = client_out
        self._dial = dial
        self._changes = identity_changes
        self._first_backoff = backoff
        self._connections: list[_Connection] = []
        self._current: _Connection | None = None
        self._waiting: list[Payload] = []  # client messages held while reconnecting
        self._initialize: dict[str, Any] | None = None
        self._initialized: dict[str, Any] | None = None
        self._switching = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._count = 0
        self._settled = asyncio.Event()  # set when no request is in flight anywhere
        self._done = asyncio.Event()  # stdin ended, stdout broke, or run() was cancelled
        self._client_gone = False

    async def run(self, first: Tunnel) -> int:
        """Bridge until the client closes stdin (or stdout); returns the exit code (0)."""
        self._current = self._add(*first)
        if self._changes is not None:
            self._spawn(self._follow_renewals(self._changes))
        reading = self._spawn(self._read_client())
        try:
            await self._done.wait()
            await self._finish(grace=not self._client_gone)
        finally:
            self._done.set()
            for task in list(self._tasks):
                task.cancel()
            for conn in list(self._connections):
                conn.writer.close()
            await asyncio.gather(reading, *self._tasks, return_exceptions=True)
        return 0

    # --- client -> proxy ---------------------------------------------------------

    async def _read_client(self) -> None:
        try:
            while (line := await tunnel.read_line(self._in)) is not None:
                await self._from_client(line)
        except tunnel.TunnelError as exc:
            log.warning("stopping: the MCP client sent %s", exc)
        finally:
            self._done.set()

    async def _from_client(self, line: bytes) -> None:
        try:
            payload = tunnel.decode_line(line)
        except tunnel.TunnelError:
            error = {"code": -32700, "message": "Parse error: the line is not JSON"}
            await self._to_client({"jsonrpc": "2.0", "id": None, "error": error})
            return
        messages = payload if isinstance(payload, list) else [payload]
        if any(_is_response(m) for m in messages):
            target = self._asker(messages)
            if target is None:
                log.debug("dropping a response to a server request of a closed connection")
                return
        else:
            target = self._route(messages)
            if target is None:
                self._waiting.append(payload)  # sent once reconnected, or failed
                return
        self._send(target, payload)
        with contextlib.suppress(OSError):  # a failed connection is handled by its pump
            await target.writer.drain()  # do not read stdin faster than the proxy takes it

    def _asker(self, messages: list[Any]) -> _Connection | None:
        """The connection whose server request a client response answers."""
        keys = {_key(m["id"]) for m in messages if _is_response(m)}
        return next((c for c in self._live() if keys & c.asked), None)

    def _route(self, messages: list[Any]) -> _Connection | None:
        """Where client requests go: the current connection (None while reconnecting).

        A cancellation follows the request it cancels.
        """
        for message in messages:
            if isinstance(message, dict) and message.get("method") == "notifications/cancelled":
                params = message.get("params")
                key = _key(params.get("requestId") if isinstance(params, dict) else None)
                owner = next((c for c in self._live() if key in c.in_flight), None)
                if owner is not None:
                    return owner
        return self._current

    def _send(self, conn: _Connection, payload: Payload) -> None:
        for message in payload if isinstance(payload, list) else [payload]:
            if not isinstance(message, dict):
                continue
            method = message.get("method")
            if "id" in message and method is None:
                conn.asked.discard(_key(message["id"]))
            elif "id" in message:
                conn.in_flight[_key(message["id"])] = message["id"]
                self._settled.clear()
                if method == "initialize":
                    self._initialize = message
            elif method == "notifications/initialized":
                self._initialized = message
        conn.writer.write(tunnel.encode_line(payload))
        self._retire_if_done(conn)

    # --- proxy -> client ---------------------------------------------------------

    async def _pump(self, conn: _Connection) -> None:
        try:
            while (line := await tunnel.read_line(conn.reader)) is not None:
                try:
                    payload = tunnel.decode_line(line)
                except tunnel.TunnelError:
                    log.warning("dropping a line from the access proxy that is not JSON")
                    continue
                payload = self._from_proxy(conn, payload)
                if payload is not None:
                    await self._to_client(payload)
                self._retire_if_done(conn)
        except (OSError, tunnel.TunnelError) as exc:
            if not conn.retiring:
                log.debug("connection %d to the access proxy failed: %s", conn.number, exc)
        finally:
            await self._ended(conn)

    def _from_proxy(self, conn: _Connection, payload: Payload) -> Payload | None:
        """``payload`` with the replayed initialize's answer removed; tracks ids."""
        batch = payload if isinstance(payload, list) else [payload]
        kept = []
        for message in batch:
            if isinstance(message, dict) and "id" in message:
                key = _key(message["id"])
                if "method" in message:
                    conn.asked.add(key)
                elif conn.replay_id and message["id"] == conn.replay_id:
                    if "error" in message:
                        log.warning("the access proxy refused the replayed initialize")
                    if not conn.replayed.done():
                        conn.replayed.set_result("error" not in message)
                    continue
                else:
                    conn.in_flight.pop(key, None)
            kept.append(message)
        self._update_settled()
        if not kept:
            return None
        return kept if isinstance(payload, list) else kept[0]

    async def _to_client(self, payload: Payload) -> None:
        if self._client_gone:
            return
        try:
            self._out.write(tunnel.encode_line(payload))
            await self._out.drain()
        except OSError as exc:  # the MCP client closed our stdout: nobody is listening
            log.debug("the MCP client stopped reading: %s", exc)
            self._client_gone = True
            self._done.set()

    # --- connections -------------------------------------------------------------

    def _add(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, expires: datetime | None
    ) -> _Connection:
        self._count += 1
        conn = _Connection(self._count, reader, writer)
        self._connections.append(conn)
        self._spawn(self._pump(conn))
        log.debug("connection %d to the access proxy is open until %s", conn.number, expires)
        # A session dialled after its end by our clock gets no timer: our clock is ahead
        # of the proxy's, and retiring it would only redial the same certificate again.
        if expires is not None and (left := (expires - self._clock()).total_seconds()) > 0:
            self._spawn(self._retire_at_expiry(conn, left))
        return conn

    async def _retire_at_expiry(self, conn: _Connection, delay: float) -> None:
        await asyncio.sleep(delay)
        if conn is self._current and not self._finishing():
            log.info("connection %d reached its session's end; reconnecting", conn.number)
            self._current = None
            conn.retiring = True
            self._retire_if_done(conn)
            self._spawn(self._reconnect())

    def _live(self) -> list[_Connection]:
        return [c for c in self._connections if not c.ended]

    async def _ended(self, conn: _Connection) -> None:
        conn.ended = True
        conn.writer.close()
        with contextlib.suppress(ValueError):
            self._connections.remove(conn)
        if not conn.replayed.done():
            conn.replayed.set_result(False)
        lost = list(conn.in_flight.values())
        conn.in_flight.clear()
        self._update_settled()
        if conn is self._current:
            self._current = None
            if not self._finishing():
                log.warning("lost the connection to the access proxy; reconnecting")
                self._spawn(self._reconnect())
        for request_id in lost:
            await self._answer_lost(request_id)

    async def _answer_lost(self, request_id: Any) -> None:
        error = {"code": LOST_CODE, "message": LOST_MESSAGE}
        await self._to_client({"jsonrpc": "2.0", "id": request_id, "error": error})

    def _retire_if_done(self, conn: _Connection) -> None:
        if conn is not self._current and conn.retiring and conn.idle() and not conn.ended:
            log.debug("connection %d drained; closing it", conn.number)
            conn.writer.close()

    async def _open_ready(self) -> _Connection:
        """A new connection that has answered the replayed initialize (ProxyError if not)."""
        conn = self._add(*await self._dial())
        if self._initialize is not None:
            conn.replay_id = f"tbot-py-connector-{uuid.uuid4().hex}"
            conn.writer.write(tunnel.encode_line({**self._initialize, "id": conn.replay_id}))
            try:
                ok = await asyncio.wait_for(asyncio.shield(conn.replayed), REPLAY_TIMEOUT_S)
            except TimeoutError:
                ok = False
            if not ok:
                conn.retiring = True
                conn.writer.close()
                raise ProxyError("the new connection did not accept the replayed initialize")
        if self._initialized is not None:
            conn.writer.write(tunnel.encode_line(self._initialized))
        return conn

    def _switch_to(self, conn: _Connection) -> None:
        old, self._current = self._current, conn
        if old is not None:
            old.retiring = True
            self._retire_if_done(old)
        waiting, self._waiting = self._waiting, []
        for payload in waiting:
            self._send(conn, payload)

    async def _follow_renewals(self, changes: AsyncIterator[None]) -> None:
        async for _ in changes:
            async with self._switching:
                if self._current is None:
                    continue  # the reconnect in progress dials with the new identity
                log.info("the identity file changed; moving to a new connection")
                try:
                    conn = await self._open_ready()
                except Error as exc:
                    log.warning("keeping the current connection: %s", exc)
                    continue
                self._switch_to(conn)

    async def _reconnect(self) -> None:
        backoff, failures = self._first_backoff, 0
        async with self._switching:
            while self._current is None and not self._finishing():
                try:
                    conn = await self._open_ready()
                except Error as exc:
                    log.warning("cannot reconnect (retrying in %.1fs): %s", backoff.delay, exc)
                    failures += 1
                    if failures >= PATIENT_ATTEMPTS:
                        await self._fail_waiting()
                    await asyncio.sleep(backoff.delay)
                    backoff = backoff.next()
                    continue
                log.warning("reconnected to the access proxy")
                self._switch_to(conn)

    async def _fail_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for payload in waiting:
            for message in payload if isinstance(payload, list) else [payload]:
                if isinstance(message, dict) and "id" in message and "method" in message:
                    await self._answer_lost(message["id"])

    # --- shutdown ----------------------------------------------------------------

    def _finishing(self) -> bool:
        return self._done.is_set()

    def _update_settled(self) -> None:
        if not any(c.in_flight for c in self._connections):
            self._settled.set()

    async def _finish(self, *, grace: bool) -> None:
        """Give requests in flight a moment to be answered, then fail what still waits."""
        self._update_settled()
        if grace:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), EOF_GRACE_S)
        await self._fail_waiting()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _is_response(message: Any) -> bool:
    return isinstance(message, dict) and "id" in message and "method" not in message


def _key(request_id: Any) -> str:
    """A dict key for a JSON-RPC id that keeps 1, "1" and true apart."""
    return json.dumps(request_id)


async def connect_stdio(proxy: ProxyAddress, identity_path: Path, app: str) -> int:
    """``tbot-py mcp connect``: :func:`run_connector` on this process's stdin and stdout."""
    client_in, client_out = await open_stdio()
    return await run_connector(proxy, identity_path, app, client_in, client_out)


async def run_connector(
    proxy: ProxyAddress,
    identity_path: Path,
    app: str,
    client_in: asyncio.StreamReader,
    client_out: ClientOut,
    *,
    poll_interval: float = POLL_INTERVAL_S,
) -> int:
    """Open a session with ``app`` (ProxyError if refused), then bridge until ``client_in`` ends."""
    hello = tunnel.Hello(app=app)

    async def dial() -> Tunnel:
        reader, writer, answer = await open_tunnel(proxy, identity_path, hello)
        try:
            expires = tunnel.parse_session_answer(answer).expires
        except tunnel.TunnelError as exc:
            writer.transport.abort()
            raise ProxyError(f"the access proxy at {proxy} answered: {exc}") from None
        return reader, writer, expires

    changes = watch_identity(identity_path, poll_interval)  # before the first read of the file
    first = await dial()
    return await Bridge(client_in, client_out, dial, changes).run(first)
