"""The MCP access proxy over real mTLS on 127.0.0.1, with a fake auth service and fake upstreams.

The auth side and the upstreams are the proxy's injected dependencies (``auth`` with the
three calls, ``open_upstream``); the TLS listener, the tunnel, the filter and the audit
log are the real ones. CAs and certificates come from the auth service's own CA code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tbot_py.authservice import ca
from tbot_py.authservice.roles import Role, parse_role_yaml
from tbot_py.client import tls, wire
from tbot_py.errors import AccessDenied, ConnectionProblem, NotFound, TrustError
from tbot_py.identity import keys
from tbot_py.identity.identityfile import host_ca_line, render_identity_file
from tbot_py.mcp import proxy as proxy_module
from tbot_py.mcp import tunnel
from tbot_py.mcp.proxy import MCPProxy, tool_patterns
from tbot_py.mcp.proxyauth import (
    IdentityAuth,
    ServerCert,
    fetch_server_cert,
    server_context,
    server_names,
)
from tbot_py.mcp.proxyconfig import parse_proxy_config
from tbot_py.mcp.upstream import Payload, UpstreamError

NOW = datetime.now(UTC)
TOOLS = ["get_weather", "list_items", "delete_item"]
JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib3QtYWdlbnQifQ.c2ln"


def role(name: str, allow: str, deny: str = "{}") -> Role:
    return parse_role_yaml(
        f"kind: role\nversion: v7\nmetadata: {{name: {name}}}\n"
        f"spec:\n  allow: {allow}\n  deny: {deny}\n"
    )


READ_ONLY = role("mcp-ro", "{app_labels: {'*': '*'}, mcp: {tools: ['^(get|list)_.*$']}}")
NO_DELETE = role("no-delete", "{}", "{mcp: {tools: ['delete_*']}}")
DEV_ALL = role("dev-all", "{app_labels: {env: dev}, mcp: {tools: ['*']}}")


@pytest.fixture(scope="module")
def cas() -> ca.ClusterCAs:
    return ca.create_cluster_cas("example.test", NOW - timedelta(minutes=5))


@dataclass
class ClientIdentity:
    cert_pem: bytes
    key_pem: bytes
    certs: wire.Certs


def issue_client(cas: ca.ClusterCAs, bot: str = "agent", hours: float = 1) -> ClientIdentity:
    """An impersonated identity-output certificate, as tbot-py's identity output holds."""
    key = keys.generate_private_key()
    certs = ca.issue_impersonated_identity(
        cas,
        ca.BotProfile(name=bot, roles=("mcp-ro",)),
        instance_id="i-1",
        roles=("mcp-ro",),
        public_key=key.public_key(),
        expires=(NOW + timedelta(hours=hours)).replace(microsecond=0),
        reissuable=False,
        route_to_cluster="",
        now=NOW,
    )
    return ClientIdentity(certs.tls, keys.private_key_pem(key), certs)


# --- fakes -------------------------------------------------------------------------------


