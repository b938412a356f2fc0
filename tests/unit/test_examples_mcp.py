"""The MCP walkthrough in examples/mcp stays true: its files load and its claims hold."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import py_compile
import runpy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tbot_py.authservice import rbac
from tbot_py.authservice.apps import parse_app_yaml
from tbot_py.authservice.roles import Role, parse_role_yaml
from tbot_py.config import load_config_file
from tbot_py.config.schema import DirectoryDestination, IdentityServiceConfig
from tbot_py.mcp import clientconfig
from tbot_py.mcp.proxyconfig import ProxyConfig, load_proxy_config, rewrite_headers

MCP = Path(__file__).parents[2] / "examples" / "mcp"
ROLE_FILES = sorted((MCP / "roles").glob("*.yaml"))
APP_FILES = sorted((MCP / "apps").glob("*.yaml"))
AGENT_IDENTITY = "/opt/machine-id/identity"
AGENT_ROLES = ("mcp-dev-all", "mcp-read-only")


def role(name: str) -> Role:
    path = MCP / "roles" / f"{name}.yaml"
    return parse_role_yaml(path.read_text(), source=str(path))


def identity_output(config_name: str) -> tuple[IdentityServiceConfig, str]:
    """The bot config's one identity service, and the directory it writes to."""
    config = load_config_file(MCP / config_name)
    assert config.require_address()
    [service] = config.services
    assert isinstance(service, IdentityServiceConfig)
    assert isinstance(service.destination, DirectoryDestination)
    return service, service.destination.path


def proxy_config() -> ProxyConfig:
    return load_proxy_config(MCP / "proxy.yaml")


def example_server(name: str) -> dict[str, Any]:
    """The globals of examples/mcp/servers/NAME.py, run as a module (not as __main__)."""
    return runpy.run_path(str(MCP / "servers" / f"{name}.py"))


@functools.cache
def server_tools(name: str) -> list[str]:
    """The tool names of examples/mcp/servers/NAME.py, asked through the MCP SDK."""
    module = example_server(name)
    server = module["build_server"](None) if "build_server" in module else module["server"]
    return sorted(tool.name for tool in asyncio.run(server.list_tools()))


# --- bots --------------------------------------------------------------------------------------


def test_agent_bot_writes_its_identity_to_opt_machine_id_with_the_mcp_roles() -> None:
    output, path = identity_output("agent-bot.yaml")
    assert path == "/opt/machine-id"
    assert tuple(output.roles) == AGENT_ROLES
    assert {p.stem for p in ROLE_FILES} >= set(AGENT_ROLES)


def test_proxy_bot_writes_the_identity_file_the_proxy_reads() -> None:
    output, path = identity_output("proxy-bot.yaml")
    assert tuple(output.roles) == ("mcp-proxy",)
    assert proxy_config().identity == f"{path}/identity"
    assert proxy_config().auth_server == load_config_file(MCP / "proxy-bot.yaml").auth_server


# --- roles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ROLE_FILES, ids=[p.name for p in ROLE_FILES])
def test_role_file_parses_and_is_named_after_its_file(path: Path) -> None:
    assert parse_role_yaml(path.read_text(), source=str(path)).name == path.stem


@pytest.mark.parametrize("tool", ["get_weather", "list_items", "search_docs", "find_user"])
def test_read_only_role_allows_read_tools_on_any_app(tool: str) -> None:
    decision = rbac.check_app_access([role("mcp-read-only")], "inventory", {"env": "prod"}, tool)
    assert decision.allowed, decision.reason


@pytest.mark.parametrize("tool", ["delete_item", "set_alert", "getweather", "forget_me"])
def test_read_only_role_denies_other_tools(tool: str) -> None:
    decision = rbac.check_app_access([role("mcp-read-only")], "inventory", {"env": "prod"}, tool)
    assert not decision.allowed
    assert decision.reason == f'no role allows tool "{tool}" on app "inventory"'


def test_dev_all_role_allows_every_tool_on_dev_apps_only() -> None:
    roles = [role("mcp-dev-all")]
    assert rbac.check_app_access(roles, "weather", {"env": "dev"}, "set_alert").allowed
    assert not rbac.check_app_access(roles, "inventory", {"env": "prod"}, "list_items").allowed
    assert not rbac.check_app_access(roles, "unlabelled", {}).allowed


def test_proxy_role_may_ask_for_sessions_and_its_certificate_but_reaches_no_app() -> None:
    roles = [role("mcp-proxy")]
    assert rbac.check_rule(roles, "app_session", "create").allowed
    assert rbac.check_rule(roles, "host_cert", "create").allowed
    assert not rbac.check_app_access(roles, "weather", {"env": "dev"}).allowed


