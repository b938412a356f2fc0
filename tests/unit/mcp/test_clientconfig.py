"""``tbot-py mcp config``: the printed entry, and merging it into real client config files."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tbot_py.cli.main import cli, main
from tbot_py.errors import ConfigError
from tbot_py.mcp import clientconfig

PROXY = "proxy.example.com:3080"


@pytest.fixture
def exe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real executable named tbot-py as argv[0]; HOME and PATH point into tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = bin_dir / "tbot-py"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(path), "mcp", "config"])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    return path


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["mcp", "config", *(str(a) for a in args)])


def write_args(config: Path, *extra: str) -> list[str | Path]:
    return ["-i", "/ids/identity", "--proxy", PROXY, "--client-config", "cursor",
            "--write", "--config-path", config, *extra]  # fmt: skip


def expected_entry(exe: Path, app: str, identity: str = "/ids/identity") -> dict[str, object]:
    args = ["mcp", "connect", "-i", identity, "--proxy", PROXY, app]
    return {"command": str(exe), "args": args}


def refused(result: Result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, ConfigError), result.exception
    message = str(result.exception)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


def test_json_mode_prints_the_entry_with_absolute_paths(exe: Path, tmp_path: Path) -> None:
    result = run("grafana-mcp", "-i", "out/identity", "--proxy", PROXY)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    entry = expected_entry(exe, "grafana-mcp", str(tmp_path / "out" / "identity"))
    assert document == {"mcpServers": {"teleport-mcp-grafana-mcp": entry}}
    assert not (tmp_path / "home").exists()  # printing writes nothing


def test_client_without_write_prints_entry_and_names_the_file(exe: Path, tmp_path: Path) -> None:
    result = run("db", "-i", "/ids/identity", "--proxy", PROXY, "--client-config", "claude")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "mcpServers": {"teleport-mcp-db": expected_entry(exe, "db")}
    }
    target = tmp_path / "home" / ".config" / "Claude" / "claude_desktop_config.json"
    assert f"Add this to {target}" in result.stderr
    assert not target.exists()


def test_write_creates_missing_file_0600_and_parents_0700(exe: Path, tmp_path: Path) -> None:
    result = run("db", "-i", "/ids/identity", "--proxy", PROXY, "--client-config", "cursor",
                 "--write")  # fmt: skip
    assert result.exit_code == 0, result.output
    config = tmp_path / "home" / ".cursor" / "mcp.json"
    assert json.loads(config.read_text()) == {
        "mcpServers": {"teleport-mcp-db": expected_entry(exe, "db")}
    }
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700
    assert (
        result.stdout
        == f"{config}: added MCP server 'teleport-mcp-db'; restart the MCP client to load it.\n"
    )
    assert [p.name for p in config.parent.iterdir()] == ["mcp.json"]  # no temp file left


def test_write_merges_keeping_other_servers_keys_and_mode(exe: Path, tmp_path: Path) -> None:
    config = tmp_path / "claude.json"
    original = {
        "globalShortcut": "Ctrl+Space",
        "mcpServers": {
            "filesystem": {"command": "npx", "args": ["-y", "fs", "/home/me"], "env": {"K": "v"}},
            "weather": {"command": "uv", "args": ["run", "weather.py"]},
        },
        "preferences": {"théme": "dark", "sizes": [1, 2.5, None, True]},
    }
    config.write_text(json.dumps(original))
    config.chmod(0o640)
    result = run("db", *write_args(config))
    assert result.exit_code == 0, result.output
    merged = json.loads(config.read_text(encoding="utf-8"))
    servers = merged.pop("mcpServers")
    expected_rest = {k: v for k, v in original.items() if k != "mcpServers"}
    assert json.dumps(merged, sort_keys=True) == json.dumps(expected_rest, sort_keys=True)
    assert list(merged) == ["globalShortcut", "preferences"]
    assert list(servers) == ["filesystem", "weather", "teleport-mcp-db"]
    old_servers = original["mcpServers"]
    assert isinstance(old_servers, dict)
    for name, server in old_servers.items():
        assert json.dumps(servers[name]) == json.dumps(server)
    assert servers["teleport-mcp-db"] == expected_entry(exe, "db")
    assert stat.S_IMODE(config.stat().st_mode) == 0o640


def test_write_replaces_only_the_apps_entry_in_place(exe: Path, tmp_path: Path) -> None:
    config = tmp_path / "mcp.json"
    stale = {"command": "/old/tbot-py", "args": ["mcp", "connect", "db"]}
    other = {"command": "npx", "args": ["x"]}
    config.write_text(json.dumps({"mcpServers": {"teleport-mcp-db": stale, "other": other}}))
    result = run("db", *write_args(config))
    assert result.exit_code == 0, result.output
    assert "replaced MCP server 'teleport-mcp-db'" in result.stdout
    servers = json.loads(config.read_text())["mcpServers"]
    assert list(servers) == ["teleport-mcp-db", "other"]
    assert servers == {"teleport-mcp-db": expected_entry(exe, "db"), "other": other}


def test_write_into_an_empty_file_creates_the_entry(exe: Path, tmp_path: Path) -> None:
    config = tmp_path / "mcp.json"
    config.write_text("  \n")
    result = run("db", *write_args(config))
    assert result.exit_code == 0, result.output
    assert json.loads(config.read_text()) == {
        "mcpServers": {"teleport-mcp-db": expected_entry(exe, "db")}
    }


def test_write_through_a_symlink_updates_the_target_and_keeps_the_link(
    exe: Path, tmp_path: Path
) -> None:
    real = tmp_path / "dotfiles" / "mcp.json"
    real.parent.mkdir()
    real.write_text('{"mcpServers": {}}')
    link = tmp_path / "link.json"
    link.symlink_to(real)
    result = run("db", *write_args(link))
    assert result.exit_code == 0, result.output
    assert link.is_symlink()
    assert "teleport-mcp-db" in json.loads(real.read_text())["mcpServers"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"mcpServers": {"a": 1},\n  "x": }', ":2: not valid JSON"),
        (b'// comment\n{"mcpServers": {}}', ":1: not valid JSON"),
        (b'[{"mcpServers": {}}]', "expected a JSON object at the top, got an array"),
        (b'{"mcpServers": ["teleport-mcp-db"]}', '"mcpServers" is an array'),
        (b"\xff\xfe\x00garbage", "not"),
    ],
)
def test_write_refuses_a_file_that_is_not_a_json_object_and_leaves_it(
    exe: Path, tmp_path: Path, content: bytes, needle: str
) -> None:
    config = tmp_path / "mcp.json"
    config.write_bytes(content)
    config.chmod(0o644)
    before = config.stat()
    message = refused(run("db", *write_args(config)), str(config), needle, "not changed")
    assert message.startswith(str(config))
    assert config.read_bytes() == content
    after = config.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_mode,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "mcp.json"]


def test_broken_file_is_one_error_line_from_the_entry_point(
    exe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "mcp.json"
    config.write_text("{not json")
    with pytest.raises(SystemExit) as stopped:
        main(["mcp", "config", "db", *(str(a) for a in write_args(config))])
    assert stopped.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"ERROR: {config}:1: not valid JSON")
    assert len(err.splitlines()) == 1


def test_write_refuses_a_directory_in_place_of_the_file(exe: Path, tmp_path: Path) -> None:
    config = tmp_path / "home" / ".cursor" / "mcp.json"
    config.mkdir(parents=True)
    result = run("db", "-i", "/ids/identity", "--proxy", PROXY, "--client-config", "cursor",
                 "--write")  # fmt: skip
    refused(result, str(config), "is a directory")
    assert list(config.iterdir()) == []


@pytest.mark.parametrize("extra", [["--write"], ["--config-path", "x.json"]])
def test_file_options_are_refused_with_json_output(exe: Path, extra: list[str]) -> None:
    result = run("db", "-i", "id", "--proxy", PROXY, *extra)
    refused(result, extra[0], "needs --client-config claude or cursor")
    assert result.stdout == ""


@pytest.mark.parametrize(
    "proxy",
    [
        "proxy.example.com",
        "proxy:0",
        "proxy:65536",
        "https://proxy:443",
        "me:s3cret@proxy:443",
        ":443",
    ],
)
def test_bad_proxy_is_refused_without_echoing_it(exe: Path, tmp_path: Path, proxy: str) -> None:
    config = tmp_path / "mcp.json"
    result = run("db", "-i", "/ids/identity", "--proxy", proxy, "--client-config", "cursor",
                 "--write", "--config-path", config)  # fmt: skip
    message = refused(result, "invalid --proxy", "host:port")
    assert "s3cret" not in message
    assert not config.exists()


def test_ipv6_proxy_is_accepted(exe: Path) -> None:
    result = run("db", "-i", "/ids/identity", "--proxy", "[::1]:3080")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["mcpServers"]["teleport-mcp-db"]["args"][5] == "[::1]:3080"


@pytest.mark.parametrize("app", ["", "has space", "a/b", "x" * 129])
def test_invalid_app_name_is_refused(exe: Path, app: str) -> None:
    refused(run(app, "-i", "id", "--proxy", PROXY), "invalid app name")


def test_executable_falls_back_to_path_when_argv0_is_not_tbot_py(
    exe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "tbot_py" / "__main__.py")])
    monkeypatch.setenv("PATH", str(exe.parent))
    result = run("db", "-i", "/ids/identity", "--proxy", PROXY)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["mcpServers"]["teleport-mcp-db"]["command"] == str(exe)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    refused(
        run("db", "-i", "/ids/identity", "--proxy", PROXY), "cannot find the tbot-py executable"
    )


def test_default_config_paths_per_client_and_platform(tmp_path: Path) -> None:
    home = tmp_path / "home"
    claude = ("Claude", "claude_desktop_config.json")

    def path(client: str, platform: str, xdg: str | None = None) -> Path:
        return clientconfig.default_config_path(
            client, home=home, platform=platform, xdg_config_home=xdg
        )

    assert path("cursor", "linux") == home / ".cursor" / "mcp.json"
    assert path("cursor", "darwin") == home / ".cursor" / "mcp.json"
    assert path("claude", "linux") == home.joinpath(".config", *claude)
    assert path("claude", "linux", "/xdg") == Path("/xdg", *claude)
    assert path("claude", "linux", "relative") == home.joinpath(".config", *claude)
    assert path("claude", "darwin") == home.joinpath("Library", "Application Support", *claude)
    with pytest.raises(ConfigError, match="has no config file"):
        path("json", "linux")


def test_claude_write_honours_xdg_config_home(
    exe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if sys.platform == "darwin":
        pytest.skip("Claude Desktop's file is under ~/Library on macOS")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    result = run("db", "-i", "/ids/identity", "--proxy", PROXY, "--client-config", "claude",
                 "--write")  # fmt: skip
    assert result.exit_code == 0, result.output
    config = tmp_path / "xdg" / "Claude" / "claude_desktop_config.json"
    assert "teleport-mcp-db" in json.loads(config.read_text())["mcpServers"]


def test_with_server_does_not_modify_its_input() -> None:
    document = {"mcpServers": {"a": {"command": "x"}}, "k": 1}
    snapshot = json.dumps(document)
    merged, replaced = clientconfig.with_server(document, "b", {"command": "y"})
    assert json.dumps(document) == snapshot
    assert replaced is False
    assert merged == {"mcpServers": {"a": {"command": "x"}, "b": {"command": "y"}}, "k": 1}


def test_app_name_rule_matches_the_auth_services_resource_names() -> None:
    from tbot_py.authservice.roles import NAME_RE

    assert clientconfig.APP_NAME_RE.pattern == NAME_RE.pattern


def test_mcp_group_is_listed_by_the_cli() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "mcp" in result.stdout.split()
