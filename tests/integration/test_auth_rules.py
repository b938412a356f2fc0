"""The auth service's refusals as a user meets them: real processes, one clear line each."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.integration.conftest import (
    AuthService,
    clean_env,
    error_lines,
    run_tbot,
    snapshot,
    start_identity_args,
)


def test_an_expired_token_is_refused_and_nothing_is_written(
    auth: AuthService, tmp_path: Path
) -> None:
    auth.add_bot("late")
    done = run_tbot(
        "auth", "tokens", "add", "--bot", "late", "--ttl", "1s",
        "--data-dir", str(auth.data_dir), "--format", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    token = json.loads(done.stdout)["token"]
    time.sleep(1.5)
    out = tmp_path / "out"
    joined = run_tbot(
        *start_identity_args(auth, out, tmp_path / "storage"),
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )
    assert joined.returncode == 1
    [line] = error_lines(joined.stderr)
    assert "HTTP 403" in line
    assert "token is not valid" in line
    assert token not in joined.stderr
    assert snapshot(out) == {}


def test_a_role_the_bot_does_not_hold_fails_that_output_with_403(
    auth: AuthService, tmp_path: Path
) -> None:
    token = auth.add_bot("modest", roles="access")
    out = tmp_path / "out"
    done = run_tbot(
        *start_identity_args(auth, out, tmp_path / "storage", "--roles", "editor"),
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert 'role "editor" is not allowed for bot "modest"' in line
    assert "HTTP 403" in line
    # The bot itself joined (its storage holds an identity); only that output was refused.
    assert (tmp_path / "storage" / "tlscert").exists()
    assert snapshot(out) == {}
