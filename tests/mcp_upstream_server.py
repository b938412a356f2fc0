"""The MCP server the tests put behind the access proxy, built with the official ``mcp`` SDK.

Tools: ``get_weather(city)``, ``list_items()`` and ``delete_item(item_id)``. Each call
appends one JSON line ``{"tool", "arguments", "sub"}`` to the call log (``--call-log`` or
``MCP_CALL_LOG``), so a test can tell which calls reached the server and as whom
(``sub`` of the bearer JWT; "" over stdio). ``--test-tools`` adds tools the transport
tests need: ``hold(key)`` answers only once ``release(key)`` is called (two calls in
flight), ``exit_process()`` ends the server at once, ``notify_tools_changed()`` sends a
notification on the session's GET stream (once the client has opened it), and a DELETE
(the client ending its session) logs ``{"session_deleted": true}``. Tests start the HTTP
server with :func:`start_http_server`.

Over HTTP (``--transport http``) it serves the SDK's streamable HTTP app on 127.0.0.1
and prints one line ``{"url": "http://127.0.0.1:PORT/mcp"}`` on stdout once it accepts
connections. With ``--jwks-url`` every HTTP request must carry ``Authorization: Bearer
JWT`` that verifies (ES256) against that JWKS, fetched over HTTPS trusting only
``--ca-file``, with ``--audience`` and ``--issuer``; otherwise the answer is 401 and the
call log gets a line ``{"rejected": REASON}``.

    python tests/mcp_upstream_server.py --transport stdio|http [--port 0] [--call-log FILE]
        [--jwks-url URL --audience AUD --issuer ISS --ca-file PEM] [--json-response] [--test-tools]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import jwt
import uvicorn
from mcp.server.fastmcp import Context, FastMCP

ITEMS = ["apple", "pear", "plum"]
#: This file, for tests that run it as a command (``sys.executable SCRIPT ...``).
SCRIPT = Path(__file__).resolve()

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class CallLog:
    """Appends JSON lines to a file (or nowhere), one write and flush per line."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        if not self._path:
            return
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock, open(self._path, "a", encoding="utf-8") as out:
            out.write(line)
            out.flush()


def _header(ctx: Context[Any, Any, Any], name: str) -> str:
    """A header of the HTTP request behind this tool call ("" over stdio)."""
    headers = getattr(ctx.request_context.request, "headers", None)
    return "" if headers is None else str(headers.get(name, ""))


def bearer_sub(ctx: Context[Any, Any, Any]) -> str:
    """The ``sub`` of the request's bearer JWT (already verified by the middleware), else ""."""
    token = _bearer(_header(ctx, "authorization"))
    if not token:
        return ""
    claims = jwt.decode(token, options={"verify_signature": False})
    return str(claims.get("sub", ""))


def build_server(log: CallLog, *, json_response: bool, test_tools: bool) -> FastMCP:
    """The FastMCP server with the three tools (and the test-only ones when asked)."""
    mcp = FastMCP("tbot-py test upstream", json_response=json_response)
    held: dict[str, asyncio.Event] = {}

    def record(tool: str, ctx: Context[Any, Any, Any], **arguments: Any) -> None:
        log.write({"tool": tool, "arguments": arguments, "sub": bearer_sub(ctx)})

    @mcp.tool()
    def get_weather(city: str, ctx: Context[Any, Any, Any]) -> str:
        """The weather in a city."""
        record("get_weather", ctx, city=city)
        return f"Sunny in {city}"

    @mcp.tool()
    def list_items(ctx: Context[Any, Any, Any]) -> list[str]:
        """The items in the inventory."""
        record("list_items", ctx)
        return list(ITEMS)

    @mcp.tool()
    def delete_item(item_id: str, ctx: Context[Any, Any, Any]) -> str:
        """Delete one item from the inventory."""
        record("delete_item", ctx, item_id=item_id)
        return f"deleted {item_id}"

    if not test_tools:
        return mcp

    @mcp.tool()
    async def hold(key: str, ctx: Context[Any, Any, Any]) -> str:
        """Answer once release(key) has been called."""
        record("hold", ctx, key=key)
        await held.setdefault(key, asyncio.Event()).wait()
        return f"released {key}"

    @mcp.tool()
    def release(key: str, ctx: Context[Any, Any, Any]) -> str:
        """Let hold(key) answer."""
        record("release", ctx, key=key)
        held.setdefault(key, asyncio.Event()).set()
        return f"releasing {key}"

    @mcp.tool()
    def exit_process(ctx: Context[Any, Any, Any]) -> str:
        """End the server process at once, without answering."""
        record("exit_process", ctx)
        os._exit(0)

    @mcp.tool()
    async def notify_tools_changed(ctx: Context[Any, Any, Any]) -> str:
        """Send notifications/tools/list_changed on the GET stream once the client opened it."""
        record("notify_tools_changed", ctx)
        await stream_opened(_header(ctx, "mcp-session-id")).wait()
        await ctx.session.send_tool_list_changed()
        return "notified"

    return mcp


