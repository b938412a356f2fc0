"""MCP access end to end: SDK client -> ``tbot-py mcp connect`` -> access proxy -> SDK servers.

Everything is a real process on 127.0.0.1: the auth service; tbot-py writing each bot's
identity file (one-shot, or the daemon renewing every few seconds); ``tbot-py mcp-proxy
start``; the upstream MCP servers (``tests/mcp_upstream_server.py``, the official ``mcp``
SDK's FastMCP) over stdio and over streamable HTTP; and the client, the SDK's
``ClientSession`` (or LangChain's ``MultiServerMCPClient``) running ``tbot-py mcp connect``
as its stdio server command. Each upstream logs every tool call it receives, so a denied
call is shown never to have reached it; the HTTP upstream verifies the bearer JWT against
the auth service's JWKS with audience = the app's URI and logs the JWT's subject.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    TBOT,
    AuthService,
    clean_env,
    free_port,
    run_tbot,
    start_auth_service,
    start_identity_args,
    stop_process,
)

UPSTREAM = str(Path(__file__).parents[1] / "mcp_upstream_server.py")
ALL_TOOLS = {"get_weather", "list_items", "delete_item"}
READ_ONLY_TOOLS = {"get_weather", "list_items"}

ROLES = {
    "mcp-proxy": """\
kind: role
version: v7
metadata: {name: mcp-proxy}
spec:
  allow:
    rules:
      - resources: [app_session, host_cert]
        verbs: [create]
""",
    "mcp-read-only": """\
kind: role
version: v7
metadata: {name: mcp-read-only}
spec:
  allow:
    app_labels: {'*': '*'}
    mcp: {tools: ['^(get|query|list|search|find)_.*$']}
""",
    "mcp-dev-all": """\
kind: role
version: v7
metadata: {name: mcp-dev-all}
spec:
  allow:
    app_labels: {env: dev}
    mcp: {tools: ['*']}
""",
}


def read_ready_line(process: subprocess.Popen[str], what: str, timeout: float = 30) -> Any:
    """The one JSON line a child prints on stdout once it serves."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout=timeout):
        process.kill()
        raise AssertionError(f"{what} did not become ready within {timeout}s")
    line = process.stdout.readline()
    if not line:
        raise AssertionError(f"{what} exited with {process.wait()} before ready")
    return json.loads(line)


