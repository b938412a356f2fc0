"""``tbot-py auth locks ls|add|rm`` on a data dir: output, audit events and one-line errors."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tbot_py.authservice import admin
from tbot_py.authservice.cluster import open_cluster
from tbot_py.client import wire
from tbot_py.identity import keys

from .test_audit import audit_events, local_actor
from .test_cli import assert_one_error_line, run
from .test_cli_rbac import add_bot, ok


def _joined_instance(data_dir: Path) -> str:
    """Bot "ci" with one joined instance; returns its ``ci/ID``."""
    token = add_bot(data_dir)
    open_cluster(data_dir).storage.instances.join(
        keys.token_hash(token), instance_id="inst-1", now=datetime.now(UTC)
    )
    return "ci/inst-1"


def test_locks_add_ls_and_rm_a_bot_instance_lock(tmp_path: Path) -> None:
    target = _joined_instance(tmp_path)
    doc = json.loads(ok("locks", "add", "--instance", target, "--message", "disk image leaked",
                        "--ttl", "2h", "--format", "json", "--data-dir", tmp_path))  # fmt: skip
    user = local_actor()["user"]
    assert set(doc) == {
        "id", "target_kind", "target", "message", "created_by", "created", "expires", "expired",
    }  # fmt: skip
    assert (doc["target_kind"], doc["target"], doc["message"]) == (
        "bot_instance",
        target,
        "disk image leaked",
    )
    assert (doc["created_by"], doc["expired"]) == (user, False)
    created = wire.parse_time(doc["created"], "created")
    expires = wire.parse_time(doc["expires"], "expires")
    assert timedelta(hours=2) - timedelta(seconds=1) <= expires - created <= timedelta(hours=2)
    assert str(uuid.UUID(doc["id"])) == doc["id"]

    assert json.loads(ok("locks", "ls", "--format", "json", "--data-dir", tmp_path)) == [doc]
    lines = ok("locks", "ls", "--data-dir", tmp_path).splitlines()
    assert lines[0].split() == [
        "ID", "KIND", "TARGET", "CREATED", "BY", "CREATED", "EXPIRES", "MESSAGE",
    ]  # fmt: skip
    assert lines[1].split() == [
        doc["id"], "bot_instance", target, str(user), doc["created"], doc["expires"],
        "disk", "image", "leaked",
    ]  # fmt: skip

    assert ok("locks", "rm", doc["id"], "--data-dir", tmp_path) == (
        f"Lock {doc['id']} on bot instance {target} removed.\n"
    )
    assert ok("locks", "ls", "--data-dir", tmp_path) == "No locks.\n"


def test_locks_add_text_names_the_lock_and_how_to_remove_it(tmp_path: Path) -> None:
    add_bot(tmp_path)
    out = ok("locks", "add", "--bot", "ci", "--data-dir", tmp_path).splitlines()
    [lock] = admin.list_locks(open_cluster(tmp_path))
    assert out == [
        f"Lock {lock.id} created on bot ci: locked by an administrator",
        f"It holds until removed; remove it with tbot-py auth locks rm {lock.id}",
    ]
    assert (lock.target_kind, lock.target, lock.expires_at) == ("bot", "ci", None)


def test_locks_add_and_rm_are_audited_as_the_local_user(tmp_path: Path) -> None:
    add_bot(tmp_path)
    doc = json.loads(ok("locks", "add", "--bot", "ci", "--message", "incident 42",
                        "--format", "json", "--data-dir", tmp_path))  # fmt: skip
    ok("locks", "rm", doc["id"], "--data-dir", tmp_path)
    events = [e for e in audit_events(tmp_path) if e["event"].startswith("admin.lock.")]
    assert [e["event"] for e in events] == ["admin.lock.add", "admin.lock.rm"]
    details = {
        "target_kind": "bot",
        "target": "ci",
        "message": "incident 42",
        "created_by": local_actor()["user"],
    }
    for event in events:
        assert event["actor"] == local_actor()
        assert event["resource"] == f"lock/{doc['id']}"
        assert event["details"] == details
        assert "remote_addr" not in event


def test_an_expired_lock_is_listed_as_expired(tmp_path: Path) -> None:
    add_bot(tmp_path)
    past = datetime.now(UTC) - timedelta(hours=2)
    admin.add_lock(open_cluster(tmp_path), bot="ci", ttl=timedelta(hours=1), now=past)
    [doc] = json.loads(ok("locks", "ls", "--format", "json", "--data-dir", tmp_path))
    assert doc["expired"] is True
    assert ok("locks", "ls", "--data-dir", tmp_path).splitlines()[1].count("(expired)") == 1
    # Adding a lock drops the ones that have expired.
    ok("locks", "add", "--bot", "ci", "--data-dir", tmp_path)
    [doc] = json.loads(ok("locks", "ls", "--format", "json", "--data-dir", tmp_path))
    assert (doc["expired"], doc["expires"]) == (False, None)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["add"], "give exactly one of --bot NAME and --instance BOT/ID"),
        (["add", "--bot", "ci", "--instance", "ci/inst-1"], "give exactly one of"),
        (["add", "--bot", "ghost"], 'bot "ghost" not found'),
        (["add", "--bot", "Bad/Name"], "invalid bot name"),
        (["add", "--instance", "ci/nope"], "bot instance ci/nope not found; see tbot-py auth"),
        (["add", "--instance", "ci"], "invalid instance 'ci': use BOT/ID"),
        (["add", "--instance", "ci/a b"], "invalid instance"),
        (["add", "--bot", "ci", "--ttl", "soon"], "invalid duration"),
        (["add", "--bot", "ci", "--ttl", "0s"], "lock TTL must be at least 1s"),
        (["add", "--bot", "ci", "--message", " "], "one printable line"),
        (["add", "--bot", "ci", "--message", "a\nb"], "one printable line"),
        (["add", "--bot", "ci", "--message", "x" * 257], "of 1-256 characters"),
        (["rm", "nope"], "invalid lock id 'nope': use the ID column of tbot-py auth locks ls"),
        (["rm", str(uuid.UUID(int=1))], f'no lock with id "{uuid.UUID(int=1)}"'),
    ],
)
def test_locks_errors_are_one_line_and_change_nothing(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    _joined_instance(tmp_path)
    assert_one_error_line(run("locks", *args, "--data-dir", tmp_path), needle)
    assert admin.list_locks(open_cluster(tmp_path)) == []
    assert audit_events(tmp_path, "admin.lock.add") == []


def test_locks_ls_on_a_cluster_without_locks_says_so(tmp_path: Path) -> None:
    assert ok("locks", "ls", "--data-dir", tmp_path) == "No locks.\n"
    assert json.loads(ok("locks", "ls", "--format", "json", "--data-dir", tmp_path)) == []
