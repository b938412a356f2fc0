"""The connector against a fake access proxy on 127.0.0.1: real mTLS, ALPN and tunnel hello.

The fake proxy checks the client certificate against the cluster's user CA, answers
the hello, auto-answers ``initialize`` and ``echo`` and hands every other message to
the test, which answers (or not) itself. The MCP client's side is in memory, except
in the tests that run ``tbot-py mcp connect`` as a process on real pipes.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tbot_py.authservice import ca
from tbot_py.cli.main import cli
from tbot_py.errors import IdentityError
from tbot_py.identity import keys
from tbot_py.identity.identityfile import render_identity_file
from tbot_py.mcp import connector, dial, tunnel
from tests.unit.test_import_boundaries import loaded_modules

T = TypeVar("T")
APP = "weather"
Message = dict[str, Any]


def run(scenario: Coroutine[Any, Any, T]) -> T:
    # A guard against a hang in a broken build, not a timed assertion.
    return asyncio.run(asyncio.wait_for(scenario, 15))


@dataclass
class Cluster:
    cas: ca.ClusterCAs
    dir: Path

    def write_identity(self, path: Path) -> bytes:
        """Write a fresh bot identity file at ``path`` atomically; return its TLS cert (DER)."""
        now = datetime.now(UTC)
        key = keys.generate_private_key()
        certs = ca.issue_impersonated_identity(
            self.cas,
            ca.BotProfile("agent", ("mcp-user",)),
            instance_id="00000000-0000-4000-8000-000000000001",
            roles=("mcp-user",),
            public_key=key.public_key(),
            expires=now + timedelta(hours=1),
            reissuable=False,
            route_to_cluster="",
            now=now,
        )
        data = render_identity_file(
            private_key_pem=keys.private_key_pem(key),
            ssh_cert=certs.ssh,
            tls_cert_pem=certs.tls,
            ssh_ca_lines=(),
            tls_ca_pems=certs.tls_ca_certs,
        )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return x509.load_pem_x509_certificate(certs.tls).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def cas() -> ca.ClusterCAs:
    return ca.create_cluster_cas("example.com", datetime.now(UTC))


@pytest.fixture
def cluster(cas: ca.ClusterCAs, tmp_path: Path) -> Cluster:
    return Cluster(cas, tmp_path)


@dataclass
class Session:
    """One connection the fake proxy accepted, after its hello."""

    number: int
    hello: Message
    peer_cert: bytes
    writer: asyncio.StreamWriter
    inbox: asyncio.Queue[Message | None] = field(default_factory=asyncio.Queue)
    seen: list[Message] = field(default_factory=list)

    async def next(self) -> Message | None:
        """The next message the test must handle (None once the connector closed)."""
        return await self.inbox.get()

    def send(self, message: Message) -> None:
        self.writer.write(tunnel.encode_line(message))

    def respond(self, request_id: Any, result: Message) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "result": result})


class FakeProxy:
    """Speaks tunnel.py over mTLS; ``refusal`` refuses every hello; ``apps`` is the list answer."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.refusal = ""
        self.apps: list[Message] = []
        self.sessions: asyncio.Queue[Session] = asyncio.Queue()
        self.refused: asyncio.Queue[Message] = asyncio.Queue()  # each refused hello
        self.lifetimes: list[timedelta] = []  # of the next sessions; then an hour each
        self.count = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> dial.ProxyAddress:
        cas = self.cluster.cas
        key = keys.generate_private_key()
        cert = ca.issue_server_certificate(
            cas, key.public_key(), hosts=["127.0.0.1"], now=datetime.now(UTC)
        )
        chain = self.cluster.dir / "proxy.pem"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + keys.private_key_pem(key))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(chain)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=cas.user.cert_pem.decode())
        ctx.set_alpn_protocols([tunnel.ALPN])
        self.server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=ctx, limit=tunnel.stream_limit()
        )
        port = self.server.sockets[0].getsockname()[1]
        return dial.ProxyAddress("127.0.0.1", port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._session(reader, writer)
        except (OSError, tunnel.TunnelError):
            pass
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await tunnel.read_line(reader)
        assert line is not None
        hello = tunnel.decode_line(line)
        if self.refusal:
            writer.write(tunnel.encode_line(tunnel.error_answer(self.refusal)))
            self.refused.put_nowait(hello)
            return
        if hello.get("list"):
            writer.write(tunnel.encode_line({"ok": True, "user": "bot-agent", "apps": self.apps}))
            return
        lifetime = self.lifetimes.pop(0) if self.lifetimes else timedelta(hours=1)
        expires = datetime.now(UTC) + lifetime
        writer.write(tunnel.encode_line(tunnel.SessionAnswer(hello["app"], expires).to_json()))
        self.count += 1
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        session = Session(self.count, hello, peer, writer)
        self.sessions.put_nowait(session)
        try:
            while (line := await tunnel.read_line(reader)) is not None:
                message = tunnel.decode_line(line)
                session.seen.append(message)
                method = message.get("method")
                if method == "initialize":
                    info = {"name": "fake", "version": str(session.number)}
                    session.respond(message["id"], {"serverInfo": info})
                elif method == "echo":
                    session.respond(
                        message["id"], {"echo": message["params"], "from": session.number}
                    )
                else:
                    session.inbox.put_nowait(message)
        finally:
            session.inbox.put_nowait(None)


class Client:
    """The MCP client's end of stdio, in memory."""

    def __init__(self) -> None:
        self.stdin = asyncio.StreamReader(limit=tunnel.stream_limit())
        self.received: asyncio.Queue[Message] = asyncio.Queue()

    def write(self, data: bytes) -> None:  # the connector's stdout
        for line in data.splitlines():
            self.received.put_nowait(json.loads(line))

    async def drain(self) -> None:
        return None

    def send(self, message: Message) -> None:
        self.stdin.feed_data(tunnel.encode_line(message))

    def request(self, request_id: Any, method: str, params: Message | None = None) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}})

    async def next(self) -> Message:
        return await self.received.get()