def calls(log: Path) -> list[dict[str, Any]]:
    """The tool calls (and rejections) an upstream logged, in order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@dataclass
class Cluster:
    auth: AuthService
    proxy_addr: str
    proxy_audit: Path
    identities: dict[str, Path]
    stdio_log: Path
    http_log: Path
    http_uri: str
    tmp: Path

    def connect_args(self, bot: str, app: str) -> list[str]:
        return ["mcp", "connect", "-i", str(self.identities[bot]), "--proxy", self.proxy_addr, app]

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.proxy_audit.read_text().splitlines() if line]


def write_identity(auth: AuthService, tmp: Path, bot: str, roles: str) -> Path:
    """A one-shot identity output for a new bot holding ``roles``; returns the identity file."""
    token = auth.add_bot(bot, roles=roles)
    out = tmp / f"id-{bot}"
    done = run_tbot(
        *start_identity_args(auth, out, tmp / f"storage-{bot}"),
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )
    assert done.returncode == 0, done.stderr
    return out / "identity"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("mcp")
    auth = start_auth_service(tmp / "auth")
    processes: list[subprocess.Popen[str]] = []
    try:
        for name, text in ROLES.items():
            (tmp / f"{name}.yaml").write_text(text)
            created = run_tbot("auth", "create", "-f", str(tmp / f"{name}.yaml"),
                               "--data-dir", str(auth.data_dir))  # fmt: skip
            assert created.returncode == 0, created.stderr

        # The streamable-HTTP upstream, registered on the auth service as an app resource.
        port = free_port()
        http_uri = f"mcp+http://127.0.0.1:{port}/mcp"
        http_log = tmp / "http-calls.jsonl"
        identities = {"proxy": write_identity(auth, tmp, "proxy", "mcp-proxy")}
        host_ca = identities["proxy"].parent / "teleport-host-ca.crt"
        upstream = subprocess.Popen(
            [sys.executable, UPSTREAM, "--transport", "http", "--port", str(port),
             "--call-log", str(http_log),
             "--jwks-url", f"https://{auth.addr}/.well-known/jwks.json",
             "--audience", http_uri, "--issuer", f"https://{auth.addr}",
             "--ca-file", str(host_ca)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean_env(),
        )  # fmt: skip
        processes.append(upstream)
        read_ready_line(upstream, "the HTTP MCP server")
        app = tmp / "inventory-http.yaml"
        app.write_text(
            "kind: app\nversion: v3\n"
            "metadata: {name: inventory-http, labels: {env: dev}, description: HTTP upstream}\n"
            f"spec:\n  uri: {http_uri}\n"
            "  rewrite: {headers: ['Authorization: Bearer {{internal.id_token}}']}\n"
        )
        created = run_tbot("auth", "create", "-f", str(app), "--data-dir", str(auth.data_dir))
        assert created.returncode == 0, created.stderr

        # Two stdio upstreams in the proxy's own config: one env: dev, one env: prod.
        stdio_log = tmp / "stdio-calls.jsonl"
        proxy_audit = tmp / "proxy-audit.jsonl"
        config = tmp / "proxy.yaml"
        stdio_args = json.dumps([UPSTREAM, "--transport", "stdio", "--call-log", str(stdio_log)])
        config.write_text(
            "version: v1\n"
            "listen: 127.0.0.1:0\n"
            f"auth_server: {auth.addr}\n"
            f"identity: {identities['proxy']}\n"
            f"audit_log: {proxy_audit}\n"
            "session_recheck: 1s\n"
            "apps:\n"
            "  - name: weather-stdio\n"
            "    description: stdio upstream\n"
            "    uri: mcp+stdio://\n"
            "    labels: {env: dev}\n"
            f"    mcp: {{command: {json.dumps(sys.executable)}, args: {stdio_args}}}\n"
            "  - name: prod-tools\n"
            "    uri: mcp+stdio://\n"
            "    labels: {env: prod}\n"
            f"    mcp: {{command: {json.dumps(sys.executable)}, args: {stdio_args}}}\n"
        )
        with (tmp / "proxy.log").open("w") as proxy_log:
            proxy = subprocess.Popen(
                [TBOT, "mcp-proxy", "start", "--config", str(config)],
                stdout=subprocess.PIPE, stderr=proxy_log, text=True, env=clean_env(),
            )  # fmt: skip
        processes.append(proxy)
        ready = read_ready_line(proxy, "the MCP access proxy")

        identities["ro"] = write_identity(auth, tmp, "agent-ro", "mcp-read-only")
        identities["dev"] = write_identity(auth, tmp, "agent-dev", "mcp-dev-all")
        yield Cluster(
            auth=auth,
            proxy_addr=ready["addr"],
            proxy_audit=proxy_audit,
            identities=identities,
            stdio_log=stdio_log,
            http_log=http_log,
            http_uri=http_uri,
            tmp=tmp,
        )
    finally:
        for process in reversed(processes):
            stop_process(process)
        auth.stop()


# -- the SDK client ----------------------------------------------------------------------


async def _session_run(args: list[str], steps: Any) -> Any:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(command=TBOT, args=args, env=clean_env())
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        return await steps(session)


def with_session(cluster: Cluster, bot: str, app: str, steps: Any) -> Any:
    return asyncio.run(asyncio.wait_for(_session_run(cluster.connect_args(bot, app), steps), 60))


async def tool_names(session: Any) -> set[str]:
    listed = await session.list_tools()
    return {tool.name for tool in listed.tools}


async def denied_call(session: Any, tool: str) -> str:
    """Call ``tool`` in ``session`` and return the JSON-RPC error message the client got."""
    from mcp.shared.exceptions import McpError

    try:
        result = await session.call_tool(tool, {"item_id": "42"})
    except McpError as exc:
        return str(exc.error.message)
    raise AssertionError(f"{tool} was not denied: {result}")


# -- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("app", ["weather-stdio", "inventory-http"])
def test_read_only_role_sees_and_calls_only_read_tools(cluster: Cluster, app: str) -> None:
    log = cluster.stdio_log if app == "weather-stdio" else cluster.http_log
    before = len(calls(log))

    async def steps(session: Any) -> tuple[set[str], str, str]:
        names = await tool_names(session)
        result = await session.call_tool("get_weather", {"city": "Lisbon"})
        assert not result.isError
        return names, result.content[0].text, await denied_call(session, "delete_item")

    names, text, message = with_session(cluster, "ro", app, steps)
    assert names == READ_ONLY_TOOLS
    assert "Lisbon" in text
    assert "delete_item" in message
    assert "access denied" in message.lower()
    made = calls(log)[before:]
    assert [c["tool"] for c in made] == ["get_weather"], made
    denied = [
        e
        for e in cluster.audit()
        if e.get("event") == "mcp.request" and e.get("details", {}).get("tool") == "delete_item"
    ]
    assert denied, "the denied call is not in the proxy's audit log"
    assert denied[-1]["details"]["allowed"] == "false"
    assert denied[-1]["resource"] == f"app/{app}"


def test_http_upstream_gets_a_jwt_signed_by_the_auth_service(cluster: Cluster) -> None:
    """The upstream verified the bearer JWT with the JWKS (audience = app URI) and logged sub."""

    async def steps(session: Any) -> None:
        await session.call_tool("list_items", {})

    with_session(cluster, "ro", "inventory-http", steps)
    made = [c for c in calls(cluster.http_log) if c.get("tool") == "list_items"]
    assert made
    assert made[-1]["sub"] == "bot-agent-ro"
    assert not [c for c in calls(cluster.http_log) if "rejected" in c]


@pytest.mark.parametrize("app", ["weather-stdio", "inventory-http"])
def test_dev_role_calls_every_tool_on_dev_apps(cluster: Cluster, app: str) -> None:
    log = cluster.stdio_log if app == "weather-stdio" else cluster.http_log
    before = len(calls(log))

    async def steps(session: Any) -> set[str]:
        names = await tool_names(session)
        result = await session.call_tool("delete_item", {"item_id": "7"})
        assert not result.isError
        return names

    assert with_session(cluster, "dev", app, steps) == ALL_TOOLS
    assert [c["tool"] for c in calls(log)[before:]] == ["delete_item"]


def test_dev_role_does_not_see_or_reach_apps_without_the_label(cluster: Cluster) -> None:
    listed = run_tbot("mcp", "ls", "-i", str(cluster.identities["dev"]),
                      "--proxy", cluster.proxy_addr, "--format", "json")  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    names = {app["name"] for app in json.loads(listed.stdout)}
    assert names == {"weather-stdio", "inventory-http"}
    refused = subprocess.run(
        [TBOT, *cluster.connect_args("dev", "prod-tools")],
        input="", capture_output=True, text=True, env=clean_env(), timeout=30, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, refused.stderr
    assert "prod-tools" in lines[0]


def test_mcp_ls_shows_the_allowed_tools(cluster: Cluster) -> None:
    listed = run_tbot("mcp", "ls", "-i", str(cluster.identities["ro"]),
                      "--proxy", cluster.proxy_addr)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    for name in ("weather-stdio", "inventory-http", "prod-tools"):
        assert name in listed.stdout
    assert "^(get|query|list|search|find)_.*$" in listed.stdout


def test_langchain_mcp_adapters_get_tools_through_the_connector(cluster: Cluster) -> None:
    from langchain_mcp_adapters.client import MultiServerMCPClient

    client = MultiServerMCPClient(
        {
            "weather": {
                "transport": "stdio",
                "command": TBOT,
                "args": cluster.connect_args("ro", "weather-stdio"),
                "env": clean_env(),
            }
        }
    )
    tools = asyncio.run(asyncio.wait_for(client.get_tools(), 60))
    assert {tool.name for tool in tools} == READ_ONLY_TOOLS


def test_calls_keep_working_for_a_minute_while_the_daemon_renews(cluster: Cluster) -> None:
    """Identity renewed every 10 s, certificates live 30 s: a minute of calls, none fails.

    The proxy ends each session when the client certificate expires, so only the
    connector's switch to the renewed identity keeps the calls going.
    """
    tmp, auth = cluster.tmp, cluster.auth
    token = auth.add_bot("agent-renew", roles="mcp-read-only")
    out = tmp / "id-renew"
    args = start_identity_args(auth, out, tmp / "storage-renew")
    args.remove("--oneshot")
    with (tmp / "renew-daemon.log").open("w") as daemon_log:
        daemon = subprocess.Popen(
            [TBOT, *args, "--certificate-ttl", "30s", "--renewal-interval", "10s"],
            stdout=subprocess.DEVNULL, stderr=daemon_log,
            env=clean_env(TELEPORT_BOT_TOKEN=token), text=True,
        )  # fmt: skip
    try:
        identity = out / "identity"
        deadline = time.monotonic() + 30
        while not identity.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert identity.exists(), (tmp / "renew-daemon.log").read_text()
        cluster.identities["renew"] = identity
        seen: set[bytes] = set()

        async def steps(session: Any) -> tuple[int, list[str]]:
            ok, failures = 0, []
            end = time.monotonic() + timedelta(minutes=1).total_seconds()
            while time.monotonic() < end:
                seen.add(identity.read_bytes())
                try:
                    result = await session.call_tool("get_weather", {"city": f"c{ok}"})
                except Exception as exc:
                    failures.append(repr(exc))
                    continue
                if result.isError:
                    failures.append(str(result.content))
                else:
                    ok += 1
                await asyncio.sleep(0.2)
            return ok, failures

        ok, failures = asyncio.run(
            asyncio.wait_for(
                _session_run(cluster.connect_args("renew", "weather-stdio"), steps), 120
            )
        )
    finally:
        stop_process(daemon)
    assert failures == []
    assert ok >= 100
    assert len(seen) >= 5, f"the identity changed only {len(seen)} times"
    starts = [
        e
        for e in cluster.audit()
        if e.get("event") == "mcp.session.start"
        and e.get("actor", {}).get("user") == "bot-agent-renew"
    ]
    assert len(starts) >= 4, "the connector did not move to new sessions"


def test_locking_the_bot_ends_its_live_session(cluster: Cluster) -> None:
    """The proxy asks again every second (``session_recheck``): a new lock ends the session."""
    cluster.identities["lock"] = write_identity(cluster.auth, cluster.tmp, "agent-lock",
                                                "mcp-read-only")  # fmt: skip

    async def steps(session: Any) -> str:
        result = await session.call_tool("get_weather", {"city": "Oslo"})
        assert not result.isError
        locked = run_tbot("auth", "locks", "add", "--bot", "agent-lock", "--message", "stolen",
                          "--data-dir", str(cluster.auth.data_dir))  # fmt: skip
        assert locked.returncode == 0, locked.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                result = await session.call_tool("get_weather", {"city": "Oslo"})
            except Exception as exc:
                return repr(exc)
            if result.isError:
                return str(result.content)
            await asyncio.sleep(0.2)
        raise AssertionError("tool calls still succeed 20 s after the lock")

    failure = with_session(cluster, "lock", "weather-stdio", steps)
    assert "access proxy" in failure or "lock" in failure.lower(), failure
    ends = [
        e["details"]["reason"]
        for e in cluster.audit()
        if e.get("event") == "mcp.session.end"
        and e.get("actor", {}).get("user") == "bot-agent-lock"
    ]
    assert any(r.startswith("access was revoked") and "lock" in r.lower() for r in ends), ends


def test_bad_proxy_config_is_one_line_and_exit_2(cluster: Cluster) -> None:
    config = cluster.tmp / "bad-proxy.yaml"
    config.write_text(
        "version: v1\nlisten: 127.0.0.1:0\n"
        f"auth_server: {cluster.auth.addr}\nidentity: {cluster.identities['proxy']}\n"
        "audit_log: /tmp/x.jsonl\nlisten_typo: 1\n"
    )
    done = run_tbot("mcp-proxy", "start", "--config", str(config), timeout=30)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "listen_typo" in lines[0]
    assert str(config) in lines[0]


def test_connector_without_a_readable_identity_is_one_line(cluster: Cluster) -> None:
    done = subprocess.run(
        [TBOT, "mcp", "connect", "-i", str(cluster.tmp / "missing"), "--proxy",
         cluster.proxy_addr, "weather-stdio"],
        input="", capture_output=True, text=True, env=clean_env(), timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "missing" in lines[0]


def test_no_secret_reaches_the_proxy_log_or_audit(cluster: Cluster) -> None:
    key = cluster.identities["ro"].read_text().split("-----BEGIN", 2)[1][:200]
    for path in (cluster.proxy_audit, cluster.tmp / "proxy.log"):
        text = path.read_text()
        assert key not in text
        assert "eyJ" not in text  # no JWT (base64url of '{"') in the logs
    assert os.path.getsize(cluster.proxy_audit) > 0
