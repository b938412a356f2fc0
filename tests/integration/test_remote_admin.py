"""Remote administration with real processes: ``auth start --write-admin-identity`` and
admin commands with ``--auth-server ADDR -i FILE`` instead of the data directory."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (
    AuthService,
    clean_env,
    error_lines,
    run_tbot,
    start_auth_service,
    start_identity_args,
)
from tests.integration.test_oneshot_identity import join


@pytest.fixture
def remote_auth(tmp_path: Path) -> Iterator[tuple[AuthService, Path]]:
    identity = tmp_path / "admin" / "identity"
    service = start_auth_service(
        tmp_path / "auth", "127.0.0.1:0", "--write-admin-identity", str(identity)
    )
    try:
        yield service, identity
    finally:
        service.stop()


def _remote(auth: AuthService, identity: Path, *args: str) -> str:
    done = run_tbot("auth", *args, "--auth-server", auth.addr, "-i", str(identity))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_remote_admin_adds_a_bot_that_joins_and_locks_it(
    remote_auth: tuple[AuthService, Path], tmp_path: Path
) -> None:
    auth, identity = remote_auth
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600

    added = json.loads(
        _remote(auth, identity, "bots", "add", "ci", "--roles", "access", "--format", "json")
    )
    assert added["bot_name"] == "ci" and len(added["token"]) == 32
    join(auth, tmp_path / "out", tmp_path / "storage", added["token"])

    _remote(auth, identity, "locks", "add", "--bot", "ci")
    token = json.loads(_remote(auth, identity, "tokens", "add", "--bot", "ci", "--format", "json"))[
        "token"
    ]
    done = run_tbot(
        *start_identity_args(auth, tmp_path / "out2", tmp_path / "storage2"),
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert "HTTP 403" in line and "bot ci is locked" in line

    listing = _remote(auth, identity, "bots", "ls")
    assert listing.splitlines()[1].split()[:4] == ["ci", "access", "-", "1"]
    [lock] = json.loads(_remote(auth, identity, "locks", "ls", "--format", "json"))
    assert lock["target"] == "ci" and lock["created_by"].startswith("admin-")
    events = [
        json.loads(e)
        for e in run_tbot(
            "auth", "audit", "--format", "json", "--data-dir", str(auth.data_dir)
        ).stdout.splitlines()
    ]
    admin_events = [e for e in events if e["event"].startswith("admin.")]
    assert admin_events and all(e["actor"]["admin"] == "remote" for e in admin_events)


def test_a_bot_identity_file_is_refused_by_the_admin_api(
    remote_auth: tuple[AuthService, Path], tmp_path: Path
) -> None:
    auth, identity = remote_auth
    token = json.loads(
        _remote(auth, identity, "bots", "add", "ci", "--roles", "access", "--format", "json")
    )["token"]
    join(auth, tmp_path / "out", tmp_path / "storage", token)
    done = run_tbot(
        "auth", "bots", "ls", "--auth-server", auth.addr, "-i", str(tmp_path / "out" / "identity")
    )
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert "HTTP 403" in line and "bot certificates can not call the admin API" in line
