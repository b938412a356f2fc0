"""Two `auth start` replicas sharing one PostgreSQL database, driven by the real one-shot CLI."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tbot_py.identity.tlsid import TLSIdentity
from tests import pg
from tests.integration.conftest import (
    AuthService,
    clean_env,
    error_lines,
    run_tbot,
    start_auth_service,
)


@pytest.fixture(scope="module")
def _replica_dsn(_postgres_session: pg._Started) -> str:
    return pg.require(_postgres_session).new_database()


@pytest.fixture(scope="module")
def replicas(
    _replica_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AuthService, AuthService]]:
    base = tmp_path_factory.mktemp("replicas")
    a = start_auth_service(base / "a", "127.0.0.1:0", "--storage", _replica_dsn)
    try:
        b = start_auth_service(base / "b", "127.0.0.1:0", "--storage", _replica_dsn)
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def _add_bot(dsn: str, data_dir: Path, name: str) -> str:
    done = run_tbot(
        "auth", "bots", "add", name, "--roles", "access",
        "--data-dir", str(data_dir), "--storage", dsn, "--format", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    token = json.loads(done.stdout)["token"]
    assert isinstance(token, str)
    return token


def _oneshot(
    replica: AuthService, base: Path, *, token: str | None = None, pin: str | None = None
) -> tuple[int, str]:
    args = [
        "start", "identity", "--proxy-server", replica.addr,
        "--destination", str(base / "out"), "--storage", str(base / "storage"), "--oneshot",
    ]  # fmt: skip
    if pin is not None:
        args += ["--ca-pin", pin]
    env = clean_env(TELEPORT_BOT_TOKEN=token) if token else clean_env()
    done = run_tbot(*args, env=env)
    return done.returncode, done.stderr


def _generation(base: Path) -> int:
    cert = x509.load_pem_x509_certificate((base / "storage" / "tlscert").read_bytes())
    return TLSIdentity.from_subject(cert.subject).generation


def test_replicas_share_one_set_of_cas_and_keep_only_server_credentials_on_disk(
    replicas: tuple[AuthService, AuthService],
) -> None:
    a, b = replicas
    assert a.ca_pin == b.ca_pin
    assert a.addr != b.addr
    for replica in (a, b):
        names = {p.name for p in replica.data_dir.iterdir()}
        assert not any(name.endswith("_ca.key") or name.startswith("state.db") for name in names)
        assert {"server.key", "server.crt"} <= names
        for name in ("server.key", "server.crt"):
            mode = stat.S_IMODE((replica.data_dir / name).stat().st_mode)
            assert mode == 0o600


def test_a_bot_joins_through_one_replica_and_renews_through_either(
    replicas: tuple[AuthService, AuthService], _replica_dsn: str, tmp_path: Path
) -> None:
    a, b = replicas
    token = _add_bot(_replica_dsn, tmp_path / "admin", "hopper")
    code, err = _oneshot(a, tmp_path, token=token, pin=a.ca_pin)
    assert code == 0, err
    assert _generation(tmp_path) == 1
    code, err = _oneshot(b, tmp_path)
    assert code == 0, err
    assert _generation(tmp_path) == 2
    code, err = _oneshot(a, tmp_path)
    assert code == 0, err
    assert _generation(tmp_path) == 3


def test_a_token_spent_on_one_replica_is_refused_by_the_other(
    replicas: tuple[AuthService, AuthService], _replica_dsn: str, tmp_path: Path
) -> None:
    a, b = replicas
    token = _add_bot(_replica_dsn, tmp_path / "admin", "once")
    code, err = _oneshot(a, tmp_path / "first", token=token, pin=a.ca_pin)
    assert code == 0, err
    code, err = _oneshot(b, tmp_path / "second", token=token, pin=b.ca_pin)
    assert code == 1
    [line] = error_lines(err)
    assert "token is not valid" in line
    assert token not in err


def test_an_unreachable_database_is_one_error_line_without_the_password(tmp_path: Path) -> None:
    done = run_tbot(
        "auth", "bots", "ls", "--data-dir", str(tmp_path),
        "--storage", "postgres://admin:s3cret-pw@127.0.0.1:1/tbot",
    )  # fmt: skip
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("ERROR: PostgreSQL postgres://admin:***@127.0.0.1:1/tbot")
    assert "s3cret-pw" not in done.stderr


def test_the_storage_can_come_from_the_environment(
    replicas: tuple[AuthService, AuthService], _replica_dsn: str, tmp_path: Path
) -> None:
    done = run_tbot(
        "auth", "ca-pin", "--data-dir", str(tmp_path),
        env=clean_env(TBOT_PY_AUTH_STORAGE=_replica_dsn),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == replicas[0].ca_pin
