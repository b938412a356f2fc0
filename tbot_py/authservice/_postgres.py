"""The PostgreSQL backend of :class:`.storage.Storage`: shared state for auth service replicas.

The only module that imports psycopg. Every transaction runs on its own
connection, like the SQLite backend. A write transaction first takes one
transaction-level advisory lock (:data:`WRITE_LOCK_KEY`), the equivalent of
SQLite's ``BEGIN IMMEDIATE``: read-then-write steps whose checks span tables
(a role in use, a token for an existing bot) stay atomic across processes
and replicas, and the lock goes with COMMIT or a dropped connection. Reads
run at REPEATABLE READ, one snapshot like a SQLite read transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg

from tbot_py.authservice import _sql, ca_store
from tbot_py.authservice.errors import BadParameter, StorageBusy, StorageUnavailable

#: Arbitrary but fixed: every tbot-py write transaction on the database takes it.
WRITE_LOCK_KEY = 0x7B07_9A17
CONNECT_TIMEOUT_S = 5

_SCHEMA_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


class PostgresBackend:
    """A PostgreSQL database named by a ``postgres://`` or ``postgresql://`` URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("postgres", "postgresql") or not parts.hostname or port == -1:
            raise BadParameter(
                f"invalid --storage {redact(url)!r}: use postgres://USER[:PASSWORD]@HOST:PORT/DB"
            )
        self._url = url
        self._password = parts.password
        self.location = redact(url)

    def _error(self, exc: psycopg.Error) -> StorageUnavailable:
        text = " ".join(str(exc).split())
        if self._password:
            text = text.replace(self._password, "***")
        return StorageUnavailable(f"PostgreSQL {self.location}: {text}")

    @contextmanager
    def transaction(self, *, write: bool = False, wait: bool = True) -> Iterator[_sql.Connection]:
        """One transaction on a new connection; a write one holds the write lock from the start.

        ``wait=False`` always raises StorageBusy: every statement waits on the network.
        """
        if not wait:
            raise StorageBusy(f"PostgreSQL {self.location} is reached over the network")
        try:
            raw = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise self._error(exc) from None
        try:
            try:
                if write:
                    raw.execute("BEGIN")
                    raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                else:
                    raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            except psycopg.Error as exc:
                raise self._error(exc) from None
            conn = _sql.Connection(
                raw, postgres=True, integrity_errors=(psycopg.errors.IntegrityError,)
            )
            try:
                yield conn
            except BaseException:
                raw.execute("ROLLBACK")
                raise
            raw.execute("COMMIT")
        except psycopg.Error as exc:
            raise self._error(exc) from None
        finally:
            raw.close()

    def prepare(self) -> None:
        """Nothing: the version table is created under the write lock (:meth:`read_version`)."""

    def read_version(self, conn: _sql.Connection) -> int:
        """The ``schema_version`` table's one row (0 when new); creates it and cert_authorities.

        Called while migrating, under the write lock, so two replicas cannot race the DDL.
        """
        conn.execute(_SCHEMA_VERSION_TABLE)
        conn.execute(ca_store.CREATE_TABLE)
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        return 0 if row is None else int(row[0])

    def write_version(self, conn: _sql.Connection, version: int) -> None:
        """Replace the ``schema_version`` row."""
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