#: Per session id, set once its GET (the server-to-client stream) got its 200.
_STREAMS_OPEN: dict[str, asyncio.Event] = {}


def stream_opened(session_id: str) -> asyncio.Event:
    """The event notify_tools_changed waits on: the session's GET stream is open."""
    return _STREAMS_OPEN.setdefault(session_id, asyncio.Event())


def watch_session(app: ASGIApp, log: CallLog) -> ASGIApp:
    """``app``, noting when a GET stream opens and logging ``{"session_deleted": true}``."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "DELETE":
            log.write({"session_deleted": True})
        if scope["type"] != "http" or scope["method"] != "GET":
            await app(scope, receive, send)
            return
        session_id = _scope_headers(scope).get("mcp-session-id", "")

        async def noting_send(message: ASGIMessage) -> None:
            await send(message)
            if message["type"] == "http.response.start" and message["status"] == 200:
                stream_opened(session_id).set()

        await app(scope, receive, noting_send)

    return wrapped


class BearerCheck:
    """ASGI middleware: 401 unless the request carries a JWT that verifies against the JWKS."""

    def __init__(
        self, app: ASGIApp, log: CallLog, *, jwks_url: str, audience: str, issuer: str, ca_file: str
    ) -> None:
        self._app = app
        self._log = log
        context = ssl.create_default_context(cafile=ca_file)
        self._keys = jwt.PyJWKClient(jwks_url, ssl_context=context)
        self._audience = audience
        self._issuer = issuer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        token = _bearer(_scope_headers(scope).get("authorization", ""))
        reason = await self._rejection(token)
        if reason is None:
            await self._app(scope, receive, send)
            return
        self._log.write({"rejected": reason})
        body = json.dumps({"error": reason}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _rejection(self, token: str) -> str | None:
        if not token:
            return "missing bearer token"
        try:
            key = await anyio.to_thread.run_sync(self._keys.get_signing_key_from_jwt, token)
            jwt.decode(
                token,
                key.key,
                algorithms=["ES256"],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iat", "sub"]},
            )
        except jwt.PyJWTError as exc:
            return f"invalid token: {type(exc).__name__}: {exc}"
        return None


def _scope_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _bearer(value: str) -> str:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def announce_when_started(app: ASGIApp, url: str) -> ASGIApp:
    """``app``, printing the ready line once its lifespan start-up completed."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def announcing_send(message: ASGIMessage) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                print(json.dumps({"url": url}), flush=True)

        await app(scope, receive, announcing_send)

    return wrapped


def serve_http(mcp: FastMCP, args: argparse.Namespace, log: CallLog) -> None:
    """Serve the streamable HTTP app on 127.0.0.1 (the socket listens before the ready line)."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only then, and
    # without it each answer's body waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(64)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    app: ASGIApp = mcp.streamable_http_app()
    if args.test_tools:
        app = watch_session(app, log)
    if args.jwks_url:
        app = BearerCheck(
            app,
            log,
            jwks_url=args.jwks_url,
            audience=args.audience,
            issuer=args.issuer,
            ca_file=args.ca_file,
        )
    app = announce_when_started(app, url)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


@dataclass
class RunningServer:
    """A server started by :func:`start_http_server`; ``stop()`` ends it."""

    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_http_server(*args: str, stderr: Path) -> RunningServer:
    """Run this script with ``--transport http`` and ``args``; return once it prints its URL.

    For tests: the server's stderr goes to the file ``stderr``, which an AssertionError
    quotes if the server ends before its ready line.
    """
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--transport", "http", *args],
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise AssertionError(f"the test MCP server did not start: {stderr.read_text()[-2000:]}")
    return RunningServer(process, json.loads(line)["url"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--call-log", default=os.environ.get("MCP_CALL_LOG", ""))
    parser.add_argument("--jwks-url", default="")
    parser.add_argument("--audience", default="")
    parser.add_argument("--issuer", default="")
    parser.add_argument("--ca-file", default="")
    parser.add_argument("--json-response", action="store_true")
    parser.add_argument("--test-tools", action="store_true")
    args = parser.parse_args(argv)
    if args.jwks_url and not (args.audience and args.issuer and args.ca_file):
        parser.error("--jwks-url needs --audience, --issuer and --ca-file")
    log = CallLog(args.call_log)
    mcp = build_server(log, json_response=args.json_response, test_tools=args.test_tools)
    if args.transport == "stdio":
        mcp.run("stdio")
    else:
        serve_http(mcp, args, log)


if __name__ == "__main__":
    main()
