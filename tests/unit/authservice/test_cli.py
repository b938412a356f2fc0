"""``tbot-py auth ...``: admin commands on a data dir, ca-pin, and ``auth start`` as a process."""

from __future__ import annotations

import json
import os
import select
import signal
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from tbot_py.authservice.cluster import open_cluster
from tbot_py.cli.auth import auth
from tbot_py.client import wire
from tbot_py.identity import keys
from tests.unit.conftest import create_login_roles


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(auth, [str(a) for a in args])


def assert_one_error_line(result: Result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ERROR: ") and needle in lines[0]
    assert "Traceback" not in result.output


def add_bot_json(data_dir: Path, *extra: str) -> dict[str, object]:
    create_login_roles(open_cluster(data_dir), "dev")
    result = run("bots", "add", "ci", "--roles", "access,dev", "--format", "json",
                 "--data-dir", data_dir, *extra)  # fmt: skip
    assert result.exit_code == 0, result.output
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def test_bots_add_json_prints_the_bot_and_a_fresh_token(tmp_path: Path) -> None:
    data_dir = tmp_path / "auth"
    doc = add_bot_json(data_dir, "--logins", "root,ubuntu", "--ttl", "30m")
    assert doc["bot_name"] == "ci"
    assert doc["roles"] == ["access", "dev"]
    assert doc["logins"] == ["root", "ubuntu"]
    assert doc["join_method"] == "token"
    token = doc["token"]
    assert isinstance(token, str) and len(token) == 32
    expires = wire.parse_time(doc["token_expires"], "token_expires")
    bot = open_cluster(data_dir).storage.bots.get("ci")
    assert bot is not None
    assert 29 * 60 <= (expires - bot.created_at).total_seconds() <= 30 * 60
    assert open_cluster(data_dir).storage.tokens.count("ci") == 1


def test_bots_add_text_shows_token_expiry_pin_and_a_start_hint(tmp_path: Path) -> None:
    data_dir = tmp_path / "auth"
    result = run("bots", "add", "ci", "--roles", "access", "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    pin = open_cluster(data_dir).ca_pin
    assert "The bot token: " in result.stdout
    assert "will expire at" in result.stdout
    assert f"--ca-pin={pin}" in result.stdout
    assert "tbot-py start identity --proxy-server=<auth-addr>" in result.stdout


def test_admin_commands_create_a_private_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "auth"
    add_bot_json(data_dir)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = list(data_dir.iterdir())
    assert {"state.db", "init.lock", "user_ca.key", "host_ca.crt", "db_ca.key"} <= {
        f.name for f in files
    }
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name


def test_adding_an_existing_bot_fails_with_one_line(tmp_path: Path) -> None:
    add_bot_json(tmp_path)
    result = run("bots", "add", "ci", "--roles", "x", "--data-dir", tmp_path)
    assert_one_error_line(result, 'bot "ci" already exists')


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bots", "add", "Bad_Name", "--roles", "a"], "invalid bot name"),
        (["bots", "add", "ci", "--roles", "a,,b"], "empty item"),
        (["bots", "add", "ci", "--roles", ""], "at least one role"),
        (["bots", "add", "ci", "--roles", "a", "--logins", "root,"], "empty item"),
        (["bots", "add", "ci", "--roles", "a", "--ttl", "soon"], "invalid duration"),
        (["bots", "add", "ci", "--roles", "a", "--ttl", "0s"], "at least 1s"),
    ],
)
def test_bad_bots_add_arguments_fail_with_one_line(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    assert_one_error_line(run(*args, "--data-dir", tmp_path), needle)


def test_bots_ls_lists_bots_with_instance_counts(tmp_path: Path) -> None:
    add_bot_json(tmp_path, "--logins", "root")
    result = run("bots", "ls", "--format", "json", "--data-dir", tmp_path)
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["bot_name"] == "ci"
    assert (row["roles"], row["logins"], row["instances"]) == (["access", "dev"], ["root"], 0)
    wire.parse_time(row["created"], "created")
    text = run("bots", "ls", "--data-dir", tmp_path).stdout.splitlines()
    assert text[0].split() == ["NAME", "ROLES", "LOGINS", "INSTANCES", "CREATED"]
    assert text[1].split()[:4] == ["ci", "access,dev", "root", "0"]


def test_bots_ls_on_an_empty_cluster_says_so(tmp_path: Path) -> None:
    result = run("bots", "ls", "--data-dir", tmp_path)
    assert result.exit_code == 0
    assert result.stdout.strip() == "No bots."


def test_bots_rm_removes_the_bot_and_refuses_unknown_bots(tmp_path: Path) -> None:
    add_bot_json(tmp_path)
    result = run("bots", "rm", "ci", "--data-dir", tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads(run("bots", "ls", "--format", "json", "--data-dir", tmp_path).stdout) == []
    assert_one_error_line(run("bots", "rm", "ci", "--data-dir", tmp_path), 'bot "ci" not found')


def test_tokens_add_json_issues_a_token_for_an_existing_bot(tmp_path: Path) -> None:
    add_bot_json(tmp_path)
    result = run("tokens", "add", "--bot", "ci", "--ttl", "1h30m", "--format", "json",
                 "--data-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"token", "bot_name", "token_expires", "join_method"}
    assert doc["bot_name"] == "ci" and doc["join_method"] == "token"
    assert open_cluster(tmp_path).storage.tokens.count("ci") == 2


def test_tokens_add_for_an_unknown_bot_fails_with_one_line(tmp_path: Path) -> None:
    result = run("tokens", "add", "--bot", "ghost", "--data-dir", tmp_path)
    assert_one_error_line(result, 'bot "ghost" not found')


def test_ca_pin_prints_the_host_ca_pin(tmp_path: Path) -> None:
    add_bot_json(tmp_path)
    result = run("ca-pin", "--data-dir", tmp_path)
    assert result.exit_code == 0
    assert result.stdout == open_cluster(tmp_path).ca_pin + "\n"


def test_ca_pin_without_a_cluster_fails_and_creates_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "none"
    assert_one_error_line(run("ca-pin", "--data-dir", data_dir), "no cluster in")
    assert not data_dir.exists()
    data_dir.mkdir()
    assert_one_error_line(run("ca-pin", "--data-dir", data_dir), "no cluster in")
    assert list(data_dir.iterdir()) == []


def test_cluster_name_is_kept_and_a_conflicting_one_is_refused(tmp_path: Path) -> None:
    first = open_cluster(tmp_path, cluster_name="corp.example")
    again = open_cluster(tmp_path)
    assert again.name == "corp.example"
    assert again.ca_pin == first.ca_pin
    result = run("start", "--data-dir", tmp_path, "--cluster-name", "other", "--listen", "x:1")
    assert_one_error_line(result, "already holds cluster 'corp.example'")


def test_bad_listen_address_fails_with_one_line(tmp_path: Path) -> None:
    assert_one_error_line(run("start", "--data-dir", tmp_path, "--listen", "nope"), "--listen")


def test_auth_start_prints_one_ready_line_serves_and_exits_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "auth"
    code = "from tbot_py.cli.auth import auth; auth()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "start", "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "auth start did not print its ready line"
        doc = json.loads(proc.stdout.readline())
        assert set(doc) == {"addr", "ca_pin"}
        host, port = doc["addr"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert run("ca-pin", "--data-dir", data_dir).stdout.strip() == doc["ca_pin"]
        ctx = ssl.create_default_context(cadata=(data_dir / "host_ca.crt").read_text())
        with httpx.Client(verify=ctx, base_url=f"https://{doc['addr']}") as client:
            resp = client.get(wire.PATH_EXPORT, params={"type": "tls-host"})
        assert keys.ca_pin(x509.load_pem_x509_certificate(resp.content)) == doc["ca_pin"]
        for name in ("server.key", "server.crt"):
            assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        rest, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        assert rest == ""  # exactly one line on stdout
        assert "listening on" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
