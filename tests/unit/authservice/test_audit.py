"""The audit log: one JSON event per API call or admin change, never a secret, safe to share."""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import select
import signal
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tbot_py.authservice import admin, audit
from tbot_py.authservice.audit import AuditEvent, AuditLog
from tbot_py.cli.auth import auth
from tbot_py.client import wire
from tbot_py.identity import keys

from .conftest import AuthClient, Issued, public_keys

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
REQUIRED = {"time", "event", "success", "code", "actor"}
OPTIONAL = {"remote_addr", "resource", "message", "details"}


def audit_lines(data_dir: Path) -> list[str]:
    return audit.audit_log_path(data_dir).read_text().splitlines()


def audit_events(data_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    docs = [json.loads(line) for line in audit_lines(data_dir)]
    return [d for d in docs if event is None or d["event"] == event]


def bad_join(client: AuthClient, token: str = "0" * 32) -> str:
    """A refused join; returns the message the client got."""
    req = wire.RegisterUsingTokenRequest(token=token, keys=public_keys(keys.generate_private_key()))
    resp = client.request("POST", wire.PATH_JOIN, json=req.to_json())
    assert resp.status_code == 403
    message: str = resp.json()["error"]["message"]
    return message


def local_actor() -> dict[str, object]:
    return {"admin": "local", "user": pwd.getpwuid(os.getuid()).pw_name, "uid": os.getuid()}


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(auth, [str(a) for a in args])


def write_event(data_dir: Path, event: str, when: datetime, **fields: Any) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    AuditLog(audit.audit_log_path(data_dir)).append(
        AuditEvent(time=when, event=event, success=True, code=0, **fields)
    )


# -- what the server and the admin operations record -------------------------------------


def test_every_call_and_admin_change_is_one_json_object_per_line_in_a_0600_file(
    client: AuthClient, bot_token: str
) -> None:
    identity = client.join(bot_token)
    renewed = client.renewed(identity)
    resp, _ = client.impersonate(renewed)
    assert resp.status_code == 200, resp.text
    assert client.request("GET", wire.PATH_CAS, identity=renewed).status_code == 200
    bad_join(client)
    admin.add_token(client.cluster, "ci")
    admin.remove_bot(client.cluster, "ci")

    path = audit.audit_log_path(client.cluster.data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.isascii()
    docs = [json.loads(line) for line in raw.decode().splitlines()]
    for doc in docs:
        assert isinstance(doc, dict)
        assert REQUIRED <= set(doc) <= REQUIRED | OPTIONAL, doc
        assert TIME_RE.match(doc["time"]), doc["time"]
        assert isinstance(doc["success"], bool) and isinstance(doc["code"], int)
    seen = [d["event"] for d in docs]
    for event in ("bot.join", "bot.renew", "bot.issue", "bot.cas"):
        assert event in seen
    for event in ("admin.bot.add", "admin.token.add", "admin.bot.rm"):
        assert event in seen
    assert [d["success"] for d in audit_events(client.cluster.data_dir, "bot.join")] == [
        True,
        False,
    ]


def test_bot_events_name_the_instance_the_source_and_what_was_acted_on(
    client: AuthClient, bot_token: str
) -> None:
    identity = client.join(bot_token)
    renewed = client.renewed(identity)
    resp, _ = client.impersonate(renewed, role_requests=("access",))
    assert resp.status_code == 200, resp.text
    client.request("GET", wire.PATH_CAS, identity=renewed)
    instance = identity.identity.bot_instance_id
    actor = {"bot": "ci", "instance": instance}
    data_dir = client.cluster.data_dir

    [join] = audit_events(data_dir, "bot.join")
    assert join["success"] is True and join["code"] == 200
    assert join["actor"] == actor and join["remote_addr"] == "127.0.0.1"
    assert join["resource"] == "token/" + audit.token_id(keys.token_hash(bot_token))
    assert join["details"]["generation"] == 1 and "message" not in join
    [renew] = audit_events(data_dir, "bot.renew")
    assert renew["actor"] == actor and renew["resource"] == f"bot_instance/ci/{instance}"
    assert renew["details"]["generation"] == 2
    [issue] = audit_events(data_dir, "bot.issue")
    assert issue["actor"] == actor and issue["resource"] == "bot/ci"
    assert issue["details"]["roles"] == "access"
    [cas] = audit_events(data_dir, "bot.cas")
    assert cas["actor"] == actor and cas["resource"] == "cert_authority/tbot-py.local"


def test_denials_carry_the_status_and_the_message_the_client_got(
    client: AuthClient, joined: Issued
) -> None:
    told = bad_join(client)
    no_cert = client.request("POST", wire.PATH_RENEW, json={})
    resp, _ = client.impersonate(joined, role_requests=("root-of-all-evil",))
    assert resp.status_code == 403
    data_dir = client.cluster.data_dir

    refused = audit_events(data_dir, "bot.join")[-1]
    assert (refused["success"], refused["code"], refused["message"]) == (False, 403, told)
    assert refused["actor"] == {} and refused["remote_addr"] == "127.0.0.1"
    assert refused["resource"] == "token/" + audit.token_id(keys.token_hash("0" * 32))
    [renew] = audit_events(data_dir, "bot.renew")
    assert renew["code"] == no_cert.status_code == 403
    assert renew["message"] == no_cert.json()["error"]["message"]
    assert renew["actor"] == {}
    [issue] = audit_events(data_dir, "bot.issue")
    assert (issue["code"], issue["message"]) == (403, resp.json()["error"]["message"])
    assert issue["actor"]["bot"] == "ci"


def test_audit_log_never_holds_a_token_a_hash_a_key_or_a_certificate(
    client: AuthClient, bot_token: str
) -> None:
    identity = client.join(bot_token)
    renewed = client.renewed(identity)
    resp, _ = client.impersonate(renewed)
    assert resp.status_code == 200
    bad_join(client, bot_token)  # a used token: refused
    unused = admin.add_token(client.cluster, "ci").token
    admin.remove_bot(client.cluster, "ci")
    bad_join(client, unused)  # its bot is gone
    log_text = audit.audit_log_path(client.cluster.data_dir).read_text()

    for token in (bot_token, unused):
        assert token not in log_text
        assert keys.token_hash(token) not in log_text
        assert audit.token_id(keys.token_hash(token)) in log_text
    for marker in ("-----BEGIN", "-----END", "PRIVATE KEY", "CERTIFICATE", "ecdsa-sha2"):
        assert marker not in log_text
    for secret_ish in (renewed.certs.tls.decode().splitlines()[1], identity.certs.ssh.decode()):
        assert secret_ish[:40] not in log_text


def test_admin_events_name_the_local_os_user_and_no_address(
    client: AuthClient, bot_token: str
) -> None:
    issued = admin.add_token(client.cluster, "ci")
    admin.remove_bot(client.cluster, "ci")
    data_dir = client.cluster.data_dir

    [bot_added] = audit_events(data_dir, "admin.bot.add")
    assert bot_added["actor"] == local_actor()
    assert bot_added["code"] == 0 and bot_added["success"] is True
    assert bot_added["resource"] == "bot/ci" and "remote_addr" not in bot_added
    token_events = audit_events(data_dir, "admin.token.add")
    assert [e["resource"] for e in token_events] == [
        "token/" + audit.token_id(keys.token_hash(bot_token)),
        "token/" + audit.token_id(keys.token_hash(issued.token)),
    ]
    assert all(e["actor"] == local_actor() and e["details"]["bot"] == "ci" for e in token_events)
    [removed] = audit_events(data_dir, "admin.bot.rm")
    assert removed["actor"] == local_actor() and removed["resource"] == "bot/ci"


def test_an_unwritable_audit_log_is_logged_at_error_and_fails_nothing(
    client: AuthClient, bot_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = audit.audit_log_path(client.cluster.data_dir)
    path.unlink()
    path.mkdir()  # open() now fails with EISDIR
    with caplog.at_level(logging.ERROR, logger="tbot_py.authservice"):
        issued = client.join(bot_token)
        admin.add_token(client.cluster, "ci")
    assert issued.identity.bot_name == "ci"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("cannot write the audit log" in e and "bot.join on token/" in e for e in errors)
    assert any("admin.token.add" in e for e in errors)
    assert all(bot_token not in e for e in errors)


# -- the writer ------------------------------------------------------------------------

_WRITER = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from tbot_py.authservice.audit import AuditEvent, AuditLog
log = AuditLog(Path(sys.argv[1]))
writer = sys.argv[2]
for i in range(200):
    log.append(AuditEvent(time=datetime.now(UTC), event="test.write", success=True, code=0,
                          resource=f"writer/{writer}/{i}", message=writer * 500))
"""


def test_four_processes_writing_200_lines_each_leave_800_intact_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(n)]) for n in range(4)
    ]
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 800
    seen: dict[str, list[int]] = {str(n): [] for n in range(4)}
    for line in lines:
        doc = json.loads(line)
        _, writer, i = doc["resource"].split("/")
        assert doc["message"] == writer * 500
        seen[writer].append(int(i))
    assert all(sorted(numbers) == list(range(200)) for numbers in seen.values())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_hostile_value_still_makes_one_short_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    hostile = "\u202e\n\x1b[2J" * 5000
    log.append(
        AuditEvent(
            time=datetime.now(UTC),
            event="bot.join",
            success=False,
            code=400,
            resource=hostile,
            message=hostile,
            details={"roles": hostile},
        )
    )
    raw = log.path.read_bytes()
    assert raw.count(b"\n") == 1 and len(raw) < audit.MAX_LINE_BYTES
    doc = json.loads(raw)
    assert doc["truncated"] is True and "details" not in doc
    assert doc["message"].startswith("\u202e\n\x1b[2J")
    text = audit.format_text(doc)
    assert text.isascii() and text.isprintable() and text.endswith(" truncated=true")


def test_a_log_with_loose_permissions_is_tightened_on_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text("")
    path.chmod(0o644)
    write_event(tmp_path, "admin.bot.add", datetime.now(UTC))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_reader_returns_only_complete_lines_and_starts_over_on_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    reader = audit.AuditReader(path)
    assert list(reader.read_new()) == []
    path.write_bytes(b'{"a":1}\n{"b"')
    assert list(reader.read_new()) == [(1, b'{"a":1}')]
    with path.open("ab") as f:
        f.write(b":2}\n")
    assert list(reader.read_new()) == [(2, b'{"b":2}')]
    assert list(reader.read_new()) == []
    path.unlink()
    path.write_bytes(b'{"c":3}\n')  # rotated: a new file
    assert list(reader.read_new()) == [(1, b'{"c":3}')]


def test_reader_reads_a_large_log_in_chunks_without_splitting_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = (b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * (i % 97)) for i in range(40_000))
    path.write_bytes(b"".join(lines))
    assert path.stat().st_size > 2 * audit._READ_CHUNK
    read = list(audit.AuditReader(path).read_new())
    assert [json.loads(line)["n"] for _, line in read] == list(range(40_000))
    assert read[-1][0] == 40_000


def test_text_lines_are_readable_and_quote_anything_odd() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    join = AuditEvent(
        time=when,
        event="bot.join",
        success=False,
        code=403,
        remote_addr="192.0.2.1",
        resource="token/1a2b3c4d",
        message='bad "token"\nERROR forged line',
    )
    assert audit.format_text(join.to_json()) == (
        "2025-01-02T03:04:05.678Z bot.join denied code=403 remote_addr=192.0.2.1 "
        'resource=token/1a2b3c4d message="bad \\"token\\"\\nERROR forged line"'
    )
    added = AuditEvent(
        time=when,
        event="admin.bot.add",
        success=True,
        code=0,
        actor={"admin": "local", "user": "alice", "uid": 1000},
        resource="bot/ci",
        details={"roles": "access,dev"},
    )
    assert audit.format_text(added.to_json()) == (
        "2025-01-02T03:04:05.678Z admin.bot.add ok admin=local user=alice uid=1000 "
        "resource=bot/ci roles=access,dev"
    )


# -- tbot-py auth audit ----------------------------------------------------------------


def test_auth_audit_prints_text_or_json_and_since_skips_older_events(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    write_event(tmp_path, "admin.bot.add", now - timedelta(hours=2), resource="bot/old")
    write_event(tmp_path, "admin.bot.rm", now, resource="bot/new", actor=local_actor())

    text = run("audit", "--data-dir", tmp_path)
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert len(lines) == 2
    assert " admin.bot.add ok " in lines[0] and lines[0].endswith("resource=bot/old")
    assert f"user={local_actor()['user']}" in lines[1]

    as_json = run("audit", "--data-dir", tmp_path, "--format", "json", "--since", "1h")
    assert as_json.exit_code == 0, as_json.output
    [doc] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert doc["event"] == "admin.bot.rm" and doc["resource"] == "bot/new"


def test_auth_audit_warns_about_a_damaged_line_and_goes_on(tmp_path: Path) -> None:
    write_event(tmp_path, "admin.bot.add", datetime.now(UTC), resource="bot/a")
    with audit.audit_log_path(tmp_path).open("a") as f:
        f.write('{"event": "admin.bot.r\n')  # e.g. a line cut short by a power loss
    write_event(tmp_path, "admin.bot.rm", datetime.now(UTC), resource="bot/a")
    result = run("audit", "--data-dir", tmp_path)
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 2
    assert result.stderr == f"WARNING: {tmp_path / 'audit.log'}:2: not an audit event; skipped\n"


def test_auth_audit_with_no_events_prints_nothing(tmp_path: Path) -> None:
    result = run("audit", "--data-dir", tmp_path)
    assert (result.exit_code, result.output) == (0, "")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--since", "yesterday"), "--since: invalid duration"),
        (("--data-dir", "/nonexistent/tbot-py-audit"), "no cluster in /nonexistent"),
    ],
)
def test_auth_audit_user_errors_are_one_line(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    result = run("audit", "--data-dir", tmp_path, *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("ERROR: ") and needle in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_auth_audit_follow_prints_new_events_until_interrupted(tmp_path: Path) -> None:
    write_event(tmp_path, "admin.bot.add", datetime.now(UTC), resource="bot/first")
    code = "from tbot_py.cli.auth import auth; auth()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "audit", "--follow", "--format", "json",
         "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        stdout = proc.stdout
        assert stdout is not None

        def next_line() -> dict[str, Any]:
            ready, _, _ = select.select([stdout], [], [], 30)
            assert ready, "auth audit --follow printed nothing"
            doc: dict[str, Any] = json.loads(stdout.readline())
            return doc

        assert next_line()["resource"] == "bot/first"
        write_event(tmp_path, "admin.bot.rm", datetime.now(UTC), resource="bot/second")
        assert next_line()["resource"] == "bot/second"
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=20)
        assert (proc.returncode, rest, stderr) == (0, "", "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
