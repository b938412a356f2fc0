"""`auth start --join-rate 2/m` as a process: the third join is refused, cleanly, and audited."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (
    AuthService,
    clean_env,
    error_lines,
    run_tbot,
    snapshot,
    start_auth_service,
    start_identity_args,
)


@pytest.fixture
def limited_auth(tmp_path: Path) -> Iterator[AuthService]:
    """``tbot-py auth start --join-rate 2/m``, ready to serve."""
    service = start_auth_service(tmp_path / "data", "127.0.0.1:0", "--join-rate", "2/m")
    try:
        yield service
    finally:
        service.stop()


def oneshot(auth: AuthService, base: Path, token: str) -> subprocess.CompletedProcess[str]:
    return run_tbot(
        *start_identity_args(auth, base / "out", base / "storage"),
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )


def test_third_join_is_refused_with_one_clean_error_line_and_audited(
    limited_auth: AuthService, tmp_path: Path
) -> None:
    token = limited_auth.add_bot("ci")
    for attempt in range(2):
        guess = oneshot(limited_auth, tmp_path / f"guess{attempt}", f"{attempt}" * 32)
        assert guess.returncode != 0
        assert "the token is not valid" in guess.stderr

    refused = oneshot(limited_auth, tmp_path / "real", token)
    assert refused.returncode != 0
    [line] = error_lines(refused.stderr)
    assert "HTTP 429" in line and "too many join attempts from 127.0.0.1; retry in" in line
    assert "Retry-After: " in line
    assert "Traceback" not in refused.stderr
    assert token not in refused.stdout + refused.stderr
    assert snapshot(tmp_path / "real" / "out") == {}

    shown = run_tbot("auth", "audit", "--data-dir", str(limited_auth.data_dir), "--format", "json")
    assert shown.returncode == 0, shown.stderr
    joins = [json.loads(e) for e in shown.stdout.splitlines() if '"bot.join"' in e]
    assert [(j["success"], j["code"]) for j in joins] == [(False, 403), (False, 403), (False, 429)]
    assert joins[-1]["message"].startswith("too many join attempts from 127.0.0.1; retry in ")
    text = run_tbot("auth", "audit", "--data-dir", str(limited_auth.data_dir))
    assert " bot.join denied code=429 remote_addr=127.0.0.1 " in text.stdout
    for output in (shown.stdout, text.stdout):
        assert token not in output and "BEGIN" not in output


def test_a_bad_join_rate_is_one_error_line() -> None:
    done = run_tbot("auth", "start", "--data-dir", "/nonexistent/x", "--join-rate", "lots")
    assert done.returncode == 1
    assert error_lines(done.stderr) == [
        "ERROR: invalid --join-rate 'lots': use COUNT/UNIT with COUNT at least 1 and UNIT s, m "
        "or h, e.g. 10/m"
    ]
