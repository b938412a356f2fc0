"""A stolen copy of a bot's storage, caught by the generation counter: real processes.

The copy renews from a stale generation with a new key, which locks that bot
instance: the copy and then the original are refused, other bots are not, and
the admin recovers with ``locks rm`` and a new join token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.integration.conftest import (
    AuthService,
    clean_env,
    error_lines,
    run_tbot,
    start_identity_args,
)
from tests.integration.test_oneshot_identity import bot_tls_identity, join


def _renew(auth: AuthService, base: Path, storage: Path) -> tuple[int, list[str]]:
    """A one-shot run on ``storage`` with no token: it renews the stored identity."""
    done = run_tbot(*start_identity_args(auth, base / "out", storage))
    assert "Traceback" not in done.stderr
    return done.returncode, error_lines(done.stderr)


def _admin(auth: AuthService, *args: str) -> str:
    done = run_tbot("auth", *args, "--data-dir", str(auth.data_dir))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_stolen_copy_locks_its_instance_and_a_new_token_recovers(
    auth: AuthService, tmp_path: Path
) -> None:
    original, copy = tmp_path / "storage", tmp_path / "stolen"
    join(auth, tmp_path / "out", original, auth.add_bot("victim"))
    instance = bot_tls_identity(original).bot_instance_id
    shutil.copytree(original, copy)
    other = tmp_path / "other"
    join(auth, other / "out", other / "storage", auth.add_bot("bystander"))

    assert _renew(auth, tmp_path, original) == (0, [])
    assert bot_tls_identity(original).generation == 2

    code, [line] = _renew(auth, tmp_path / "thief", copy)
    assert code == 1
    assert "HTTP 403" in line
    assert f"bot instance victim/{instance} is locked: certificate generation mismatch " in line
    assert "(stored=2, presented=1): possible stolen credentials (lock " in line
    assert bot_tls_identity(copy).generation == 1  # nothing issued to the copy

    # Contained: the original is locked out too; another bot is not.
    code, [again] = _renew(auth, tmp_path, original)
    assert code == 1 and "HTTP 403" in again and f"victim/{instance} is locked" in again
    assert _renew(auth, other, other / "storage") == (0, [])

    [lock] = json.loads(_admin(auth, "locks", "ls", "--format", "json"))
    assert (lock["target_kind"], lock["target"]) == ("bot_instance", f"victim/{instance}")
    assert lock["created_by"] == "auth" and lock["expires"] is None
    # The whole server message arrives, recovery advice included (a new token, not
    # removing the lock, which would hand the instance back to whoever renews first).
    assert f"(lock {lock['id']}); give the bot a new token with " in line
    assert "auth bots instances add victim and keep the lock" in line
    assert "issue a new token" in line
    assert lock["id"] in _admin(auth, "locks", "ls")
    events = [json.loads(e) for e in _admin(auth, "audit", "--format", "json").splitlines()]
    assert [e["resource"] for e in events if e["event"] == "lock.created"] == [f"lock/{lock['id']}"]

    _admin(auth, "locks", "rm", lock["id"])
    token = json.loads(_admin(auth, "bots", "instances", "add", "victim", "--format", "json"))
    done = run_tbot(
        *start_identity_args(auth, tmp_path / "out", original),
        env=clean_env(TELEPORT_BOT_TOKEN=token["token"]),
    )
    assert done.returncode == 0, done.stderr
    assert "join token changed" in done.stderr
    recovered = bot_tls_identity(original)
    assert recovered.bot_instance_id != instance and recovered.generation == 1
    assert _renew(auth, tmp_path, original) == (0, [])
    assert bot_tls_identity(original).generation == 2
