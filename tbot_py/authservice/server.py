"""Running the auth service: TLS context, listening socket, foreground and in-thread modes.

On every start the server gets a fresh HTTPS key and certificate from the host
CA (saved in the data directory), so clients that pinned the host CA trust it.
Client certificates are optional at the TLS layer (the token join has none)
and, when present, must chain to the user CA; the handlers decide which
endpoints need one.

With ``workers`` > 1 the process binds the socket, then forks that many worker
processes that all accept on it, each with its own event loop, and supervises
them: SIGTERM or SIGINT stops them all, and if one dies the others are stopped
and ``serve`` fails. This is safe because every storage operation is one
transaction on its own connection (SQLite's locking or PostgreSQL's serialise
them across processes) and audit lines are single ``O_APPEND`` writes. What is
per worker: the join rate limiter, which lives in memory, so one source may make
up to ``workers`` times ``--join-rate`` attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import NoReturn

from aiohttp import web

from tbot_py.authservice.app import Clock, create_app, utc_now
from tbot_py.authservice.cluster import (
    Cluster,
    ServerCredentials,
    open_cluster,
    write_server_credentials,
)
from tbot_py.authservice.errors import AuthServiceError, BadParameter
from tbot_py.authservice.ratelimit import DEFAULT_JOIN_RATE, Rate, SourceRateLimiter

log = logging.getLogger("tbot_py.authservice")

#: How long stopping waits for in-flight requests.
SHUTDOWN_TIMEOUT_S = 2.0
START_TIMEOUT_S = 30.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def parse_host_port(value: str, *, what: str, port_required: bool = True) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); BadParameter naming ``what`` otherwise.

    Without ``port_required`` a bare host (or bare IPv6 address) is accepted and the port is 0.
    """
    text = value.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if closed and rest.startswith(":"):
            port_text = rest[1:]
        elif not closed or rest:
            host = ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:  # a bare name, or an unbracketed IPv6 address
        host = text
    if port_text is None and not port_required:
        port_text = "0"
    if not host or not port_text or not port_text.isdigit() or int(port_text) > 65535:
        form = "HOST:PORT" if port_required else "HOST[:PORT]"
        raise BadParameter(f"invalid {what} {value!r}: use {form}, e.g. 127.0.0.1:3025")
    return host, int(port_text)


def format_host_port(host: str, port: int) -> str:
    """``host:port``, bracketing IPv6 addresses."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def server_tls_context(cluster: Cluster, creds: ServerCredentials) -> ssl.SSLContext:
    """TLS 1.2+, our host-CA certificate, and optional client certificates from the user CA."""
    ctx = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cadata=cluster.cas.user.cert_pem.decode()
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_cert_chain(creds.cert_path, creds.key_path)
    # No TLS 1.3 session tickets: clients (ours keep connections alive) do not resume,
    # and the tickets a server sends after a client certificate is verified are small
    # writes that, with Nagle's algorithm and delayed ACKs, held each response back ~40 ms.
    ctx.num_tickets = 0
    return ctx


class _Listener:
    """A bound socket plus everything derived from its address."""

    def __init__(self, listen: str, public_addrs: Sequence[str]) -> None:
        self.host, port = parse_host_port(listen, what="--listen address")
        self.public_hosts = [
            parse_host_port(a, what="--public-addr", port_required=False)[0] for a in public_addrs
        ]
        self.public_addrs = list(public_addrs)
        try:
            infos = socket.getaddrinfo(
                self.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, sockaddr = infos[0]
            self.sock = socket.create_server(sockaddr, family=family)
            # Accepted connections inherit it: a response's small writes go out at once
            # instead of waiting on the client's delayed ACK.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise BadParameter(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        bound = self.sock.getsockname()
        self.addr = format_host_port(str(bound[0]), int(bound[1]))

    @property
    def sans(self) -> list[str]:
        return [self.host, *self.public_hosts, socket.gethostname()]

    @property
    def public_addr(self) -> str:
        return self.public_addrs[0] if self.public_addrs else self.addr


async def _run(
    cluster: Cluster,
    listener: _Listener,
    stop: asyncio.Event,
    on_ready: Callable[[str], None],
    clock: Clock,
    *,
    join_rate: Rate,
    creds: ServerCredentials | None = None,
) -> None:
    try:
        if creds is None:
            creds = write_server_credentials(cluster, listener.sans)
        ctx = server_tls_context(cluster, creds)
        app = create_app(
            cluster,
            public_addr=listener.public_addr,
            clock=clock,
            join_limiter=SourceRateLimiter(join_rate),
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.SockSite(
                runner, listener.sock, ssl_context=ctx, shutdown_timeout=SHUTDOWN_TIMEOUT_S
            )
            await site.start()
            log.info(
                "auth service for cluster %s listening on https://%s (joins limited to %s "
                "per source address)",
                cluster.name,
                listener.addr,
                join_rate,
            )
            on_ready(listener.addr)
            await stop.wait()
            log.info("auth service stopping")
        finally:
            await runner.cleanup()
    finally:
        listener.sock.close()


def write_admin_identity(cluster: Cluster, path: Path) -> None:
    """Write a fresh 12h admin identity for the OS user running us to ``path`` (0600, atomic)."""
    from tbot_py.authservice import admin, audit
    from tbot_py.destinations.fs import open_directory, write_file_atomic
    from tbot_py.identity import keys

    os_user = str(audit.local_admin_actor()["user"])
    data = admin.render_admin_identity(
        cluster.cas, os_user, keys.generate_private_key(), now=utc_now()
    )
    os.close(open_directory(path.parent, "insecure", create=True))
    write_file_atomic(path, data)
    log.info("wrote the admin identity of %s to %s", admin.admin_username(os_user), path)


def serve(
    data_dir: Path,
    listen: str,
    *,
    cluster_name: str | None = None,
    public_addrs: Sequence[str] = (),
    join_rate: Rate = DEFAULT_JOIN_RATE,
    storage: str | None = None,
    admin_identity: Path | None = None,
    workers: int = 1,
) -> None:
    """Run the auth service in the foreground until SIGTERM or SIGINT.

    When it is listening, print one JSON line ``{"addr": ..., "ca_pin": ...}``
    on stdout. Raises AuthServiceError for a bad address or data directory.
    ``join_rate`` limits join attempts per source address (per worker);
    ``storage``, a ``postgres://`` URL, shares the state and CAs with other
    replicas. ``admin_identity``, when set, gets a fresh admin identity file on
    every start. ``workers`` > 1 serves from that many forked processes.
    """
    if workers < 1:
        raise BadParameter(f"invalid --workers {workers}: use 1 or more")
    cluster = open_cluster(data_dir, cluster_name=cluster_name, storage=storage)
    listener = _Listener(listen, public_addrs)
    if admin_identity is not None:
        write_admin_identity(cluster, admin_identity)

    def ready(addr: str) -> None:
        sys.stdout.write(json.dumps({"addr": addr, "ca_pin": cluster.ca_pin}) + "\n")
        sys.stdout.flush()

    if workers > 1:
        _serve_forked(cluster, listener, workers, ready, join_rate=join_rate)
        return

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await _run(cluster, listener, stop, ready, utc_now, join_rate=join_rate)

    asyncio.run(main())


def _serve_forked(
    cluster: Cluster,
    listener: _Listener,
    workers: int,
    on_ready: Callable[[str], None],
    *,
    join_rate: Rate,
) -> None:
    """Fork ``workers`` processes serving ``listener``'s socket; return when all have stopped."""
    creds = write_server_credentials(cluster, listener.sans)
    ready_r, ready_w = os.pipe()
    live: set[int] = set()
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # Stop signals wait until every worker is forked and our handler is in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        for _ in range(workers):
            pid = os.fork()
            if pid == 0:
                os.close(ready_r)
                _worker(cluster, listener, creds, ready_w, join_rate)
            live.add(pid)
        for sig in _STOP_SIGNALS:
            signal.signal(sig, stop_all)
    except BaseException:  # fork failed: leave no worker behind
        stop_all()
        for pid in live:
            os.waitpid(pid, 0)
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)
        listener.sock.close()  # only the workers accept
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    # One byte from each worker once it listens; end of file first means one died.
    with os.fdopen(ready_r, "rb") as ready:
        started = len(ready.read(workers))
    if started == workers and not stopping:
        on_ready(listener.addr)
    failed = None
    while live:
        pid, status = os.wait()
        live.discard(pid)
        if not stopping:
            failed = (
                f"auth service worker {pid} exited with status {os.waitstatus_to_exitcode(status)}"
            )
            log.error("%s; stopping the others", failed)
            stop_all()
    if failed is not None:
        raise AuthServiceError(failed)


