"""The upstream transports against real MCP SDK servers (tests/mcp_upstream_server.py).

stdio servers are started by the Upstream under test; the HTTP servers run once per
module, one behind a bearer-JWT check whose JWKS a loopback HTTPS server here serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tbot_py.client import wire
from tbot_py.mcp.upstream import (
    INTERNAL_ERROR_CODE,
    HttpUpstream,
    SSEDecoder,
    StdioUpstream,
    Upstream,
    UpstreamError,
    open_upstream,
)
from tests.loopback_tls import write_loopback_tls
from tests.mcp_upstream_server import SCRIPT, RunningServer, start_http_server

TOOLS = {"get_weather", "list_items", "delete_item"}
AUDIENCE = "mcp+http://inventory.test/mcp"
ISSUER = "https://auth.test"
KID = "test-key"
SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
#: A safety net so a broken transport fails the test instead of hanging it.
WAIT_S = 20.0


def mcp_app(uri: str, command: str = "", args: tuple[str, ...] = ()) -> wire.MCPApp:
    return wire.MCPApp(name="inventory", uri=uri, labels={"env": "dev"}, command=command, args=args)


def stdio_app(call_log: Path, *extra: str) -> wire.MCPApp:
    args = (str(SCRIPT), "--transport", "stdio", "--call-log", str(call_log), *extra)
    return mcp_app("mcp+stdio://", sys.executable, args)


def token(sub: str = "bot-agent", audience: str = AUDIENCE) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": audience, "sub": sub, "iat": now, "exp": now + 600}
    return jwt.encode(claims, SIGNING_KEY, algorithm="ES256", headers={"kid": KID})


def request(msg_id: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params or {}}


def call(msg_id: int, tool: str, **arguments: Any) -> dict[str, Any]:
    return request(msg_id, "tools/call", {"name": tool, "arguments": arguments})


INITIALIZE = request(
    0,
    "initialize",
    {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "upstream-test", "version": "1"},
    },
)
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


async def send(upstream: Upstream, payload: Any) -> None:
    await asyncio.wait_for(upstream.send(payload), WAIT_S)


async def receive(upstream: Upstream) -> Any:
    return await asyncio.wait_for(upstream.receive(), WAIT_S)


async def initialize(upstream: Upstream) -> dict[str, Any]:
    await send(upstream, INITIALIZE)
    answer = await receive(upstream)
    assert answer["id"] == 0, answer
    await send(upstream, INITIALIZED)
    result: dict[str, Any] = answer["result"]
    return result


def text_of(response: dict[str, Any]) -> str:
    assert "result" in response, response
    return str(response["result"]["content"][0]["text"])


def log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(upstream: Upstream, scenario: Callable[[Upstream], Awaitable[None]]) -> None:
    """Start ``upstream``, run ``scenario`` with it, and close it whatever happens."""

    async def main() -> None:
        await upstream.start()
        try:
            await scenario(upstream)
        finally:
            await upstream.close()

    asyncio.run(main())


# -- the loopback JWKS and the HTTP servers, once per module ---------------------------


@pytest.fixture(scope="module")
def jwks_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTPS JWKS at 127.0.0.1 with SIGNING_KEY's public half; yields (url, CA file)."""
    tls = write_loopback_tls(tmp_path_factory.mktemp("jwks-tls"), "upstream test CA")
    public = jwt.algorithms.ECAlgorithm.to_jwk(SIGNING_KEY.public_key(), as_dict=True)
    body = json.dumps({"keys": [{**public, "kid": KID, "alg": "ES256", "use": "sig"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/jwks", tls.ca
    finally:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class HTTPServer:
    url: str
    call_log: Path


@pytest.fixture(scope="module")
def guarded_server(
    jwks_url: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HTTPServer]:
    """An SSE-answering server that wants a bearer JWT (ES256, AUDIENCE, ISSUER)."""
    url, ca_file = jwks_url
    directory = tmp_path_factory.mktemp("guarded")
    call_log = directory / "calls.jsonl"
    running = start_http_server(
        "--call-log", str(call_log), "--test-tools",
        "--jwks-url", url, "--audience", AUDIENCE, "--issuer", ISSUER, "--ca-file", str(ca_file),
        stderr=directory / "stderr.txt",
    )  # fmt: skip
    yield from _serving(running, call_log)


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HTTPServer]:
    """A server without auth that answers each POST with application/json."""
    directory = tmp_path_factory.mktemp("json")
    call_log = directory / "calls.jsonl"
    running = start_http_server(
        "--call-log", str(call_log), "--test-tools", "--json-response",
        stderr=directory / "stderr.txt",
    )  # fmt: skip
    yield from _serving(running, call_log)


def _serving(running: RunningServer, call_log: Path) -> Iterator[HTTPServer]:
    try:
        yield HTTPServer(running.url, call_log)
    finally:
        running.stop()


def http_upstream(server: HTTPServer, headers: dict[str, str] | None = None) -> Upstream:
    return open_upstream(mcp_app("mcp+" + server.url), headers or {}, name_for_logs="inventory")


def bearer(sub: str = "bot-agent", audience: str = AUDIENCE) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, audience)}"}


# -- stdio ----------------------------------------------------------------------------


def test_stdio_upstream_initializes_lists_and_calls_tools(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tbot_py.mcp.upstream")
    call_log = tmp_path / "calls.jsonl"
    upstream = open_upstream(stdio_app(call_log), {}, name_for_logs="inventory")

    async def scenario(upstream: Upstream) -> None:
        result = await initialize(upstream)
        assert result["serverInfo"]["name"] == "tbot-py test upstream"
        await send(upstream, request(1, "tools/list"))
        listed = await receive(upstream)
        assert listed["id"] == 1
        assert {tool["name"] for tool in listed["result"]["tools"]} == TOOLS
        await send(upstream, call(2, "get_weather", city="Paris"))
        answer = await receive(upstream)
        assert answer["id"] == 2
        assert text_of(answer) == "Sunny in Paris"

    run(upstream, scenario)
    assert log_lines(call_log) == [
        {"tool": "get_weather", "arguments": {"city": "Paris"}, "sub": ""}
    ]
    # The server's stderr is logged under the app's name (it never reached receive()).
    stderr = [r.getMessage() for r in caplog.records if r.name == "tbot_py.mcp.upstream"]
    assert any(m.startswith("inventory: ") and "CallToolRequest" in m for m in stderr), stderr


def test_stdio_upstream_matches_two_calls_in_flight_by_id(tmp_path: Path) -> None:
    call_log = tmp_path / "calls.jsonl"
    upstream = open_upstream(stdio_app(call_log, "--test-tools"), {}, name_for_logs="inventory")

    async def scenario(upstream: Upstream) -> None:
        await initialize(upstream)
        await send(upstream, call(1, "hold", key="k"))
        await send(upstream, call(2, "release", key="k"))
        first, second = await receive(upstream), await receive(upstream)
        assert (first["id"], text_of(first)) == (2, "releasing k")
        assert (second["id"], text_of(second)) == (1, "released k")

    run(upstream, scenario)


def test_stdio_receive_returns_none_once_the_server_exits(tmp_path: Path) -> None:
    call_log = tmp_path / "calls.jsonl"
    upstream = open_upstream(stdio_app(call_log, "--test-tools"), {}, name_for_logs="inventory")

    async def scenario(upstream: Upstream) -> None:
        await initialize(upstream)
        await send(upstream, call(1, "exit_process"))
        assert await receive(upstream) is None
        assert await receive(upstream) is None

    run(upstream, scenario)
    assert [line["tool"] for line in log_lines(call_log)] == ["exit_process"]


def test_close_kills_a_stdio_server_that_ignores_eof_and_sigterm() -> None:
    stubborn = (
        "import json, os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print(json.dumps({'pid': os.getpid()}), flush=True)\n"
        "time.sleep(600)\n"
    )
    upstream = StdioUpstream(sys.executable, ["-c", stubborn], name_for_logs="stuck", grace_s=0.2)
    seen: dict[str, int] = {}

    async def scenario(upstream: Upstream) -> None:
        first = await receive(upstream)
        seen["pid"] = first["pid"]
        await upstream.close()
        assert await receive(upstream) is None

    run(upstream, scenario)
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(seen["pid"], signal.SIGCONT)


def test_missing_stdio_command_is_a_one_line_upstream_error() -> None:
    app = mcp_app("mcp+stdio://", "/nonexistent/mcp-server", ("--flag",))
    upstream = open_upstream(app, {}, name_for_logs="inventory")
    with pytest.raises(UpstreamError) as caught:
        asyncio.run(upstream.start())
    message = str(caught.value)
    assert "\n" not in message
    assert '"inventory"' in message
    assert "/nonexistent/mcp-server" in message
    assert "No such file or directory" in message


def test_stdio_app_without_command_is_refused_at_start() -> None:
    upstream = open_upstream(mcp_app("mcp+stdio://"), {}, name_for_logs="inventory")
    with pytest.raises(UpstreamError, match=r"mcp\.command"):
        asyncio.run(upstream.start())


def test_uri_schemes_are_case_insensitive() -> None:
    assert isinstance(open_upstream(mcp_app("MCP+STDIO://"), {}, name_for_logs="x"), StdioUpstream)
    http = open_upstream(mcp_app("MCP+HTTPS://inventory.test/mcp"), {}, name_for_logs="x")
    assert isinstance(http, HttpUpstream)
    assert http._url == "HTTPS://inventory.test/mcp"


def test_uri_that_is_not_mcp_is_refused() -> None:
    with pytest.raises(UpstreamError, match="mcp\\+stdio://"):
        open_upstream(mcp_app("https://inventory.test/mcp"), {}, name_for_logs="inventory")


# -- streamable HTTP --------------------------------------------------------------------


def test_http_upstream_carries_headers_and_the_session_over_sse(
    guarded_server: HTTPServer,
) -> None:
    sub = f"bot-{uuid.uuid4().hex[:8]}"

    async def scenario(upstream: Upstream) -> None:
        result = await initialize(upstream)
        assert result["protocolVersion"] == "2025-06-18"
        # tools/list only works with the session id from the initialize answer.
        await send(upstream, request(1, "tools/list"))
        listed = await receive(upstream)
        assert listed["id"] == 1
        assert {tool["name"] for tool in listed["result"]["tools"]} >= TOOLS
        await send(upstream, call(2, "get_weather", city="Oslo"))
        answer = await receive(upstream)
        assert answer["id"] == 2
        assert text_of(answer) == "Sunny in Oslo"

    run(http_upstream(guarded_server, bearer(sub)), scenario)
    calls = [line for line in log_lines(guarded_server.call_log) if line.get("sub") == sub]
    assert calls == [{"tool": "get_weather", "arguments": {"city": "Oslo"}, "sub": sub}]


def test_http_401_becomes_a_jsonrpc_error_for_each_request_concerned(
    guarded_server: HTTPServer,
) -> None:
    async def scenario(upstream: Upstream) -> None:
        await send(upstream, INITIALIZE)
        error = await receive(upstream)
        assert error["id"] == 0
        assert error["error"]["code"] == INTERNAL_ERROR_CODE
        assert "HTTP 401" in error["error"]["message"]
        assert "\n" not in error["error"]["message"]
        await send(upstream, [request(7, "tools/list"), call(8, "delete_item", item_id="x")])
        batch = await receive(upstream)
        assert [(e["id"], e["error"]["code"]) for e in batch] == [
            (7, INTERNAL_ERROR_CODE),
            (8, INTERNAL_ERROR_CODE),
        ]

    before = len(log_lines(guarded_server.call_log))
    run(http_upstream(guarded_server, bearer(audience="mcp+http://other.test/mcp")), scenario)
    new = log_lines(guarded_server.call_log)[before:]
    assert new and all("InvalidAudience" in line["rejected"] for line in new)


def test_http_without_the_header_is_rejected_by_the_server(guarded_server: HTTPServer) -> None:
    async def scenario(upstream: Upstream) -> None:
        await send(upstream, INITIALIZE)
        assert "HTTP 401" in (await receive(upstream))["error"]["message"]

    before = len(log_lines(guarded_server.call_log))
    run(http_upstream(guarded_server), scenario)
    assert log_lines(guarded_server.call_log)[before:] == [{"rejected": "missing bearer token"}]


def test_http_upstream_matches_two_calls_in_flight_by_id(guarded_server: HTTPServer) -> None:
    async def scenario(upstream: Upstream) -> None:
        await initialize(upstream)
        await send(upstream, call(1, "hold", key="http"))
        await send(upstream, call(2, "release", key="http"))
        first, second = await receive(upstream), await receive(upstream)
        assert (first["id"], text_of(first)) == (2, "releasing http")
        assert (second["id"], text_of(second)) == (1, "released http")

    run(http_upstream(guarded_server, bearer()), scenario)


def test_http_get_stream_delivers_what_the_server_sends_on_its_own(
    guarded_server: HTTPServer,
) -> None:
    async def scenario(upstream: Upstream) -> None:
        await initialize(upstream)
        await send(upstream, call(3, "notify_tools_changed"))
        got = [await receive(upstream), await receive(upstream)]
        methods = {m.get("method") for m in got}
        assert methods == {"notifications/tools/list_changed", None}
        assert text_of(next(m for m in got if "id" in m)) == "notified"

    run(http_upstream(guarded_server, bearer()), scenario)


def test_http_json_answers_and_close_ends_the_session(json_server: HTTPServer) -> None:
    async def scenario(upstream: Upstream) -> None:
        await initialize(upstream)
        await send(upstream, call(1, "hold", key="json"))
        await send(upstream, call(2, "release", key="json"))
        first, second = await receive(upstream), await receive(upstream)
        assert [first["id"], second["id"]] == [2, 1]
        await send(upstream, call(3, "list_items"))
        items = await receive(upstream)
        assert items["id"] == 3
        assert items["result"]["structuredContent"] == {"result": ["apple", "pear", "plum"]}
        await upstream.close()
        assert await receive(upstream) is None

    before = len(log_lines(json_server.call_log))
    run(http_upstream(json_server), scenario)
    assert log_lines(json_server.call_log)[before:][-1] == {"session_deleted": True}


def test_http_invalid_header_is_an_error_that_does_not_quote_it(json_server: HTTPServer) -> None:
    secret = "Bearer s3cret\r\nX-Injected: 1"

    async def scenario(upstream: Upstream) -> None:
        await send(upstream, INITIALIZE)
        error = await receive(upstream)
        assert error["id"] == 0
        assert "a header is invalid" in error["error"]["message"]
        assert "s3cret" not in json.dumps(error)

    run(http_upstream(json_server, {"Authorization": secret}), scenario)


def test_http_unreachable_server_answers_each_request_with_an_error() -> None:
    upstream = open_upstream(mcp_app("mcp+http://127.0.0.1:1/mcp"), {}, name_for_logs="inventory")

    async def scenario(upstream: Upstream) -> None:
        await send(upstream, INITIALIZE)
        error = await receive(upstream)
        assert error["id"] == 0
        assert error["error"]["message"].startswith(
            'cannot reach the MCP server of app "inventory"'
        )

    run(upstream, scenario)


# -- the SSE decoder ------------------------------------------------------------------


def test_sse_decoder_joins_data_lines_across_chunks() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b': comment\r\nid: 1\r\nevent: message\r\ndata: {"a":') == []
    assert decoder.feed(b"\r\ndata: 1}\r\n") == []
    assert decoder.feed(b"\r\n") == [b'{"a":\n1}']
    assert decoder.feed(b"data:x\n\nevent: ping\ndata: y\n\nid: 2\n\n") == [b"x"]


def test_sse_decoder_refuses_an_event_longer_than_its_limit() -> None:
    decoder = SSEDecoder(10)
    decoder.feed(b"data: 12345\n")
    with pytest.raises(UpstreamError, match="longer than 10 bytes"):
        decoder.feed(b"data: 6789")