@dataclass
class FakeAuth:
    """The three auth-service calls, answered from the CAs; every request is kept."""

    cas: ca.ClusterCAs
    roles: tuple[Role, ...] = (READ_ONLY, NO_DELETE)
    resources: dict[str, wire.MCPApp] = field(default_factory=dict)
    expires: datetime = NOW + timedelta(hours=1)
    session_requests: list[wire.MCPSessionRequest] = field(default_factory=list)
    apps_requests: list[wire.MCPAppsRequest] = field(default_factory=list)
    cert_requests: list[wire.TLSServerCertRequest] = field(default_factory=list)
    cert_issued: asyncio.Event = field(default_factory=asyncio.Event)
    #: Raised by mcp_session from now on (a lock, say, or the service unreachable).
    refusal: Exception | None = None

    async def mcp_session(self, request: wire.MCPSessionRequest) -> wire.MCPSessionResponse:
        self.session_requests.append(request)
        if self.refusal is not None:
            raise self.refusal
        app = request.config_app or self.resources.get(request.app)
        if app is None:
            raise NotFound(f'app "{request.app}" not found; create it', status=404)
        return wire.MCPSessionResponse(
            user="bot-agent",
            bot="agent",
            roles=tuple(r.to_json() for r in self.roles),
            app=app,
            expires=self.expires,
            jwt=JWT if request.jwt else "",
        )

    async def mcp_apps(self, request: wire.MCPAppsRequest) -> wire.MCPAppsResponse:
        self.apps_requests.append(request)
        apps = sorted([*request.config_apps, *self.resources.values()], key=lambda a: a.name)
        roles = tuple(r.to_json() for r in self.roles)
        return wire.MCPAppsResponse(user="bot-agent", roles=roles, apps=tuple(apps))

    async def issue_tls_server_cert(
        self, request: wire.TLSServerCertRequest
    ) -> wire.TLSServerCertResponse:
        self.cert_requests.append(request)
        cert = ca.issue_tls_server_certificate(
            self.cas,
            keys.load_public_key_pem(request.public_key),
            names=request.dns_names,
            not_after=NOW + timedelta(hours=1),
            now=datetime.now(UTC),
        )
        self.cert_issued.set()
        return wire.TLSServerCertResponse(
            cert=cert.public_bytes(Encoding.PEM),
            host_ca=self.cas.host.cert_pem,
            user_ca=self.cas.user.cert_pem,
        )


def answer(message: dict[str, Any]) -> dict[str, Any] | None:
    """What a small MCP server answers: initialize, tools/list, tools/call; None otherwise."""
    method, msg_id = message.get("method"), message.get("id")
    if msg_id is None or method is None:
        return None
    if method == "initialize":
        result: dict[str, Any] = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}}
    elif method == "tools/list":
        result = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in TOOLS]}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": f"called {message['params']['name']}"}]}
    else:
        return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32601, "message": method}}
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


class FakeUpstream:
    """An upstream that answers like :func:`answer`; records what it was sent."""

    def __init__(self, app: wire.MCPApp, headers: Mapping[str, str], fail: str = "") -> None:
        self.app, self.headers, self.fail = app, dict(headers), fail
        self.sent: list[Payload] = []
        self.queue: asyncio.Queue[Payload | None] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def start(self) -> None:
        if self.fail:
            raise UpstreamError(self.fail)

    async def send(self, payload: Payload) -> None:
        self.sent.append(payload)
        if isinstance(payload, list):
            answers = [a for a in (answer(m) for m in payload) if a is not None]
            if answers:
                self.queue.put_nowait(answers)
        elif (reply := answer(payload)) is not None:
            self.queue.put_nowait(reply)

    async def receive(self) -> Payload | None:
        return await self.queue.get()

    async def close(self) -> None:
        self.closed.set()
        self.queue.put_nowait(None)

    def sent_tools(self) -> list[str]:
        messages = [m for p in self.sent for m in (p if isinstance(p, list) else [p])]
        return [m["params"]["name"] for m in messages if m.get("method") == "tools/call"]


@dataclass
class Upstreams:
    """The ``open_upstream`` the proxy gets: makes FakeUpstreams and keeps them."""

    fail: str = ""
    opened: list[FakeUpstream] = field(default_factory=list)

    def __call__(
        self, app: wire.MCPApp, headers: Mapping[str, str], *, name_for_logs: str
    ) -> FakeUpstream:
        upstream = FakeUpstream(app, headers, self.fail)
        self.opened.append(upstream)
        return upstream


# --- harness -----------------------------------------------------------------------------


CONFIG = """\
version: v1
listen: 127.0.0.1:0
public_addr: [mcp.example.test]
auth_server: 127.0.0.1:3025
identity: {identity}
audit_log: {audit}
apps:
  - name: weather
    description: Weather tools
    uri: mcp+stdio://
    labels: {{env: dev}}
    mcp: {{command: python3, args: [server.py]}}
"""