def _worker(
    cluster: Cluster,
    listener: _Listener,
    creds: ServerCredentials,
    ready_fd: int,
    join_rate: Rate,
) -> NoReturn:
    """One forked worker: serve until SIGTERM or SIGINT, then exit without returning."""
    code = 0
    try:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

        def ready(addr: str) -> None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in _STOP_SIGNALS:
                loop.add_signal_handler(sig, stop.set)
            await _run(cluster, listener, stop, ready, utc_now, join_rate=join_rate, creds=creds)

        asyncio.run(main())
    except BaseException:
        log.exception("auth service worker %d failed", os.getpid())
        code = 1
    finally:
        os._exit(code)  # never run the parent's cleanup twice


class RunningAuthService:
    """An auth service running on its own event loop in a daemon thread.

    ``addr`` is the bound ``host:port``; ``stop()`` (or leaving the ``with``
    block) shuts it down and waits for the thread.
    """

    def __init__(
        self, cluster: Cluster, listener: _Listener, clock: Clock, join_rate: Rate
    ) -> None:
        self.cluster = cluster
        self.cluster_name = cluster.name
        self.ca_pin = cluster.ca_pin
        self.data_dir = cluster.data_dir
        self.addr = listener.addr
        self._listener = listener
        self._clock = clock
        self._join_rate = join_rate
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="tbot-py-auth", daemon=True)

    def _start(self) -> None:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("auth service did not start in time")
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await _run(
                self.cluster,
                self._listener,
                self._stop,
                self._on_ready,
                self._clock,
                join_rate=self._join_rate,
            )

        try:
            asyncio.run(main())
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("auth service thread failed")
        finally:
            self._ready.set()

    def _on_ready(self, addr: str) -> None:
        self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the thread to end."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> RunningAuthService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(
    data_dir: Path,
    listen: str = "127.0.0.1:0",
    cluster_name: str | None = None,
    *,
    public_addrs: Sequence[str] = (),
    clock: Clock = utc_now,
    join_rate: Rate = DEFAULT_JOIN_RATE,
    storage: str | None = None,
) -> RunningAuthService:
    """Start the auth service in a background thread; return once it is listening.

    For the demo and tests. ``clock`` replaces the real time in request handling;
    ``join_rate`` limits join attempts per source address; ``storage`` as for :func:`serve`.
    """
    cluster = open_cluster(data_dir, cluster_name=cluster_name, storage=storage)
    service = RunningAuthService(cluster, _Listener(listen, public_addrs), clock, join_rate)
    service._start()
    return service
