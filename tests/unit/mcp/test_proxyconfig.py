"""The access proxy's config file: what it accepts, one-line errors with file and line, headers."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tbot_py.cli.main import cli, main
from tbot_py.errors import ConfigError
from tbot_py.mcp.proxyconfig import (
    load_proxy_config,
    parse_proxy_config,
    rewrite_headers,
    unsupported_template,
)

BASE = """\
version: v1
listen: 127.0.0.1:3080
auth_server: 127.0.0.1:3025
identity: /var/lib/proxy/identity
audit_log: /var/log/mcp-audit.log
"""

FULL = (
    BASE
    + """\
public_addr: [mcp.example.com, "10.0.0.5:443"]
ca_pins: ["sha256:{pin}"]
apps:
  - name: weather
    description: Weather tools
    uri: mcp+stdio://
    labels: {{env: dev}}
    mcp: {{command: python3, args: [server.py, --quiet]}}
  - name: inventory
    uri: mcp+http://127.0.0.1:8000/mcp
    labels: {{env: prod}}
    rewrite: {{headers: ["Authorization: Bearer {{{{internal.id_token}}}}"]}}
""".format(pin="ab" * 32)
)


def error_for(extra: str, base: str = BASE) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_proxy_config(base + extra, source="proxy.yaml")
    return str(caught.value)


def test_full_config_loads_every_field_and_apps_become_config_apps() -> None:
    config = parse_proxy_config(FULL)
    assert config.listen_host == "127.0.0.1"
    assert config.listen_port == 3080
    assert config.public_hosts == ("mcp.example.com", "10.0.0.5")
    assert config.ca_pins == ("sha256:" + "ab" * 32,)
    weather = config.config_app("weather")
    assert weather is not None
    app = weather.to_mcp_app()
    assert (app.name, app.uri, app.labels, app.description) == (
        "weather",
        "mcp+stdio://",
        {"env": "dev"},
        "Weather tools",
    )
    assert (app.command, app.args, app.source) == ("python3", ("server.py", "--quiet"), "config")
    inventory = config.config_app("inventory")
    assert inventory is not None
    assert inventory.to_mcp_app().headers == ("Authorization: Bearer {{internal.id_token}}",)
    assert config.config_app("missing") is None


def test_listen_port_zero_means_any_port() -> None:
    config = parse_proxy_config(BASE.replace("3080", "0"))
    assert config.listen_port == 0


@pytest.mark.parametrize(
    ("extra", "where", "what"),
    [
        ("listen_typo: 1\n", "proxy.yaml:6: listen_typo", 'did you mean "listen"'),
        (
            "apps:\n  - name: x\n    uri: http://a:80\n",
            "proxy.yaml:8: apps[0].uri",
            "MCP apps only",
        ),
        ("apps:\n  - name: x\n    uri: mcp+stdio://\n", "proxy.yaml:7: apps[0]", "mcp.command"),
        ("apps:\n  - {name: 'bad name', uri: 'mcp+http://a:1'}\n", "apps[0].name", "invalid app"),
        (
            "apps:\n  - name: x\n    uri: mcp+http://a:1\n    rewrite: {headers: ['A: {{x.y}}']}\n",
            "proxy.yaml:9: apps[0].rewrite.headers[0]",
            "unsupported header template {{x.y}}",
        ),
        (
            "apps:\n  - {name: x, uri: 'mcp+http://a:1'}\n  - {name: x, uri: 'mcp+http://b:1'}\n",
            "proxy.yaml:8: apps[1].name",
            'app "x" is defined twice',
        ),
        (
            "apps:\n  - name: x\n    uri: mcp+stdio://\n"
            "    mcp: {command: a, run_as_host_user: root}\n",
            "apps[0].mcp.run_as_host_user",
            "remove run_as_host_user",
        ),
        ("public_addr: ['a b']\n", "public_addr[0]", "DNS name or an IP address"),
        ("ca_pins: [nope]\n", "ca_pins[0]", "invalid CA pin"),
    ],
)
def test_a_bad_value_is_one_line_naming_file_line_and_key(
    extra: str, where: str, what: str
) -> None:
    message = error_for(extra)
    assert where in message
    assert what in message
    assert "\n" not in message


def test_missing_keys_and_a_bad_version_are_refused() -> None:
    assert 'missing required key "audit_log"' in error_for(
        "", BASE.replace("audit_log: /var/log/mcp-audit.log\n", "")
    )
    assert 'expected "v1", got "v2"' in error_for("", BASE.replace("v1", "v2"))
    assert "invalid listen address" in error_for("", BASE.replace("127.0.0.1:3080", "nope"))


def test_a_header_value_is_never_echoed() -> None:
    message = error_for(
        "apps:\n  - name: x\n    uri: mcp+http://a:1\n    rewrite: {headers: ['secret-token']}\n"
    )
    assert "secret-token" not in message


def test_an_empty_or_missing_file_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='needs "version: v1"'):
        parse_proxy_config("# nothing\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_proxy_config(tmp_path / "absent.yaml")


def test_templates_become_the_jwt_and_other_headers_stay() -> None:
    headers = rewrite_headers(
        ["Authorization: Bearer {{internal.id_token}}", "X-JWT: {{ internal.jwt }}", "X-Env: dev"],
        "header.payload.sig",
    )
    assert headers == {
        "Authorization": "Bearer header.payload.sig",
        "X-JWT": "header.payload.sig",
        "X-Env": "dev",
    }


def test_an_unknown_template_or_a_missing_jwt_is_refused_without_the_jwt() -> None:
    assert unsupported_template("A: {{internal.logins}}") == "{{internal.logins}}"
    assert unsupported_template("A: {{internal.jwt}} b") is None
    with pytest.raises(ValueError, match=r"X-Login uses the unsupported template") as caught:
        rewrite_headers(["X-Login: {{internal.logins}}"], "the.jwt.value")
    assert "the.jwt.value" not in str(caught.value)
    with pytest.raises(ValueError, match="needs a JWT"):
        rewrite_headers(["Authorization: Bearer {{internal.jwt}}"], "")


def test_cli_bad_config_is_one_error_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(BASE + "listen_typo: 1\n")
    with pytest.raises(SystemExit) as exited:
        main(["mcp-proxy", "start", "--config", str(config)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [
        f'ERROR: {config}:6: listen_typo: unknown key "listen_typo"; did you mean "listen"?'
    ]


def test_cli_lists_the_mcp_proxy_group() -> None:
    result = CliRunner().invoke(cli, ["mcp-proxy", "start", "--help"])
    assert result.exit_code == 0
    assert "--config" in result.output
