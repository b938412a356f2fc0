"""``tbot-py wait``: block until a running daemon's services have reported (tbot.md §6).

Like ``tbot wait``, it long-polls the diagnostics server's ``/wait`` (or
``/wait/<service>``) with a 5 s timeout per request and backs off between
attempts (20 ms doubling, half jitter, at most 2 s), so it can be started before
the daemon is listening. Any 2xx answer is success: the readyz JSON goes to stdout.
"""

from __future__ import annotations

import http.client
import json
import random
import time
import urllib.error
import urllib.request
from urllib.parse import quote

import click

from tbot_py.errors import ConfigError, Error

REQUEST_TIMEOUT = 5.0
FIRST_BACKOFF = 0.02
MAX_BACKOFF = 2.0


@click.command("wait")
@click.option(
    "--diag-addr",
    required=True,
    help="The daemon's diagnostics address host:port (its --diag-addr).",
)
@click.option("--service", help="Wait for this service only (default: every service).")
@click.option(
    "--timeout",
    "timeout_text",
    default="30s",
    show_default=True,
    help="Give up after this long (Go syntax: 30s, 2m).",
)
def wait(diag_addr: str, service: str | None, timeout_text: str) -> None:
    """Wait until the daemon's services have reported, then print their status."""
    from tbot_py.config.duration import InvalidDurationError, parse_duration

    try:
        timeout = parse_duration(timeout_text).total_seconds()
    except InvalidDurationError as exc:
        raise ConfigError(f"--timeout: {exc}") from None
    url = wait_url(diag_addr, service)
    body = poll_until_reported(url, timeout, timeout_text=timeout_text)
    click.echo(body.decode("utf-8", errors="replace"))


def wait_url(diag_addr: str, service: str | None) -> str:
    """``http://<diag_addr>/wait[/<service>]``, with the address checked."""
    from tbot_py.diagnostics.http import parse_listen_address

    host, port = parse_listen_address(diag_addr.removeprefix("http://").rstrip("/"))
    if not host:
        host = "127.0.0.1"  # ":3001" listens everywhere, loopback included
    elif ":" in host:
        host = f"[{host}]"
    path = "/wait" if service is None else "/wait/" + quote(service, safe="")
    return f"http://{host}:{port}{path}"


def poll_until_reported(url: str, timeout: float, *, timeout_text: str | None = None) -> bytes:
    """GET ``url`` until it answers 2xx and return the body; raise ``Error`` after ``timeout`` s."""
    # The diagnostics address is local: an operator's http_proxy must not apply.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    backoff = FIRST_BACKOFF
    last = "no answer yet"
    while True:
        remaining = deadline - time.monotonic()
        try:
            with opener.open(url, timeout=max(min(REQUEST_TIMEOUT, remaining), 0.05)) as answer:
                return bytes(answer.read())
        except urllib.error.HTTPError as exc:
            last = describe_answer(exc.code, exc.read())
        except urllib.error.URLError as exc:
            last = f"cannot connect: {exc.reason}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"no answer: {exc or type(exc).__name__}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            shown = timeout_text or f"{timeout:g}s"
            raise Error(f"timed out after {shown} waiting for {url}; last status: {last}")
        # Half jitter: uniform in [backoff/2, backoff). Not a secret, so plain random.
        time.sleep(min(random.uniform(backoff / 2, backoff), remaining))  # noqa: S311
        backoff = min(backoff * 2, MAX_BACKOFF)


def describe_answer(status: int, body: bytes) -> str:
    """One line for a non-2xx answer: the overall status and each unhealthy service."""
    text = body.decode("utf-8", errors="replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return f"HTTP {status}: {' '.join(text.split())[:200]}"
    if "error" in document:
        return f"HTTP {status}: {document['error']}"
    parts = [_describe_service(None, document)]
    services = document.get("services")
    if isinstance(services, dict):
        parts += [
            _describe_service(name, svc)
            for name, svc in sorted(services.items())
            if isinstance(svc, dict) and svc.get("status") != "healthy"
        ]
    return f"HTTP {status}: " + "; ".join(parts)


def _describe_service(name: str | None, document: dict[str, object]) -> str:
    described = str(document.get("status", "unknown"))
    if name is not None:
        described = f"{name} {described}"
    reason = document.get("reason")
    return f"{described} ({reason})" if reason else described