# --- apps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", APP_FILES, ids=[p.name for p in APP_FILES])
def test_app_resource_parses_as_an_mcp_app(path: Path) -> None:
    app = parse_app_yaml(path.read_text(), source=str(path))
    assert app.name == path.stem
    assert app.spec.uri.startswith("mcp+")


def test_there_is_an_app_resource() -> None:
    assert APP_FILES


# --- proxy.yaml --------------------------------------------------------------------------------


def test_proxy_config_loads_with_one_stdio_and_one_http_app() -> None:
    config = proxy_config()
    assert config.listen == "127.0.0.1:3080"
    assert config.public_hosts == ("mcp.example.com",)
    weather, inventory = config.config_app("weather"), config.config_app("inventory")
    assert weather is not None
    assert inventory is not None
    assert weather.uri == "mcp+stdio://"
    assert weather.mcp is not None
    assert weather.mcp.args == ("examples/mcp/servers/weather.py",)
    assert dict(weather.labels) == {"env": "dev"}
    assert inventory.uri.startswith("mcp+http://")
    assert dict(inventory.labels) == {"env": "prod"}
    assert inventory.to_mcp_app().headers == ("Authorization: Bearer {{internal.id_token}}",)


def test_proxy_config_header_becomes_a_bearer_jwt() -> None:
    inventory = proxy_config().config_app("inventory")
    assert inventory is not None
    headers = rewrite_headers(inventory.to_mcp_app().headers, "header.payload.sig")
    assert headers == {"Authorization": "Bearer header.payload.sig"}


def test_stdio_servers_exist_where_the_configs_start_them() -> None:
    root = MCP.parents[1]  # the walkthrough runs from the repository root
    weather = proxy_config().config_app("weather")
    assert weather is not None
    assert weather.mcp is not None
    weather_prod = parse_app_yaml((MCP / "apps" / "weather-prod.yaml").read_text())
    assert weather_prod.spec.mcp is not None
    for args in (weather.mcp.args, weather_prod.spec.mcp.args):
        assert (root / args[0]).is_file()


# --- what the agent sees (the README's claims) -------------------------------------------------


def test_example_servers_have_read_and_write_tools() -> None:
    assert server_tools("weather") == ["get_weather", "list_stations", "set_alert"]
    assert server_tools("inventory") == ["delete_item", "get_item", "list_items"]


@pytest.mark.parametrize(
    ("app", "labels", "server", "allowed"),
    [
        ("weather", {"env": "dev"}, "weather", ["get_weather", "list_stations", "set_alert"]),
        ("inventory", {"env": "prod"}, "inventory", ["get_item", "list_items"]),
        ("weather-prod", {"env": "prod"}, "weather", ["get_weather", "list_stations"]),
    ],
)
def test_agent_roles_allow_the_tools_the_readme_lists(
    app: str, labels: dict[str, str], server: str, allowed: list[str]
) -> None:
    roles = [role(name) for name in AGENT_ROLES]
    got = [t for t in server_tools(server) if rbac.check_app_access(roles, app, labels, t).allowed]
    assert got == allowed
    readme = (MCP / "README.md").read_text()
    assert f"# {app}: {', '.join(allowed)}\n" in readme


def test_weather_prod_resource_carries_the_labels_the_readme_assumes() -> None:
    app = parse_app_yaml((MCP / "apps" / "weather-prod.yaml").read_text())
    assert dict(app.labels) == {"env": "prod"}


