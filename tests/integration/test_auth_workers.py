"""`auth start --workers N`: forked workers share the port, the state and one lifetime."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.integration.conftest import (
    AuthService,
    clean_env,
    run_tbot,
    start_auth_service,
    start_identity_args,
)


def _children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def _gone(pids: set[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") for p in pids):
            return True
        time.sleep(0.05)
    return False


def _oneshot(auth: AuthService, base: Path, token: str) -> None:
    done = run_tbot(
        *start_identity_args(auth, base / "out", base / "storage"),
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )
    assert done.returncode == 0, done.stderr


def test_workers_share_the_port_and_the_state(tmp_path: Path) -> None:
    auth = start_auth_service(tmp_path / "data", "127.0.0.1:0", "--workers", "3")
    try:
        assert len(_children(auth.process.pid)) == 3
        # Joins, CA fetches and issuance land on whichever worker accepts; each token
        # is spent once, whichever worker sees it.
        for n in range(3):
            _oneshot(auth, tmp_path / f"bot{n}", auth.add_bot(f"bot{n}"))
        token = auth.add_token("bot0")
        _oneshot(auth, tmp_path / "again", token)
        reused = run_tbot(
            *start_identity_args(auth, tmp_path / "reuse" / "out", tmp_path / "reuse" / "st"),
            env=clean_env(TELEPORT_BOT_TOKEN=token),
        )
        assert reused.returncode != 0
    finally:
        workers = _children(auth.process.pid)
        auth.stop()
    assert auth.process.returncode == 0
    assert _gone(workers)


def test_a_worker_that_dies_stops_the_whole_service(tmp_path: Path) -> None:
    auth = start_auth_service(tmp_path / "data", "127.0.0.1:0", "--workers", "2")
    try:
        workers = _children(auth.process.pid)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        assert auth.process.wait(timeout=15) != 0
        assert _gone(workers - {victim})
    finally:
        auth.stop()
