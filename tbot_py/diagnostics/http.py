"""The diagnostics HTTP server, compatible with tbot's ``--diag-addr`` (tbot.md §7.9).

Endpoints: ``/livez``, ``/readyz[/{service}]``, ``/wait[/{service}]`` and ``/metrics``.
It runs the standard library's threading server in a daemon thread: the daemon
does not depend on aiohttp, and a long-polling ``/wait`` must not block the
asyncio loop that does the renewals. Every answer is computed from the
``HealthRegistry``, which is thread-safe. The server binds where it is told;
the docs use 127.0.0.1, since the endpoints need no credentials.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from tbot_py.client.wire import format_time
from tbot_py.diagnostics.health import HealthRegistry, ServiceHealth, Status, overall_status
from tbot_py.errors import ConfigError

if TYPE_CHECKING:
    from datetime import datetime

    from tbot_py.diagnostics.metrics import Metrics

log = logging.getLogger("tbot_py.diagnostics.http")

#: The longest a /wait request is held before it answers like /readyz (as tbot does).
WAIT_CAP_SECONDS = 30.0

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"

NOT_FOUND_TEXT = """404 - Not Found

The bot is busy renewing what it holds;
the page you asked for was never enrolled.

Endpoints: /livez /readyz /readyz/{service} /wait /wait/{service} /metrics
See https://github.com/tbot-py/tbot-py for the diagnostics service.
"""

Response = tuple[int, str, bytes]


def parse_listen_address(addr: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6; an empty host means every address)."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"diagnostics address {addr!r} must be host:port, e.g. 127.0.0.1:3001")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


class DiagnosticsServer:
    """Serves the registry's health (and ``metrics``, when given) over HTTP."""

    def __init__(
        self,
        addr: str,
        registry: HealthRegistry,
        metrics: Metrics | None,
        *,
        wait_cap: float = WAIT_CAP_SECONDS,
    ) -> None:
        self._host, self._port = parse_listen_address(addr)
        self._addr = addr
        self.registry = registry
        self.metrics = metrics
        self.wait_cap = wait_cap
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Bind, start serving in a daemon thread and return the bound ``host:port``."""
        if self._httpd is not None:
            raise RuntimeError("diagnostics server already started")
        try:
            httpd = _Server((self._host, self._port), self)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on diagnostics address {self._addr}: {exc.strerror or exc}"
            ) from None
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="tbot-py-diagnostics",
            daemon=True,
        )
        self._thread.start()
        host, port = httpd.server_name, httpd.server_port
        bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("diagnostics service listening on http://%s", bound)
        return bound

    def stop(self) -> None:
        """Stop accepting requests and close the socket; a no-op if not started.

        A /wait request still being held finishes on its own (its thread is a
        daemon thread and answers at the latest after ``wait_cap``).
        """
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def respond(self, path: str) -> Response:
        """Status, content type and body for a GET of ``path`` (blocks for /wait)."""
        route, _, rest = urlsplit(path).path.lstrip("/").partition("/")
        service = unquote(rest) if rest else None
        if rest and "/" in rest:
            route = ""  # like tbot's {service}, a name is one path segment
        if route == "livez" and not rest:
            return 200, _TEXT, b"OK"
        if route == "readyz":
            return self._readyz(service)
        if route == "wait":
            if service is None or self.registry.get(service) is not None:
                self.registry.wait_reported(service, self.wait_cap)
            return self._readyz(service)
        if route == "metrics" and not rest and self.metrics is not None:
            return 200, self.metrics.content_type, self.metrics.render()
        return 404, _TEXT, NOT_FOUND_TEXT.encode()

    def _readyz(self, service: str | None) -> Response:
        if service is None:
            services = self.registry.snapshot()
            overall = overall_status(services)
            document: dict[str, Any] = {
                "status": overall.value,
                "services": {s.name: service_json(s) for s in services},
            }
            return _http_status(overall), _JSON, _json(document)
        health = self.registry.get(service)
        if health is None:
            return 404, _JSON, _json({"error": f"Service named {json.dumps(service)} not found."})
        return _http_status(health.status), _JSON, _json(service_json(health))


def service_json(health: ServiceHealth) -> dict[str, Any]:
    """One service's object in /readyz: tbot's keys, then ours (tbot clients ignore extras)."""
    document: dict[str, Any] = {"status": health.status.value}
    if health.reason:
        document["reason"] = health.reason
    document["updated_at"] = _time(health.updated_at)
    document["not_after"] = _time(health.not_after)
    document["next_renewal"] = _time(health.next_renewal)
    document["last_success"] = _time(health.last_success)
    document["consecutive_failures"] = health.consecutive_failures
    return document


def _time(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


def _http_status(status: Status) -> int:
    return 200 if status is Status.HEALTHY else 503


def _json(document: dict[str, Any]) -> bytes:
    # tbot writes json.MarshalIndent(v, "", "  "): two spaces, no trailing newline.
    return json.dumps(document, indent=2, ensure_ascii=False).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], diagnostics: DiagnosticsServer) -> None:
        self.diagnostics = diagnostics
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that can
        # stall start-up for seconds; the name is only used in CGI variables.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints these to stderr; a client hanging up is routine, a
        # failure of ours is a bug worth one warning line (the trace at debug).
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("diagnostics client %s: %s", client_address, error)
            return
        log.warning("diagnostics request from %s failed: %r", client_address, error)
        log.debug("diagnostics request failure", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "tbot-py"
    sys_version = ""
    # A client that stops sending must not hold a thread forever (tbot sets read timeouts too).
    timeout = 10

    def do_GET(self) -> None:
        """Answer a GET."""
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        """Answer a HEAD like the GET, without the body (probes sometimes use it)."""
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        status, content_type, body = self.server.diagnostics.respond(self.path)
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # A `tbot-py wait` gives up on a request after 5 s while /wait holds it for 30 s.
            log.debug("diagnostics client %s went away", self.client_address)

    def log_message(self, format: str, *args: Any) -> None:
        """Per-request lines go to debug, not to stderr."""
        log.debug("%s - %s", self.address_string(), format % args)
