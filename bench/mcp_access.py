"""MCP access: what the access proxy adds to a tool call, to a session's start and to throughput.

Everything is a real process on 127.0.0.1: the auth service, ``tbot-py mcp-proxy start``
(its own bot's identity file), the test MCP server ``tests/mcp_upstream_server.py`` (the
official SDK's FastMCP) and, as each session's stdio server command, either that server
itself or ``tbot-py mcp connect``. The client is the SDK's ``ClientSession`` in this
process, calling ``tools/call get_weather`` on four paths:

- **direct stdio**, the baseline: the client spawns the server;
- **proxy, stdio app**: connector -> proxy (mTLS) -> the server, spawned by the proxy
  for the session (an app in the proxy's config);
- **proxy, HTTP app**: connector -> proxy -> the server over streamable HTTP (an app
  resource on the auth service; the proxy adds a bearer JWT, which the server verifies
  against the auth service's JWKS on every request);
- **direct HTTP**: the client to a second HTTP server without the JWT check, to show how
  much of the HTTP app's extra time is the transport rather than the proxy.

Per-call latency interleaves the four sessions call by call, so load drift hits all
alike. Session set-up is timed from spawning the stdio command to ``initialize``
answered. Throughput is 8 calls in flight in one session.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common import (
    PYTHON,
    ROOT,
    TBOT,
    AuthService,
    Context,
    Row,
    Stats,
    auth_service,
    free_port,
    stop_process,
    time_process,
)
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from oneshot import python_env

NAME = "mcp access"
TARGET_ADDED_MS = 5.0  # the proxy path adds at most this per call, at the median
CONCURRENCY = 8
UPSTREAM = str(ROOT / "tests" / "mcp_upstream_server.py")
DIRECT, PROXY_STDIO, PROXY_HTTP, DIRECT_HTTP = (
    "direct stdio", "proxy, stdio app", "proxy, HTTP app", "direct HTTP",
)  # fmt: skip
STDIO_APP, HTTP_APP = "weather-stdio", "weather-http"
MEASURE_TIMEOUT_S = 900.0

#: The proxy's bot may ask for sessions and its server certificate; the agent may use
#: every tool of every app, so no call is denied and every call reaches the server.
ROLES = {
    "mcp-proxy": "kind: role\nversion: v7\nmetadata: {name: mcp-proxy}\n"
    "spec: {allow: {rules: [{resources: [app_session, host_cert], verbs: [create]}]}}\n",
    "mcp-bench": "kind: role\nversion: v7\nmetadata: {name: mcp-bench}\n"
    "spec: {allow: {app_labels: {'*': '*'}, mcp: {tools: ['*']}}}\n",
}


@dataclass
class Target:
    """One way to reach the server: a stdio command (``argv``) or a streamable HTTP ``url``."""

    name: str
    argv: list[str] = field(default_factory=list)
    url: str = ""


@dataclass
class Cluster:
    """The running processes' addresses and what the sessions need."""

    targets: dict[str, Target]
    ls_argv: list[str]
    env: dict[str, str]