def test_mcp_ls_table_in_readme_is_what_the_proxy_and_cli_print(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tbot_py.cli.auth._common import print_table
    from tbot_py.cli.mcp import app_rows
    from tbot_py.mcp.proxy import tool_patterns

    roles = [role(name) for name in AGENT_ROLES]
    resource = parse_app_yaml((MCP / "apps" / "weather-prod.yaml").read_text())
    apps = [(app.name, app.description, dict(app.labels)) for app in proxy_config().apps]
    apps.append((resource.name, resource.metadata.description, dict(resource.labels)))
    listed = [
        {"name": n, "description": d, "labels": labels, "tools": tool_patterns(roles, labels)}
        for n, d, labels in sorted(apps)
    ]
    print_table(("NAME", "DESCRIPTION", "LABELS", "ALLOWED TOOLS"), app_rows(listed))
    table = "".join(f"# {line}\n" for line in capsys.readouterr().out.splitlines())
    assert table in (MCP / "README.md").read_text()


# --- clients -----------------------------------------------------------------------------------


def test_claude_desktop_config_is_what_mcp_config_writes() -> None:
    document = clientconfig.parse_client_config(
        (MCP / "claude_desktop_config.json").read_bytes(), source="claude_desktop_config.json"
    )
    [(name, entry)] = document["mcpServers"].items()
    assert name == clientconfig.server_name("weather")
    # `mcp config` writes an absolute path; the example says "tbot-py" on PATH.
    assert entry["command"] == "tbot-py"
    expected = clientconfig.connector_entry(
        "/usr/local/bin/tbot-py", AGENT_IDENTITY, "mcp.example.com:3080", "weather"
    )
    assert {**entry, "command": expected["command"]} == expected
    # Byte for byte what `mcp config --write` makes of an empty file, but for the command.
    rendered = clientconfig.render_client_config({"mcpServers": {name: {**expected, **entry}}})
    assert (MCP / "claude_desktop_config.json").read_text() == rendered


def test_langgraph_agent_compiles_and_passes_ruff(tmp_path: Path) -> None:
    script = MCP / "langgraph_agent.py"
    py_compile.compile(str(script), cfile=str(tmp_path / "agent.pyc"), doraise=True)
    for check in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *check, str(script)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_langgraph_agent_lists_tools_through_the_connector_command(tmp_path: Path) -> None:
    # A stand-in for `tbot-py`: records its argv, then serves the weather example over stdio.
    argv_file = tmp_path / "argv.json"
    fake = tmp_path / "tbot-py"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, runpy, sys\n"
        f"open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        f"runpy.run_path({str(MCP / 'servers' / 'weather.py')!r}, run_name='__main__')\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "TBOT_PY_IDENTITY": "/id/identity", "TBOT_PY_MCP_PROXY": "proxy.test:3080"}
    env.pop("LANGGRAPH_MODEL", None)
    result = subprocess.run(
        [sys.executable, str(MCP / "langgraph_agent.py"), "--tbot-py", str(fake), "weather"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "weather: get_weather, list_stations, set_alert\n"
    assert json.loads(argv_file.read_text()) == [
        "mcp", "connect", "-i", "/id/identity", "--proxy", "proxy.test:3080", "weather",
    ]  # fmt: skip


def test_langgraph_agent_reports_a_connector_that_fails(tmp_path: Path) -> None:
    fake = tmp_path / "tbot-py"
    fake.write_text("#!/bin/sh\necho 'ERROR: access denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = subprocess.run(
        [sys.executable, str(MCP / "langgraph_agent.py"), "--tbot-py", str(fake)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "LANGGRAPH_MODEL"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert "ERROR: access denied" in result.stderr
    assert "weather: cannot list tools:" in result.stderr
    assert "Traceback" not in result.stderr


# --- the inventory server's JWT check ----------------------------------------------------------

ISSUER = "https://127.0.0.1:3025"
AUDIENCE = "mcp+http://127.0.0.1:8000/mcp"


class FixedKey:
    """The auth service's JWKS, reduced to the one key it signs with."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        self.key = jwt.PyJWK(jwk, algorithm="ES256")

    def get_signing_key_from_jwt(self, token: str) -> jwt.PyJWK:
        return self.key


def session_jwt(key: ec.EllipticCurvePrivateKey, **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bot-agent", "iat": now, "exp": now + 300}
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm="ES256")


def verify(token: str, key: ec.EllipticCurvePrivateKey) -> Any:
    verifier = example_server("inventory")["AuthServiceJWTVerifier"](FixedKey(key), issuer=ISSUER)
    return asyncio.run(verifier.verify_token(token))


def test_inventory_server_accepts_the_jwt_the_auth_service_signs_for_it() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    access = verify(session_jwt(key), key)
    assert access is not None
    assert access.subject == "bot-agent"


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": "mcp+http://127.0.0.1:9000/mcp"},  # a JWT for another app
        {"iss": "https://evil.example.com"},
        {"exp": 1},
        {"sub": None},
    ],
    ids=["other-app", "other-issuer", "expired", "no-sub"],
)
def test_inventory_server_refuses_a_jwt_not_meant_for_it(
    overrides: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = session_jwt(key, **overrides)
    assert verify(token, key) is None
    assert token not in capsys.readouterr().err


def test_inventory_server_refuses_a_jwt_signed_by_another_key() -> None:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    assert verify(session_jwt(other), key) is None


def test_inventory_server_without_a_jwt_gets_401_and_with_one_serves() -> None:
    from starlette.testclient import TestClient

    key = ec.generate_private_key(ec.SECP256R1())
    module = example_server("inventory")
    verifier = module["AuthServiceJWTVerifier"](FixedKey(key), issuer=ISSUER)
    app = module["build_server"](verifier).streamable_http_app()
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"},
        },
    }
    headers = {"Accept": "application/json, text/event-stream"}
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.post("/mcp", json=initialize, headers=headers).status_code == 401
        bearer = {**headers, "Authorization": f"Bearer {session_jwt(key, aud='other')}"}
        assert client.post("/mcp", json=initialize, headers=bearer).status_code == 401
        bearer = {**headers, "Authorization": f"Bearer {session_jwt(key)}"}
        answer = client.post("/mcp", json=initialize, headers=bearer)
        assert answer.status_code == 200
        assert '"serverInfo"' in answer.text