@dataclass
class Harness:
    proxy: MCPProxy
    auth: FakeAuth
    upstreams: Upstreams
    cas: ca.ClusterCAs
    audit_path: Path
    client: ClientIdentity
    tunnels: list[Tunnel] = field(default_factory=list)

    async def connect(
        self, identity: ClientIdentity | None = None, *, alpn: str = tunnel.ALPN
    ) -> Tunnel:
        identity = identity or self.client
        ctx = tls.mtls_context(identity.cert_pem, identity.key_pem, self.cas.tls_ca_certs)
        ctx.set_alpn_protocols([alpn])
        host, port = self.proxy.addr.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=ctx, limit=tunnel.stream_limit()
        )
        self.tunnels.append(Tunnel(reader, writer))
        return self.tunnels[-1]

    async def session(self, app: str = "weather") -> Tunnel:
        conn = await self.connect()
        await conn.send({"app": app})
        assert tunnel.parse_session_answer(await conn.receive()).app == app
        return conn

    def audit(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        lines = [json.loads(line) for line in self.audit_path.read_text().splitlines()]
        return [e for e in lines if event is None or e["event"] == event]


@dataclass
class Tunnel:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, value: Any) -> None:
        self.writer.write(tunnel.encode_line(value))
        await self.writer.drain()

    async def receive(self) -> Any:
        line = await tunnel.read_line(self.reader)
        return None if line is None else tunnel.decode_line(line)

    async def call(
        self, msg_id: int | str, method: str, params: dict[str, Any] | None = None
    ) -> Any:
        await self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params or {}})
        return await self.receive()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await self.writer.wait_closed()


Scenario = Callable[[Harness], Awaitable[None]]


def run(
    tmp_path: Path,
    cas: ca.ClusterCAs,
    scenario: Scenario,
    *,
    auth: FakeAuth | None = None,
    upstreams: Upstreams | None = None,
    extra_config: str = "",
    **proxy_args: Any,
) -> Harness:
    """Start a proxy, run ``scenario`` against it (10 s at most), stop the proxy."""
    audit_path = tmp_path / "audit.jsonl"
    config = parse_proxy_config(
        CONFIG.format(identity=tmp_path / "proxy-identity", audit=audit_path) + extra_config
    )
    holder: list[Harness] = []

    async def main() -> None:
        fake_auth = auth or FakeAuth(cas)
        fake_upstreams = upstreams or Upstreams()
        proxy = MCPProxy(config, auth=fake_auth, open_upstream=fake_upstreams, **proxy_args)
        harness = Harness(proxy, fake_auth, fake_upstreams, cas, audit_path, issue_client(cas))
        holder.append(harness)
        await proxy.start()
        try:
            await asyncio.wait_for(scenario(harness), 10)
        finally:
            for conn in harness.tunnels:
                await conn.close()
            await proxy.stop()

    asyncio.run(main())
    return holder[0]


# --- sessions ----------------------------------------------------------------------------