INITIALIZE_PARAMS = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "t"},
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}

Scenario = Callable[[FakeProxy, Client, Path], Awaitable[None]]


async def bridged(
    cluster: Cluster, scenario: Scenario, first_session: timedelta = timedelta(hours=1)
) -> int:
    """Run the connector between an in-memory client and the fake proxy through ``scenario``.

    The proxy says the first session ends after ``first_session``, later ones in an hour.
    """
    identity = cluster.dir / "identity"
    cluster.write_identity(identity)
    proxy = FakeProxy(cluster)
    proxy.lifetimes = [first_session]
    address = await proxy.start()
    client = Client()
    bridge = asyncio.ensure_future(
        connector.run_connector(address, identity, APP, client.stdin, client, poll_interval=0.01)
    )
    try:
        await scenario(proxy, client, identity)
        client.stdin.feed_eof()  # idempotent
        return await bridge
    finally:
        bridge.cancel()
        await asyncio.gather(bridge, return_exceptions=True)
        await proxy.close()


async def initialized_session(proxy: FakeProxy, client: Client) -> Session:
    """The first session, after the client's initialize handshake went through it."""
    session = await proxy.sessions.get()
    client.request(1, "initialize", INITIALIZE_PARAMS)
    assert await client.next() == {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"serverInfo": {"name": "fake", "version": "1"}},
    }
    client.send(INITIALIZED)
    assert await session.next() == INITIALIZED
    return session


def test_hello_then_lines_flow_both_ways_with_the_identitys_certificate(cluster: Cluster) -> None:
    async def scenario(proxy: FakeProxy, client: Client, identity: Path) -> None:
        session = await initialized_session(proxy, client)
        assert session.hello == {"app": APP}
        subject = x509.load_der_x509_certificate(session.peer_cert).subject
        assert "bot-agent" in subject.rfc4514_string()
        client.request("a", "tools/list")
        assert (await session.next())["id"] == "a"
        session.respond("a", {"tools": []})
        assert await client.next() == {"jsonrpc": "2.0", "id": "a", "result": {"tools": []}}
        note = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        session.send(note)
        assert await client.next() == note

    assert run(bridged(cluster, scenario)) == 0


def test_renewed_identity_moves_to_a_new_connection_unseen_by_the_client(cluster: Cluster) -> None:
    async def scenario(proxy: FakeProxy, client: Client, identity: Path) -> None:
        old = await initialized_session(proxy, client)
        client.request(2, "tools/call", {"name": "slow"})
        assert (await old.next())["id"] == 2  # in flight on the old connection

        new_cert = cluster.write_identity(identity)
        new = await proxy.sessions.get()
        assert new.peer_cert == new_cert != old.peer_cert
        assert await new.next() == INITIALIZED
        replayed = new.seen[0]
        assert replayed["method"] == "initialize" and replayed["params"] == INITIALIZE_PARAMS
        assert replayed["id"] != 1

        client.request(3, "echo", {"n": 3})  # new requests take the new connection
        assert await client.next() == {
            "jsonrpc": "2.0",
            "id": 3,
            "result": {"echo": {"n": 3}, "from": 2},
        }
        old.respond(2, {"content": []})  # the old one still answers what it carries
        assert await client.next() == {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}
        assert await old.next() is None  # then the connector closes it
        assert client.received.empty()  # no replayed answer, no error

    assert run(bridged(cluster, scenario)) == 0