def _ready(process: subprocess.Popen[str], what: str, log: Path) -> dict[str, Any]:
    """The one JSON line a child prints on stdout once it serves."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} exited with {process.wait()}: {log.read_text()[-500:]}")
    ready: dict[str, Any] = json.loads(line)
    return ready


def _start(
    stack: ExitStack, argv: list[str], env: dict[str, str], log: Path, what: str
) -> dict[str, Any]:
    """Start ``argv``, its stderr to ``log``, stopped when ``stack`` closes; its ready line."""
    with log.open("w") as err:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    assert process.stdout is not None
    stack.callback(process.stdout.close)
    stack.callback(stop_process, process)
    return _ready(process, what, log)


def _tbot(*args: str, env: dict[str, str]) -> None:
    """Run ``tbot-py ARGS`` to completion; raise with its stderr's tail if it fails."""
    done = subprocess.run([TBOT, *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tbot-py {' '.join(args[:2])} failed: {done.stderr[-500:]}")


def write_identity(
    auth: AuthService, work: Path, bot: str, roles: str, env: dict[str, str]
) -> Path:
    """A one-shot identity output for a new bot holding ``roles``; returns the identity file."""
    out = work / f"id-{bot}"
    token = auth.add_bot(bot, roles=roles)
    _tbot("start", "identity", "--proxy-server", auth.addr, "--ca-pin", auth.ca_pin,
          "--destination", str(out), "--storage", str(work / f"storage-{bot}"), "--oneshot",
          env={**env, "TELEPORT_BOT_TOKEN": token})  # fmt: skip
    return out / "identity"


@contextmanager
def cluster(work: Path) -> Iterator[Cluster]:
    """Auth service, roles, identities, two HTTP servers, the app resource and the proxy."""
    env = python_env(work)
    with auth_service(work / "auth") as auth, ExitStack() as stack:
        for name, text in ROLES.items():
            (work / f"{name}.yaml").write_text(text)
            _tbot("auth", "create", "-f", str(work / f"{name}.yaml"),
                  "--data-dir", str(auth.data_dir), env=env)  # fmt: skip
        proxy_id = write_identity(auth, work, "proxy", "mcp-proxy", env)
        agent_id = write_identity(auth, work, "agent", "mcp-bench", env)

        http = [PYTHON, UPSTREAM, "--transport", "http"]
        plain = _start(stack, http, env, work / "http-plain.log", "the HTTP MCP server")
        # The JWT's audience is the app's URI, so the port is chosen before the server starts.
        port = free_port()
        app_uri = f"mcp+http://127.0.0.1:{port}/mcp"
        _start(stack, [*http, "--port", str(port),
                       "--jwks-url", f"https://{auth.addr}/.well-known/jwks.json",
                       "--audience", app_uri, "--issuer", f"https://{auth.addr}",
                       "--ca-file", str(proxy_id.parent / "teleport-host-ca.crt")],
               env, work / "http-jwt.log", "the HTTP MCP server with the JWT check")  # fmt: skip
        (work / "app.yaml").write_text(
            f"kind: app\nversion: v3\nmetadata: {{name: {HTTP_APP}, labels: {{env: bench}}}}\n"
            f"spec:\n  uri: {app_uri}\n"
            "  rewrite: {headers: ['Authorization: Bearer {{internal.id_token}}']}\n"
        )
        _tbot("auth", "create", "-f", str(work / "app.yaml"),
              "--data-dir", str(auth.data_dir), env=env)  # fmt: skip

        stdio = [UPSTREAM, "--transport", "stdio"]
        config = work / "proxy.yaml"
        config.write_text(
            f"version: v1\nlisten: 127.0.0.1:0\nauth_server: {auth.addr}\n"
            f"identity: {proxy_id}\naudit_log: {work / 'audit.jsonl'}\n"
            f"apps:\n  - name: {STDIO_APP}\n    uri: mcp+stdio://\n    labels: {{env: bench}}\n"
            f"    mcp: {{command: {json.dumps(PYTHON)}, args: {json.dumps(stdio)}}}\n"
        )
        proxy = _start(stack, [TBOT, "mcp-proxy", "start", "--config", str(config)],
                       env, work / "proxy.log", "the MCP access proxy")  # fmt: skip
        connect = [TBOT, "mcp", "connect", "-i", str(agent_id), "--proxy", proxy["addr"]]
        yield Cluster(
            targets={
                DIRECT: Target(DIRECT, argv=[PYTHON, *stdio]),
                PROXY_STDIO: Target(PROXY_STDIO, argv=[*connect, STDIO_APP]),
                PROXY_HTTP: Target(PROXY_HTTP, argv=[*connect, HTTP_APP]),
                DIRECT_HTTP: Target(DIRECT_HTTP, url=plain["url"]),
            },
            ls_argv=[TBOT, "mcp", "ls", "-i", str(agent_id), "--proxy", proxy["addr"]],
            env=env,
        )


@asynccontextmanager
async def session(target: Target, env: dict[str, str], errlog: IO[str]) -> AsyncIterator[Any]:
    """An initialized ``ClientSession`` on ``target``; its process ends when this exits."""
    async with AsyncExitStack() as stack:
        if target.url:
            read, write, _ = await stack.enter_async_context(streamable_http_client(target.url))
        else:
            params = StdioServerParameters(command=target.argv[0], args=target.argv[1:], env=env)
            read, write = await stack.enter_async_context(stdio_client(params, errlog=errlog))
        client = await stack.enter_async_context(ClientSession(read, write))
        await client.initialize()
        yield client


async def call_ms(client: Any, city: str) -> float:
    """One ``tools/call get_weather``, checked, in milliseconds."""
    start = time.perf_counter()
    result = await client.call_tool("get_weather", {"city": city})
    elapsed = (time.perf_counter() - start) * 1000
    if result.isError or city not in result.content[0].text:
        raise RuntimeError(f"get_weather({city!r}) failed: {result.content}")
    return elapsed


async def calls_per_s(client: Any, calls: int) -> float:
    """Calls per second with ``CONCURRENCY`` calls in flight in one session."""

    async def worker(k: int) -> None:
        for i in range(calls // CONCURRENCY):
            await call_ms(client, f"city-{k}-{i}")

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
    return (calls // CONCURRENCY) * CONCURRENCY / (time.perf_counter() - start)


@dataclass
class Results:
    """Per path: call latencies (ms) and rates (calls/s); set-up times (ms) of two paths."""

    latency: dict[str, Stats]
    rate: dict[str, Stats]
    setup: dict[str, Stats]


async def measure(ctx: Context, c: Cluster, errlog: IO[str]) -> Results:
    """Every figure, the paths interleaved within each measurement."""
    calls, warm_calls = ctx.reps(300, quick=60), ctx.reps(20, quick=10)
    rounds, round_calls = ctx.reps(5, quick=2), ctx.reps(400, quick=160)
    setups = ctx.reps(9, quick=3)
    latency: dict[str, list[float]] = {name: [] for name in c.targets}
    rate: dict[str, list[float]] = {name: [] for name in c.targets}
    async with AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(session(target, c.env, errlog))
            for name, target in c.targets.items()
        }
        for i in range(warm_calls + calls):
            for name, client in clients.items():
                elapsed = await call_ms(client, f"city-{i}")
                if i >= warm_calls:
                    latency[name].append(elapsed)
        for name, values in latency.items():
            ctx.log(f"   per call, {name}: {Stats.of(values).text('ms', 2)}")
        for i in range(1 + rounds):
            for name, client in clients.items():
                per_s = await calls_per_s(client, round_calls if i else round_calls // 4)
                if i:
                    rate[name].append(per_s)
    setup: dict[str, list[float]] = {DIRECT: [], PROXY_STDIO: [], "ls": []}
    for i in range(1 + setups):
        for name in (DIRECT, PROXY_STDIO):
            start = time.perf_counter()
            async with session(c.targets[name], c.env, errlog):
                elapsed = (time.perf_counter() - start) * 1000
            if i:
                setup[name].append(elapsed)
        ls_ms = await asyncio.to_thread(time_process, c.ls_argv, c.env)
        if i:
            setup["ls"].append(ls_ms)
    return Results(
        latency={n: Stats.of(v) for n, v in latency.items()},
        rate={n: Stats.of(v) for n, v in rate.items()},
        setup={n: Stats.of(v) for n, v in setup.items()},
    )


def _plus(ours: Stats, base: Stats) -> str:
    """The difference of two medians in ms, signed."""
    return f"{ours.median - base.median:+.2f} ms"


def run(ctx: Context) -> list[Row]:
    with cluster(ctx.work) as c, (ctx.work / "client-stderr.log").open("w") as errlog:
        results = asyncio.run(asyncio.wait_for(measure(ctx, c, errlog), MEASURE_TIMEOUT_S))
    lat, rate, setup = results.latency, results.rate, results.setup
    base, http = lat[DIRECT], lat[DIRECT_HTTP]
    rows = [
        Row(NAME, "tools/call, direct stdio", base.median, "ms", ours_text=base.text("ms", 2),
            notes="SDK ClientSession -> the FastMCP server it spawned; the baseline"),
    ]  # fmt: skip
    for name in (PROXY_STDIO, PROXY_HTTP):
        ours = lat[name]
        notes = f"{_plus(ours, base)} per call at the median"
        if name == PROXY_HTTP:
            notes += f"; direct HTTP alone is {_plus(http, base)}, the proxy {_plus(ours, http)}"
        rows.append(
            Row(NAME, f"tools/call, {name}", ours.median, "ms", ours_text=ours.text("ms", 2),
                peer=DIRECT, peer_value=base.median, peer_text=base.text("ms", 2),
                ratio=ours.median / base.median, ratio_text="proxy/direct",
                target=f"≤ +{TARGET_ADDED_MS:g} ms",
                passed=ours.median - base.median <= TARGET_ADDED_MS, notes=notes)
        )  # fmt: skip
    rows.append(
        Row(NAME, "tools/call, direct HTTP (no proxy, no JWT)", http.median, "ms",
            ours_text=http.text("ms", 2), peer=DIRECT, peer_value=base.median,
            ratio=http.median / base.median, ratio_text="HTTP/stdio",
            notes="the transport alone, to read the HTTP app's row by")
    )  # fmt: skip
    direct, proxied, ls = setup[DIRECT], setup[PROXY_STDIO], setup["ls"]
    extra = proxied.median - direct.median
    # Both paths start the same server (the proxy spawns it per session); what differs is
    # the connector's own start, TLS to the proxy and the proxy's round trip to the auth
    # service, which `tbot-py mcp ls` does too (with a list instead of a session).
    larger = "the server's start" if direct.median >= extra else "the connector and proxy's share"
    rows.append(
        Row(NAME, "session set-up, connector + proxy (stdio app)", proxied.median, "ms",
            ours_text=proxied.text("ms"), peer="direct stdio spawn", peer_value=direct.median,
            peer_text=direct.text("ms"), ratio=proxied.median / direct.median,
            ratio_text="proxy/direct",
            notes="from spawning the stdio command until initialize is answered; the proxy "
            f"path adds {extra:+.0f} ms (the connector's start-up, TLS to the proxy, one proxy "
            f"-> auth round trip: `tbot-py mcp ls` takes {ls.text('ms')}) to the server's own "
            f"start, {direct.median:.0f} ms on both paths; {larger} is the larger part")
    )  # fmt: skip
    for name in (PROXY_STDIO, PROXY_HTTP):
        ours, peer = rate[name], rate[DIRECT]
        notes = "one session"
        if name == PROXY_HTTP:
            notes += f"; direct HTTP {rate[DIRECT_HTTP].text('calls/s', 0)}"
        rows.append(
            Row(NAME, f"calls/s, {CONCURRENCY} in flight, {name}", ours.median, "calls/s",
                ours_text=ours.text("calls/s", 0), peer=DIRECT, peer_value=peer.median,
                peer_text=peer.text("calls/s", 0), ratio=ours.median / peer.median,
                ratio_text="proxy/direct, higher is better", notes=notes)
        )  # fmt: skip
    return rows