def test_a_session_filters_tools_list_and_forwards_allowed_calls(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    async def scenario(h: Harness) -> None:
        conn = await h.session()
        init = await conn.call(1, "initialize", {"protocolVersion": "2025-06-18"})
        assert init["result"]["protocolVersion"] == "2025-06-18"
        listed = await conn.call("two", "tools/list")
        assert [t["name"] for t in listed["result"]["tools"]] == ["get_weather", "list_items"]
        called = await conn.call(3, "tools/call", {"name": "get_weather", "arguments": {}})
        assert called["result"]["content"][0]["text"] == "called get_weather"
        await conn.close()

    h = run(tmp_path, cas, scenario)
    (upstream,) = h.upstreams.opened
    assert upstream.sent_tools() == ["get_weather"]
    assert upstream.app.source == "config"
    (request,) = h.auth.session_requests
    assert request.client_cert == h.client.cert_pem  # the certificate the client presented
    assert request.config_app is not None and request.config_app.command == "python3"
    assert request.jwt is False  # the config app's headers use no JWT


def test_a_denied_call_is_answered_by_the_proxy_and_never_reaches_the_upstream(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    async def scenario(h: Harness) -> None:
        conn = await h.session()
        denied = await conn.call(
            7, "tools/call", {"name": "delete_item", "arguments": {"x": "s3cr3t"}}
        )
        assert denied["id"] == 7
        assert denied["error"]["code"] == -32602
        assert "delete_item" in denied["error"]["message"]
        assert "s3cr3t" not in json.dumps(denied)
        # A batch: the allowed call goes up alone, the denied one is answered here.
        await conn.send(
            [
                {
                    "jsonrpc": "2.0",
                    "id": 8,
                    "method": "tools/call",
                    "params": {"name": "list_items"},
                },
                {
                    "jsonrpc": "2.0",
                    "id": 9,
                    "method": "tools/call",
                    "params": {"name": "delete_item"},
                },
            ]
        )
        answers = [await conn.receive(), await conn.receive()]
        by_id = {}
        for item in answers:
            for message in item if isinstance(item, list) else [item]:
                by_id[message["id"]] = message
        assert by_id[8]["result"]["content"][0]["text"] == "called list_items"
        assert by_id[9]["error"]["code"] == -32602
        await conn.close()

    h = run(tmp_path, cas, scenario)
    (upstream,) = h.upstreams.opened
    assert upstream.sent_tools() == ["list_items"]
    assert upstream.sent[-1] == [
        {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "list_items"}}
    ]
    requests = h.audit("mcp.request")
    denied = [e for e in requests if e["details"].get("tool") == "delete_item"]
    assert len(denied) == 2
    assert denied[0]["success"] is False
    assert denied[0]["details"]["allowed"] == "false"
    assert denied[0]["details"]["method"] == "tools/call"
    assert "delete_*" in denied[0]["details"]["reason"]
    assert denied[0]["actor"] == {"user": "bot-agent", "bot": "agent"}
    assert denied[0]["resource"] == "app/weather"
    assert denied[0]["remote_addr"] == "127.0.0.1"
    assert "s3cr3t" not in h.audit_path.read_text()


def test_every_request_and_the_session_start_and_end_are_audited(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    async def scenario(h: Harness) -> None:
        conn = await h.session()
        await conn.call(1, "initialize")
        await conn.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await conn.call(2, "tools/list")
        await conn.close()
        (upstream,) = h.upstreams.opened
        await upstream.closed.wait()

    h = run(tmp_path, cas, scenario)
    events = [(e["event"], e.get("details", {}).get("method")) for e in h.audit()]
    assert events == [
        ("mcp.session.start", None),
        ("mcp.request", "initialize"),
        ("mcp.request", "notifications/initialized"),
        ("mcp.request", "tools/list"),
        ("mcp.session.end", None),
    ]
    assert h.audit("mcp.session.end")[0]["details"]["reason"] == "the client closed the session"
    assert all(e["actor"] == {"user": "bot-agent", "bot": "agent"} for e in h.audit())


def test_header_templates_become_the_jwt_for_a_resource_app(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    auth = FakeAuth(cas)
    auth.resources["inventory"] = wire.MCPApp(
        name="inventory",
        uri="mcp+http://127.0.0.1:8000/mcp",
        labels={"env": "dev"},
        headers=(
            "Authorization: Bearer {{internal.id_token}}",
            "X-JWT: {{internal.jwt}}",
            "X-A: b",
        ),
    )

    async def scenario(h: Harness) -> None:
        conn = await h.session("inventory")
        await conn.close()

    h = run(tmp_path, cas, scenario, auth=auth)
    (request,) = auth.session_requests
    assert request.jwt is True and request.config_app is None
    (upstream,) = h.upstreams.opened
    assert upstream.headers == {"Authorization": f"Bearer {JWT}", "X-JWT": JWT, "X-A": "b"}
    assert JWT not in h.audit_path.read_text()


def test_an_unknown_header_template_refuses_the_session(tmp_path: Path, cas: ca.ClusterCAs) -> None:
    auth = FakeAuth(cas)
    auth.resources["inventory"] = wire.MCPApp(
        name="inventory", uri="mcp+http://127.0.0.1:8000/mcp", headers=("X-L: {{internal.logins}}",)
    )

    async def scenario(h: Harness) -> None:
        conn = await h.connect()
        await conn.send({"app": "inventory"})
        with pytest.raises(
            tunnel.TunnelError, match=r"unsupported template \{\{internal.logins\}\}"
        ):
            tunnel.parse_session_answer(await conn.receive())
        assert await conn.receive() is None

    h = run(tmp_path, cas, scenario, auth=auth)
    assert h.upstreams.opened == []
    (start,) = h.audit("mcp.session.start")
    assert start["success"] is False
    assert "internal.logins" in start["message"]


def test_the_session_ends_when_the_client_certificate_expires(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    auth = FakeAuth(cas, expires=datetime.now(UTC) + timedelta(milliseconds=300))

    async def scenario(h: Harness) -> None:
        conn = await h.session()
        assert await conn.receive() is None  # the proxy closed the connection
        await h.upstreams.opened[0].closed.wait()

    h = run(tmp_path, cas, scenario, auth=auth)
    (end,) = h.audit("mcp.session.end")
    assert end["details"]["reason"] == "the session expired"


def test_a_session_the_auth_service_stops_allowing_ends_at_the_next_recheck(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    auth = FakeAuth(cas)

    async def scenario(h: Harness) -> None:
        conn = await h.session()
        assert (await conn.call(1, "tools/list"))["result"]["tools"]
        auth.refusal = AccessDenied('bot "agent" is locked: laptop stolen', status=403)
        assert await conn.receive() is None  # the proxy closed the connection
        await h.upstreams.opened[0].closed.wait()

    h = run(tmp_path, cas, scenario, auth=auth, extra_config="session_recheck: 50ms\n")
    (end,) = h.audit("mcp.session.end")
    assert end["details"]["reason"] == 'access was revoked: bot "agent" is locked: laptop stolen'
    first, *rechecks = auth.session_requests
    assert rechecks and all(r == dataclasses.replace(first, jwt=False) for r in rechecks)


def test_an_unreachable_auth_service_does_not_end_a_session(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    auth = FakeAuth(cas)

    async def scenario(h: Harness) -> None:
        conn = await h.session()
        auth.refusal = ConnectionProblem("cannot reach the auth service: refused")
        asked = len(auth.session_requests)
        while len(auth.session_requests) < asked + 3:
            await asyncio.sleep(0.01)
        assert (await conn.call(1, "tools/list"))["result"]["tools"]

    h = run(tmp_path, cas, scenario, auth=auth, extra_config="session_recheck: 20ms\n")
    (end,) = h.audit("mcp.session.end")
    assert not end["details"]["reason"].startswith("access was revoked")


def test_the_session_ends_when_the_upstream_exits(tmp_path: Path, cas: ca.ClusterCAs) -> None:
    async def scenario(h: Harness) -> None:
        conn = await h.session()
        h.upstreams.opened[0].queue.put_nowait(None)
        assert await conn.receive() is None

    h = run(tmp_path, cas, scenario)
    assert h.audit("mcp.session.end")[0]["details"]["reason"] == "the MCP server ended"


def test_an_upstream_that_cannot_start_refuses_the_session(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    async def scenario(h: Harness) -> None:
        conn = await h.connect()
        await conn.send({"app": "weather"})
        with pytest.raises(tunnel.TunnelError, match=r"no python3"):
            tunnel.parse_session_answer(await conn.receive())

    h = run(tmp_path, cas, scenario, upstreams=Upstreams(fail="no python3"))
    assert h.upstreams.opened[0].closed.is_set()


def test_stopping_the_proxy_ends_sessions_and_closes_upstreams(
    tmp_path: Path, cas: ca.ClusterCAs, caplog: pytest.LogCaptureFixture
) -> None:
    upstreams = Upstreams()

    async def scenario(h: Harness) -> None:
        conn = await h.session()
        await conn.call(1, "initialize")
        await h.proxy.stop()
        assert await conn.receive() is None

    h = run(tmp_path, cas, scenario, upstreams=upstreams)
    assert upstreams.opened[0].closed.is_set()
    assert h.audit("mcp.session.end")[0]["details"]["reason"] == "proxy stopping"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


def test_a_line_that_is_not_json_gets_a_parse_error_and_the_session_goes_on(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    async def scenario(h: Harness) -> None:
        conn = await h.session()
        conn.writer.write(b"{nope\n")
        assert (await conn.receive())["error"]["code"] == -32700
        await conn.send([])
        assert (await conn.receive())["error"]["code"] == -32600
        assert "result" in await conn.call(1, "initialize")

    run(tmp_path, cas, scenario)


# --- hellos ------------------------------------------------------------------------------


async def refusal(conn: Tunnel) -> str:
    """The error line of a refused hello; the proxy closes right after it."""
    with pytest.raises(tunnel.TunnelError) as caught:
        tunnel.parse_answer(await conn.receive())
    assert await conn.receive() is None
    return str(caught.value)


def test_hello_errors_are_one_line_each(tmp_path: Path, cas: ca.ClusterCAs) -> None:
    async def scenario(h: Harness) -> None:
        conn = await h.connect()
        conn.writer.write(b"not json\n")
        assert "not valid UTF-8 JSON" in await refusal(conn)
        conn = await h.connect()
        await conn.send({"app": "nope"})
        assert await refusal(conn) == 'app "nope" not found; create it'
        conn = await h.connect()
        assert "no hello within 0.2 s" in await refusal(conn)
        conn = await h.connect(alpn="h2")
        await conn.send({"app": "weather"})
        assert "ALPN" in await refusal(conn)

    h = run(tmp_path, cas, scenario, hello_timeout=0.2)
    assert h.upstreams.opened == []
    refused = h.audit("mcp.session.start")
    assert [e["success"] for e in refused] == [False]
    assert refused[0]["actor"] == {"user": "bot-agent", "bot": "agent"}  # from the certificate


def test_the_list_answer_has_each_apps_tool_patterns(tmp_path: Path, cas: ca.ClusterCAs) -> None:
    auth = FakeAuth(cas, roles=(READ_ONLY, NO_DELETE, DEV_ALL))
    auth.resources["prod"] = wire.MCPApp(
        name="prod", uri="mcp+http://10.0.0.1/mcp", labels={"env": "prod"}, description="Prod"
    )

    async def scenario(h: Harness) -> None:
        conn = await h.connect()
        await conn.send({"list": True})
        listed = tunnel.parse_answer(await conn.receive())
        assert listed["user"] == "bot-agent"
        assert listed["apps"] == [
            {
                "name": "prod",
                "description": "Prod",
                "uri": "mcp+http://10.0.0.1/mcp",
                "labels": {"env": "prod"},
                "tools": {"allow": ["^(get|list)_.*$"], "deny": ["delete_*"]},
            },
            {
                "name": "weather",
                "description": "Weather tools",
                "uri": "mcp+stdio://",
                "labels": {"env": "dev"},
                "tools": {"allow": ["^(get|list)_.*$", "*"], "deny": ["delete_*"]},
            },
        ]
        assert await conn.receive() is None

    h = run(tmp_path, cas, scenario, auth=auth)
    (request,) = h.auth.apps_requests
    assert [a.name for a in request.config_apps] == ["weather"]
    assert request.client_cert == h.client.cert_pem


# --- TLS ---------------------------------------------------------------------------------


def test_the_listener_requires_a_client_certificate_from_the_user_ca(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    other = ca.create_cluster_cas("other.test", NOW - timedelta(minutes=5))

    async def refused(h: Harness, ctx: ssl.SSLContext) -> None:
        host, port = h.proxy.addr.rsplit(":", 1)
        answer = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
            h.tunnels.append(Tunnel(reader, writer))
            # TLS 1.3: the server checks the client certificate after the client's handshake.
            writer.write(tunnel.encode_line({"list": True}))
            await writer.drain()
            answer = await reader.read()
        assert answer == b""

    async def scenario(h: Harness) -> None:
        stranger = issue_client(other)
        foreign = tls.mtls_context(stranger.cert_pem, stranger.key_pem, cas.tls_ca_certs)
        foreign.set_alpn_protocols([tunnel.ALPN])
        await refused(h, foreign)
        anonymous = tls.verified_context(cadata=cas.host.cert_pem.decode())
        anonymous.set_alpn_protocols([tunnel.ALPN])
        await refused(h, anonymous)
        # The proxy's certificate is from the host CA, for the listen host and public_addr.
        conn = await h.connect()
        peer = conn.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(peer)
        cert.verify_directly_issued_by(cas.host.cert)
        await conn.close()

    h = run(tmp_path, cas, scenario)
    assert h.auth.apps_requests == [] and h.auth.session_requests == []
    ctx = server_context(asyncio.run(fetch_server_cert(FakeAuth(cas), ["127.0.0.1"])))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert [r.dns_names for r in h.auth.cert_requests] == [("127.0.0.1", "mcp.example.test")]


def test_the_server_certificate_is_renewed_when_the_identity_file_changes(
    tmp_path: Path, cas: ca.ClusterCAs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_module, "IDENTITY_POLL_S", 0.01)
    (tmp_path / "proxy-identity").write_text("first")

    async def scenario(h: Harness) -> None:
        first = await h.connect()
        before = first.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        h.auth.cert_issued.clear()
        (tmp_path / "proxy-identity").write_text("second, renewed")
        await h.auth.cert_issued.wait()
        second = await h.connect()
        after = second.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert before != after
        await first.close()
        await second.close()

    h = run(tmp_path, cas, scenario)
    assert len(h.auth.cert_requests) == 2


# --- pure parts and the proxy's bot ------------------------------------------------------


def test_tool_patterns_take_allow_from_roles_granting_the_app_and_every_deny() -> None:
    patterns = tool_patterns([READ_ONLY, NO_DELETE, DEV_ALL], {"env": "prod"})
    assert patterns == {"allow": ["^(get|list)_.*$"], "deny": ["delete_*"]}
    assert tool_patterns([DEV_ALL], {})["allow"] == []


def test_server_names_use_the_host_name_for_a_wildcard_listen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "proxy-1")
    assert server_names("0.0.0.0", ["mcp.example.com"]) == ("proxy-1", "mcp.example.com")
    assert server_names("127.0.0.1", ["127.0.0.1"]) == ("127.0.0.1",)


def test_the_server_certificate_is_renewed_two_thirds_into_its_life() -> None:
    cert = ServerCert(b"", b"", b"", NOW, NOW + timedelta(hours=3))
    assert cert.renew_at == NOW + timedelta(hours=2)


def write_identity(path: Path, cas: ca.ClusterCAs, identity: ClientIdentity) -> None:
    path.write_bytes(
        render_identity_file(
            private_key_pem=identity.key_pem,
            ssh_cert=identity.certs.ssh,
            tls_cert_pem=identity.cert_pem,
            ssh_ca_lines=[host_ca_line(cas.cluster_name, cas.host.ssh_public_key_line)],
            tls_ca_pems=cas.tls_ca_certs,
        )
    )


def test_the_proxys_bot_rereads_its_identity_file_when_it_changes(
    tmp_path: Path, cas: ca.ClusterCAs
) -> None:
    path = tmp_path / "identity"
    write_identity(path, cas, issue_client(cas, "proxy"))

    async def main() -> None:
        auth = IdentityAuth("127.0.0.1:3025", path)
        first = await auth._current()
        assert await auth._current() is first
        write_identity(path, cas, issue_client(cas, "proxy"))
        assert await auth._current() is not first
        await auth.close()

    asyncio.run(main())


def test_ca_pins_must_match_a_ca_in_the_identity_file(tmp_path: Path, cas: ca.ClusterCAs) -> None:
    path = tmp_path / "identity"
    write_identity(path, cas, issue_client(cas, "proxy"))

    async def main() -> None:
        pinned = IdentityAuth("127.0.0.1:3025", path, [cas.ca_pin])
        await pinned._current()
        await pinned.close()
        wrong = IdentityAuth("127.0.0.1:3025", path, ["sha256:" + "0" * 64])
        with pytest.raises(TrustError, match="matches ca_pins"):
            await wrong._current()

    asyncio.run(main())