def test_dropped_connection_fails_requests_in_flight_then_reconnects(cluster: Cluster) -> None:
    async def scenario(proxy: FakeProxy, client: Client, identity: Path) -> None:
        old = await initialized_session(proxy, client)
        client.request(2, "tools/call", {"name": "slow"})
        assert (await old.next())["id"] == 2
        old.writer.close()  # proxy restart or session expiry

        assert await client.next() == {
            "jsonrpc": "2.0",
            "id": 2,
            "error": {"code": connector.LOST_CODE, "message": connector.LOST_MESSAGE},
        }
        new = await proxy.sessions.get()
        assert await new.next() == INITIALIZED
        assert new.seen[0]["method"] == "initialize"
        client.request(3, "echo", {"n": 3})
        assert await client.next() == {
            "jsonrpc": "2.0",
            "id": 3,
            "result": {"echo": {"n": 3}, "from": 2},
        }
        assert client.received.empty()

    assert run(bridged(cluster, scenario)) == 0


def test_requests_sent_while_reconnecting_wait_through_failed_attempts(cluster: Cluster) -> None:
    async def scenario(proxy: FakeProxy, client: Client, identity: Path) -> None:
        old = await initialized_session(proxy, client)
        proxy.refusal = "the auth service is unavailable"
        old.writer.close()
        await proxy.refused.get()  # the first reconnect attempt failed
        client.request(3, "echo", {"n": 3})
        await proxy.refused.get()  # and a second one, with the request waiting
        proxy.refusal = ""
        assert await client.next() == {
            "jsonrpc": "2.0",
            "id": 3,
            "result": {"echo": {"n": 3}, "from": 2},
        }

    assert run(bridged(cluster, scenario)) == 0


def test_new_messages_leave_a_session_once_its_end_has_passed(cluster: Cluster) -> None:
    async def scenario(proxy: FakeProxy, client: Client, identity: Path) -> None:
        old = await proxy.sessions.get()
        await proxy.sessions.get()  # the fake proxy never cuts: the connector moved itself
        client.request(3, "echo", {})
        assert (await client.next())["result"]["from"] == 2
        assert await old.next() is None and old.seen == []

    assert run(bridged(cluster, scenario, first_session=timedelta(seconds=0.5))) == 0


