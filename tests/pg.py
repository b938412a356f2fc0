"""A throwaway PostgreSQL server for the tests of the PostgreSQL storage backend.

``initdb`` a data directory in a temp directory, then ``pg_ctl start`` it on
127.0.0.1 at a free port with its unix socket in that temp directory.
PostgreSQL refuses to run as root, so as root both run as the ``postgres``
system user (``runuser -u postgres --``), which gets the temp directory.

When the server cannot start the tests that need it are skipped, and the
reason is repeated in the terminal summary (``POSTGRESQL TESTS SKIPPED: ...``)
so it never goes unnoticed.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 30

#: Why the PostgreSQL tests were skipped, for the terminal summary.
skip_reasons: list[str] = []


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway server; ``dsn(db)`` names one of its databases."""

    port: int

    def dsn(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; its DSN."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


def require(started: _Started) -> PostgresServer:
    """The running server, or a loud skip that the terminal summary repeats."""
    if started.server is None:
        import pytest

        if started.reason not in skip_reasons:
            skip_reasons.append(started.reason)
        pytest.skip(f"POSTGRESQL TESTS SKIPPED: {started.reason}")
    return started.server


def _find(tool: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(argv: list[str]) -> None:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).split())[-300:]
        raise RuntimeError(f"{os.path.basename(argv[-1] if argv else '')} failed: {tail}")


@dataclass(frozen=True)
class _Started:
    server: PostgresServer | None
    reason: str


def start_postgres() -> Iterator[_Started]:
    """Start a server for the session and stop it afterwards; yields it, or why it could not."""
    initdb, pg_ctl = _find("initdb"), _find("pg_ctl")
    if initdb is None or pg_ctl is None:
        yield _Started(None, "no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql")
        return
    tmp = Path(tempfile.mkdtemp(prefix="tbot-py-pg-"))
    data = tmp / "data"
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(tmp, user="postgres", group="postgres")
    port = _free_port()
    started = False
    try:
        try:
            _run([*prefix, initdb, "-D", str(data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-sync"])  # fmt: skip
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {tmp} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            _run([*prefix, pg_ctl, "-D", str(data), "-l", str(tmp / "server.log"),
                  "-w", "-t", str(START_TIMEOUT_S), "-o", options, "start"])  # fmt: skip
            started = True
        except (OSError, RuntimeError, subprocess.TimeoutExpired, LookupError) as exc:
            yield _Started(None, f"cannot start PostgreSQL with {initdb}: {exc}")
            return
        yield _Started(PostgresServer(port=port), "")
    finally:
        if started:
            subprocess.run(
                [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=START_TIMEOUT_S,
                check=False,
            )
        shutil.rmtree(tmp, ignore_errors=True)
