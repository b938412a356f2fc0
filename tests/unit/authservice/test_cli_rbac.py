"""``tbot-py auth`` role, bot-update, instance and token commands on a data dir."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tbot_py.authservice.cluster import open_cluster
from tbot_py.authservice.roles import parse_role_yaml
from tbot_py.client import wire
from tbot_py.identity import keys

from .test_cli import assert_one_error_line, run

ROLE_YAML = """\
kind: role
version: v7
metadata: {name: mcp-readonly, description: Read-only tools}
spec:
  options: {max_session_ttl: 8h}
  allow:
    logins: ['{{internal.logins}}']
    app_labels: {env: dev}
    mcp: {tools: ['^(get|query|list|search|find)_.*$']}
"""


def write_role(tmp_path: Path, text: str = ROLE_YAML, name: str = "role.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def ok(*args: str | Path) -> str:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def add_bot(data_dir: Path, name: str = "ci", roles: str = "access") -> str:
    doc = json.loads(ok("bots", "add", name, "--roles", roles, "--logins", "root",
                        "--format", "json", "--data-dir", data_dir))  # fmt: skip
    token = doc["token"]
    assert isinstance(token, str)
    return token


# -- create, get, rm --------------------------------------------------------------------


def test_create_stores_a_role_and_refuses_to_replace_it_without_force(tmp_path: Path) -> None:
    data_dir, role_file = tmp_path / "auth", write_role(tmp_path)
    assert ok("create", "-f", role_file, "--data-dir", data_dir) == (
        'role "mcp-readonly" has been created\n'
    )
    assert_one_error_line(
        run("create", "-f", role_file, "--data-dir", data_dir),
        'role "mcp-readonly" already exists; use --force to replace it',
    )
    write_role(tmp_path, ROLE_YAML.replace("8h", "2h"))
    assert ok("create", "-f", role_file, "--force", "--data-dir", data_dir) == (
        'role "mcp-readonly" has been updated\n'
    )
    stored = open_cluster(data_dir).storage.roles.get("mcp-readonly")
    assert stored is not None and stored.max_session_ttl.total_seconds() == 2 * 3600


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (ROLE_YAML.replace("env: dev", "env: '^(unclosed$'"),
         "role.yaml:8: spec.allow.app_labels.env: invalid regular expression '^(unclosed$'"),
        (ROLE_YAML.replace("kind: role", "kind: user"),
         'role.yaml:1: kind: unsupported kind "user"'),
        (ROLE_YAML.replace("version: v7", "version: v9"),
         'role.yaml:2: version: unsupported role version "v9"'),
        (ROLE_YAML.replace("name: mcp-readonly, ", ""),
         'role.yaml:3: metadata: missing required key "name"'),
    ],
)  # fmt: skip
def test_create_with_a_bad_file_fails_with_one_located_line_and_stores_nothing(
    tmp_path: Path, text: str, needle: str
) -> None:
    role_file = write_role(tmp_path, text)
    result = run("create", "-f", role_file, "--data-dir", tmp_path / "auth")
    assert_one_error_line(result, needle)
    assert result.stderr.startswith(f"ERROR: {role_file.parent}/{needle}")
    assert not (tmp_path / "auth").exists()


def test_create_with_a_missing_file_fails_with_one_line(tmp_path: Path) -> None:
    result = run("create", "-f", tmp_path / "nope.yaml", "--data-dir", tmp_path / "auth")
    assert_one_error_line(result, f"resource file {tmp_path / 'nope.yaml'} does not exist")


def test_get_role_prints_yaml_that_create_reads_back(tmp_path: Path) -> None:
    ok("create", "-f", write_role(tmp_path), "--data-dir", tmp_path)
    text = ok("get", "role/mcp-readonly", "--data-dir", tmp_path)
    assert text.startswith("kind: role\nversion: v7\nmetadata:\n  name: mcp-readonly\n")
    assert parse_role_yaml(text) == parse_role_yaml(ROLE_YAML)
    doc = json.loads(ok("get", "role/mcp-readonly", "--format", "json", "--data-dir", tmp_path))
    assert doc["spec"]["options"] == {"max_session_ttl": "8h"}
    assert doc["spec"]["allow"]["mcp"] == {"tools": ["^(get|query|list|search|find)_.*$"]}


def test_get_roles_lists_the_presets_and_created_roles(tmp_path: Path) -> None:
    ok("create", "-f", write_role(tmp_path), "--data-dir", tmp_path)
    lines = ok("get", "roles", "--data-dir", tmp_path).splitlines()
    assert lines[0].split() == ["NAME", "MAX", "SESSION", "TTL", "LOGINS", "DESCRIPTION"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["access", "30h"],
        ["auditor", "30h"],
        ["editor", "30h"],
        ["mcp-readonly", "8h"],
    ]
    names = [r["metadata"]["name"] for r in json.loads(
        ok("get", "roles", "--format", "json", "--data-dir", tmp_path))]  # fmt: skip
    assert names == ["access", "auditor", "editor", "mcp-readonly"]
    docs = ok("get", "roles", "--format", "yaml", "--data-dir", tmp_path).split("---\n")
    assert [parse_role_yaml(d).name for d in docs] == names


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["get", "role/ghost"], 'role "ghost" not found'),
        (
            ["get", "user/alice"],
            "unsupported resource 'user/alice': use role/NAME, roles, "
            "workload_identity/NAME, workload_identities, token/NAME, tokens, "
            "app/NAME, apps, db/NAME or dbs",
        ),
        (["get", "role/"], "unsupported resource 'role/'"),
        (["rm", "role/ghost"], 'role "ghost" not found'),
        (["rm", "roles"], "name the role to remove: role/NAME"),
    ],
)
def test_get_and_rm_errors_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    assert_one_error_line(run(*args, "--data-dir", tmp_path), needle)


def test_rm_deletes_an_unused_role_and_refuses_one_a_bot_uses(tmp_path: Path) -> None:
    ok("create", "-f", write_role(tmp_path), "--data-dir", tmp_path)
    add_bot(tmp_path, "b1", "mcp-readonly")
    add_bot(tmp_path, "b2", "access,mcp-readonly")
    assert_one_error_line(
        run("rm", "role/mcp-readonly", "--data-dir", tmp_path),
        'role "mcp-readonly" is still used by bots b1, b2; first take it away with '
        "tbot-py auth bots update BOT --remove-roles mcp-readonly",
    )
    ok("bots", "rm", "b1", "--data-dir", tmp_path)
    ok("bots", "update", "b2", "--remove-roles", "mcp-readonly", "--data-dir", tmp_path)
    assert ok("rm", "role/mcp-readonly", "--data-dir", tmp_path) == (
        'role "mcp-readonly" has been deleted\n'
    )
    assert open_cluster(tmp_path).storage.roles.get("mcp-readonly") is None


# -- bots -------------------------------------------------------------------------------


def test_bots_add_with_an_unknown_role_fails_and_creates_nothing(tmp_path: Path) -> None:
    result = run("bots", "add", "ci", "--roles", "access,x", "--data-dir", tmp_path)
    assert_one_error_line(
        result, 'ERROR: role "x" not found; create it with tbot-py auth create -f role.yaml'
    )
    assert open_cluster(tmp_path).storage.bots.get("ci") is None


def test_bots_update_adds_and_removes_roles(tmp_path: Path) -> None:
    add_bot(tmp_path)
    out = ok("bots", "update", "ci", "--add-roles", "editor,auditor", "--remove-roles", "access",
             "--data-dir", tmp_path)  # fmt: skip
    assert out.splitlines()[0] == 'Bot "ci" updated; roles: editor, auditor'
    doc = json.loads(ok("bots", "update", "ci", "--add-roles", "access", "--format", "json",
                        "--data-dir", tmp_path))  # fmt: skip
    assert doc == {"bot_name": "ci", "roles": ["editor", "auditor", "access"], "logins": ["root"]}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--add-roles", "ghost"], 'role "ghost" not found; create it with'),
        (["--remove-roles", "access"], 'bot "ci" needs at least one role'),
        (["--remove-roles", "editor"], 'bot "ci" does not have role "editor"'),
        (["--add-roles", "editor", "--remove-roles", "editor"], "both added and removed"),
        ([], "nothing to update"),
        (["--add-roles", "a,,b"], "empty item"),
    ],
)
def test_bots_update_errors_are_one_line_and_change_nothing(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    add_bot(tmp_path)
    assert_one_error_line(run("bots", "update", "ci", *args, "--data-dir", tmp_path), needle)
    bot = open_cluster(tmp_path).storage.bots.get("ci")
    assert bot is not None and bot.roles == ("access",)


def test_bots_update_of_an_unknown_bot_fails(tmp_path: Path) -> None:
    result = run("bots", "update", "ghost", "--add-roles", "access", "--data-dir", tmp_path)
    assert_one_error_line(result, 'bot "ghost" not found')


# -- bots instances ---------------------------------------------------------------------


def test_bots_instances_ls_shows_id_generation_created_and_last_seen(tmp_path: Path) -> None:
    token = add_bot(tmp_path)
    assert ok("bots", "instances", "ls", "ci", "--data-dir", tmp_path) == (
        'No instances of bot "ci".\n'
    )
    joined = datetime.now(UTC).replace(microsecond=0)
    stamp = wire.format_time(joined)
    open_cluster(tmp_path).storage.instances.join(
        keys.token_hash(token), instance_id="inst-1", now=joined
    )
    lines = ok("bots", "instances", "ls", "ci", "--data-dir", tmp_path).splitlines()
    assert lines[0].split() == ["ID", "GENERATION", "CREATED", "LAST", "SEEN"]
    assert lines[1].split() == ["inst-1", "1", stamp, stamp]
    doc = json.loads(ok("bots", "instances", "ls", "ci", "--format", "json",
                        "--data-dir", tmp_path))  # fmt: skip
    assert doc == [
        {
            "instance_id": "inst-1",
            "bot_name": "ci",
            "generation": 1,
            "created": stamp,
            "last_seen": stamp,
        }
    ]
    assert_one_error_line(
        run("bots", "instances", "ls", "ghost", "--data-dir", tmp_path), 'bot "ghost" not found'
    )


def test_bots_instances_add_issues_a_join_token_for_the_existing_bot(tmp_path: Path) -> None:
    add_bot(tmp_path)
    doc = json.loads(ok("bots", "instances", "add", "ci", "--ttl", "30m", "--format", "json",
                        "--data-dir", tmp_path))  # fmt: skip
    assert set(doc) == {"token", "bot_name", "token_expires", "join_method"}
    assert doc["bot_name"] == "ci"
    assert open_cluster(tmp_path).storage.tokens.count("ci") == 2
    text = ok("bots", "instances", "add", "ci", "--data-dir", tmp_path)
    assert "The bot token: " in text and "--ca-pin=" in text
    assert_one_error_line(
        run("bots", "instances", "add", "ghost", "--data-dir", tmp_path), 'bot "ghost" not found'
    )


# -- tokens -----------------------------------------------------------------------------


def test_tokens_ls_shows_a_short_id_and_never_the_token_or_its_hash(tmp_path: Path) -> None:
    assert ok("tokens", "ls", "--data-dir", tmp_path) == "No join tokens.\n"
    tokens = [add_bot(tmp_path, "ci"), add_bot(tmp_path, "web")]
    hashes = [keys.token_hash(t) for t in tokens]
    text = ok("tokens", "ls", "--data-dir", tmp_path)
    as_json = ok("tokens", "ls", "--format", "json", "--data-dir", tmp_path)
    for secret in (*tokens, *hashes):
        assert secret not in text and secret not in as_json
        assert secret[:9] not in text and secret[:9] not in as_json
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "BOT", "JOIN", "METHOD", "EXPIRES"]
    assert sorted(line.split()[:3] for line in lines[1:]) == sorted(
        [[hashes[0][:8], "ci", "token"], [hashes[1][:8], "web", "token"]]
    )
    rows = json.loads(as_json)
    assert {r["id"]: r["bot_name"] for r in rows} == {hashes[0][:8]: "ci", hashes[1][:8]: "web"}
    assert all(set(r) == {"id", "bot_name", "join_method", "expires", "expired"} for r in rows)
    assert not any(r["expired"] for r in rows)
    wire.parse_time(rows[0]["expires"], "expires")


def test_tokens_rm_removes_one_token_by_its_id(tmp_path: Path) -> None:
    token = add_bot(tmp_path)
    token_id = keys.token_hash(token)[:8]
    out = ok("tokens", "rm", token_id.upper(), "--data-dir", tmp_path)
    assert out == f'Token {token_id} of bot "ci" removed.\n'
    assert open_cluster(tmp_path).storage.tokens.count("ci") == 0
    assert_one_error_line(
        run("tokens", "rm", token_id, "--data-dir", tmp_path), f'no join token with id "{token_id}"'
    )


@pytest.mark.parametrize("bad_id", ["abc", "xyz123", "token-value", "a" * 65])
def test_tokens_rm_with_a_malformed_id_fails_with_one_line(tmp_path: Path, bad_id: str) -> None:
    assert_one_error_line(run("tokens", "rm", bad_id, "--data-dir", tmp_path), "invalid token id")


def test_tokens_rm_with_an_ambiguous_id_removes_nothing(tmp_path: Path) -> None:
    add_bot(tmp_path)
    storage = open_cluster(tmp_path).storage
    now = datetime.now(UTC)
    for suffix in ("1", "2"):
        storage.tokens.add("feedbeef" + suffix * 56, "ci", now.replace(year=now.year + 1), now)
    result = run("tokens", "rm", "feedbeef", "--data-dir", tmp_path)
    assert_one_error_line(result, 'token id "feedbeef" is ambiguous: 2 tokens match')
    assert storage.tokens.count("ci") == 3
    ok("tokens", "rm", "feedbeef2", "--data-dir", tmp_path)
    assert storage.tokens.count("ci") == 2
    assert re.search(r"^feedbeef ", ok("tokens", "ls", "--data-dir", tmp_path), re.M)