def test_client_response_goes_back_to_the_connection_that_asked(cluster: Cluster) -> None:
    async def scenario(proxy: FakeProxy, client: Client, identity: Path) -> None:
        old = await initialized_session(proxy, client)
        ask = {"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "params": {}}
        old.send(ask)
        assert await client.next() == ask

        cluster.write_identity(identity)
        new = await proxy.sessions.get()
        assert await new.next() == INITIALIZED

        answer = {"jsonrpc": "2.0", "id": "s1", "result": {"text": "hi"}}
        client.send(answer)
        assert await old.next() == answer
        assert await old.next() is None  # drained, so closed
        client.request(3, "echo", {})
        assert (await client.next())["result"]["from"] == 2
        assert all(m.get("id") != "s1" for m in new.seen)

    assert run(bridged(cluster, scenario)) == 0


def test_stdin_eof_still_delivers_the_answers_in_flight_then_exits_0(cluster: Cluster) -> None:
    async def scenario(proxy: FakeProxy, client: Client, identity: Path) -> None:
        session = await proxy.sessions.get()
        client.request(5, "tools/call", {"name": "slow"})
        assert (await session.next())["id"] == 5
        client.stdin.feed_eof()
        session.respond(5, {"content": []})
        assert await client.next() == {"jsonrpc": "2.0", "id": 5, "result": {"content": []}}
        assert await session.next() is None  # the connector hung up once it was answered

    assert run(bridged(cluster, scenario)) == 0


def test_invalid_json_from_the_client_gets_a_parse_error(cluster: Cluster) -> None:
    async def scenario(proxy: FakeProxy, client: Client, identity: Path) -> None:
        await proxy.sessions.get()
        client.stdin.feed_data(b"{not json\n")
        answer = await client.next()
        assert answer["id"] is None and answer["error"]["code"] == -32700

    assert run(bridged(cluster, scenario)) == 0


async def connector_process(
    address: dial.ProxyAddress, identity: Path
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tbot_py",
        "mcp",
        "connect",
        "-i",
        str(identity),
        "--proxy",
        str(address),
        APP,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def test_process_bridges_pipes_and_exits_0_on_stdin_eof(cluster: Cluster) -> None:
    async def scenario() -> tuple[int | None, bytes, bytes]:
        identity = cluster.dir / "identity"
        cluster.write_identity(identity)
        proxy = FakeProxy(cluster)
        process = await connector_process(await proxy.start(), identity)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(
            tunnel.encode_line({"jsonrpc": "2.0", "id": 7, "method": "echo", "params": {}})
        )
        line = await process.stdout.readline()
        process.stdin.close()
        _, stderr = await process.communicate()
        await proxy.close()
        return process.returncode, line, stderr

    code, line, stderr = run(scenario())
    assert json.loads(line) == {"jsonrpc": "2.0", "id": 7, "result": {"echo": {}, "from": 1}}
    assert (code, stderr) == (0, b"")


def test_refused_hello_is_one_stderr_line_and_exit_1(cluster: Cluster) -> None:
    async def scenario() -> tuple[int | None, bytes, bytes]:
        identity = cluster.dir / "identity"
        cluster.write_identity(identity)
        proxy = FakeProxy(cluster)
        proxy.refusal = f'app "{APP}" not found'
        process = await connector_process(await proxy.start(), identity)
        stdout, stderr = await process.communicate(b"")
        await proxy.close()
        return process.returncode, stdout, stderr

    code, stdout, stderr = run(scenario())
    assert (code, stdout) == (1, b"")
    lines = stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ERROR: ") and f'app "{APP}" not found' in lines[0]
    assert "PRIVATE KEY" not in lines[0] and "CERTIFICATE" not in lines[0]


def test_unreachable_proxy_is_exit_1_and_bad_flags_exit_2(cluster: Cluster) -> None:
    identity = cluster.dir / "identity"
    cluster.write_identity(identity)
    runner = CliRunner()
    bad = runner.invoke(cli, ["mcp", "connect", "-i", str(identity), "--proxy", "http://x:1", APP])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1
    assert "invalid --proxy" in bad.output
    bad_app = runner.invoke(cli, ["mcp", "connect", "-i", str(identity), "--proxy", "h:1", "a b"])
    assert bad_app.exit_code == 2 and "invalid app name" in bad_app.output

    async def unreachable() -> None:
        # A port that was free a moment ago: nothing listens there.
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        await dial.open_tunnel(
            dial.ProxyAddress("127.0.0.1", port), identity, tunnel.Hello(app=APP)
        )

    unreachable_message = r"cannot reach the access proxy at 127\.0\.0\.1:"
    with pytest.raises(dial.ProxyError, match=unreachable_message):
        run(unreachable())


def test_unusable_identity_file_is_one_line_without_its_content(cluster: Cluster) -> None:
    identity = cluster.dir / "identity"
    identity.write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    address = dial.ProxyAddress("127.0.0.1", 1)
    with pytest.raises(IdentityError) as caught:
        run(dial.open_tunnel(address, identity, tunnel.Hello(app=APP)))
    assert "c2VjcmV0" not in str(caught.value) and "\n" not in str(caught.value)


def ls_output(cluster: Cluster, output_format: str) -> str:
    identity = cluster.dir / "identity"
    cluster.write_identity(identity)

    async def scenario() -> str:
        proxy = FakeProxy(cluster)
        proxy.apps = [
            {
                "name": "inventory",
                "description": "Stock levels",
                "uri": "mcp+http://127.0.0.1:8000/mcp",
                "labels": {"team": "ops", "env": "dev"},
                "tools": {"allow": ["*"], "deny": ["delete_*", "drop"]},
            },
            {
                "name": "weather",
                "description": "",
                "uri": "mcp+stdio://",
                "labels": {},
                "tools": {"allow": ["get_*"], "deny": []},
            },
        ]
        address = await proxy.start()
        args = [
            "mcp",
            "ls",
            "-i",
            str(identity),
            "--proxy",
            str(address),
            "--format",
            output_format,
        ]
        result = await asyncio.to_thread(CliRunner().invoke, cli, args)
        await proxy.close()
        assert result.exit_code == 0, result.output
        return result.output

    return run(scenario())


def test_ls_prints_a_table_with_denied_tools_as_except(cluster: Cluster) -> None:
    assert ls_output(cluster, "text").splitlines() == [
        "NAME       DESCRIPTION   LABELS            ALLOWED TOOLS",
        "inventory  Stock levels  env=dev,team=ops  * except delete_*,drop",
        "weather                                    get_*",
    ]


def test_ls_json_prints_the_apps_as_the_proxy_sent_them(cluster: Cluster) -> None:
    apps = json.loads(ls_output(cluster, "json"))
    assert [a["name"] for a in apps] == ["inventory", "weather"]
    assert apps[0]["tools"] == {"allow": ["*"], "deny": ["delete_*", "drop"]}


def test_connector_and_its_cli_load_no_server_http_or_authz_code() -> None:
    modules = loaded_modules("import tbot_py.mcp.connector, tbot_py.cli.mcp")
    forbidden = ("aiohttp", "tbot_py.authservice", "tbot_py.mcp.authz")
    assert [m for m in modules if m.startswith(forbidden)] == []
