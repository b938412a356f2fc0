"""The auth service's state database, SQLite (the default) or PostgreSQL: schema and migrations.

SQLite keeps everything in the ``state.db`` file of the data directory. The
running server and the admin CLI open it at the same time, so every operation
is one short transaction on its own connection: WAL lets readers run beside a
writer, ``busy_timeout`` makes a writer wait for another instead of failing,
and ``BEGIN IMMEDIATE`` takes the write lock up front so a read-then-write
step cannot race another process.

PostgreSQL (:mod:`._postgres`) lets several auth service replicas share one
state. A write transaction there takes one transaction-level advisory lock up
front, the same guarantee ``BEGIN IMMEDIATE`` gives, and the schema version
lives in a ``schema_version`` table instead of ``PRAGMA user_version``.

The auth service reads on its event loop when that waits for nothing: a
transaction with ``wait=False`` raises StorageBusy instead of waiting for a
lock (SQLite) or the network (always, for PostgreSQL), and the caller then
reads in a worker thread. In WAL mode an SQLite reader waits for no writer,
so the event loop serves the common request without a thread hop.

This module owns the connection and transaction rules, the schema and the
cluster metadata. Each table's queries live in their own module and are
reached through a ``Storage`` attribute that shares its transactions:
``bots`` (:mod:`.bots_store`), ``tokens`` (:mod:`.tokens_store`),
``instances`` (:mod:`.instances_store`), ``roles`` (:mod:`.roles_store`),
``locks`` (:mod:`.locks`), ``cert_authorities`` (:mod:`.ca_store`) and
``workload_identities`` (:mod:`.workload_identities`), ``join_tokens``
(:mod:`.join_tokens`, the OIDC token resources), ``apps`` and ``databases``
(:mod:`.apps`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

from tbot_py.authservice import _sql, apps, join_tokens, locks, workload_identities
from tbot_py.authservice.bots_store import BotStore
from tbot_py.authservice.ca_store import CAStore
from tbot_py.authservice.errors import AuthServiceError, StorageBusy
from tbot_py.authservice.instances_store import InstanceStore
from tbot_py.authservice.roles_store import RoleStore, grant_presets_databases, seed_preset_roles
from tbot_py.authservice.tokens_store import TokenStore

#: Bump when the schema changes and add a step to ``_MIGRATIONS``.
SCHEMA_VERSION = 7
BUSY_TIMEOUT_MS = 5000

T = TypeVar("T")

# One tuple of statements per schema version; executescript() would commit our transaction.
_SCHEMA_V1 = (
    """CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE bots (
        name       TEXT PRIMARY KEY,
        roles      TEXT NOT NULL,     -- JSON list of role names
        logins     TEXT NOT NULL,     -- JSON list of SSH logins
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE join_tokens (
        token_hash  TEXT PRIMARY KEY, -- keys.token_hash(value), never the value
        bot_name    TEXT NOT NULL REFERENCES bots(name) ON DELETE CASCADE,
        join_method TEXT NOT NULL,
        expires_at  TEXT NOT NULL,
        created_at  TEXT NOT NULL
    )""",
    "CREATE INDEX join_tokens_bot ON join_tokens(bot_name)",
    """CREATE TABLE bot_instances (
        id           TEXT PRIMARY KEY,
        bot_name     TEXT NOT NULL REFERENCES bots(name) ON DELETE CASCADE,
        generation   INTEGER NOT NULL,
        created_at   TEXT NOT NULL,
        last_seen_at TEXT NOT NULL
    )""",
    "CREATE INDEX bot_instances_bot ON bot_instances(bot_name)",
)

# v2: each instance's last renewal, for idempotent retries (see InstanceStore.renew):
# the generation presented, SHA-256 hex of the new key's SubjectPublicKeyInfo DER,
# the exact JSON answer and its certificates' NotAfter. NULL until the first renewal.
_SCHEMA_V2 = (
    "ALTER TABLE bot_instances ADD COLUMN renewed_from INTEGER",
    "ALTER TABLE bot_instances ADD COLUMN renewal_key_sha256 TEXT",
    "ALTER TABLE bot_instances ADD COLUMN renewal_answer TEXT",
    "ALTER TABLE bot_instances ADD COLUMN renewal_expires_at TEXT",
)


# v3: role resources, seeded with the presets (access, editor, auditor). Bots created
# before v3 may name roles that do not exist; they grant nothing until created.
_SCHEMA_V3: tuple[str | Callable[[_sql.Connection], None], ...] = (
    """CREATE TABLE roles (
        name       TEXT PRIMARY KEY,
        definition TEXT NOT NULL,     -- the Role as JSON
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
    seed_preset_roles,
)

# v4: locks (see locks.py). A lock names its target by value, without a foreign key:
# it outlives the bot or instance it locks. The index serves the check on every call.
_SCHEMA_V4 = (
    """CREATE TABLE locks (
        id          TEXT PRIMARY KEY, -- uuid4
        target_kind TEXT NOT NULL CHECK (target_kind IN ('bot', 'bot_instance')),
        target      TEXT NOT NULL,    -- bot name, or <bot>/<instance id>
        message     TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        created_by  TEXT NOT NULL,    -- "auth" for automatic locks, else the local user
        expires_at  TEXT              -- NULL: until removed
    )""",
    "CREATE INDEX locks_target ON locks(target_kind, target)",
)

# v5: workload_identity resources (see workload_identities.py).
_SCHEMA_V5 = (workload_identities.CREATE_TABLE,)

# v6: token resources for the OIDC join methods (see join_tokens.py). Secret ``token``
# join tokens stay in join_tokens, by hash.
_SCHEMA_V6 = (join_tokens.CREATE_TABLE,)

# v7: app and db resources, which routed certificates must name (see apps.py), and
# the db rules of the access and editor presets, when those are as seeded.
_SCHEMA_V7: tuple[str | Callable[[_sql.Connection], None], ...] = (
    apps.CREATE_APPS_TABLE,
    apps.CREATE_DATABASES_TABLE,
    grant_presets_databases,
)

_MIGRATIONS: dict[int, tuple[str | Callable[[_sql.Connection], None], ...]] = {
    1: _SCHEMA_V1,
    2: _SCHEMA_V2,
    3: _SCHEMA_V3,
    4: _SCHEMA_V4,
    5: _SCHEMA_V5,
    6: _SCHEMA_V6,
    7: _SCHEMA_V7,
}


class SchemaTooNew(AuthServiceError):
    """The database was written by a newer tbot-py."""


class Backend(Protocol):
    """One kind of database: how to open a transaction and where the schema version is kept."""

    #: Where the state lives, for messages: a path, or a DSN without its password.
    location: str

    def transaction(
        self, *, write: bool = False, wait: bool = True
    ) -> AbstractContextManager[_sql.Connection]:
        """One transaction on its own connection; ``write`` takes the write lock up front.

        With ``wait=False`` it raises StorageBusy where it would wait for a lock or the network.
        """
        ...

    def prepare(self) -> None:
        """Set-up that must run outside a transaction, before migrating."""
        ...

    def read_version(self, conn: _sql.Connection) -> int:
        """The schema version recorded in the database (0 when new)."""
        ...

    def write_version(self, conn: _sql.Connection, version: int) -> None:
        """Record the schema version."""
        ...


class SQLiteBackend:
    """The ``state.db`` file: the embedded default."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        # Per thread (and per process: workers fork) one connection that waits for
        # locks and one that does not, reused across transactions; opening one costs
        # more than a small transaction.
        self._local = threading.local()
        self._inherited: list[sqlite3.Connection] = []

    def _connection(self, busy_timeout_ms: int) -> sqlite3.Connection:
        cached: tuple[int, dict[int, sqlite3.Connection]] | None = getattr(
            self._local, "conns", None
        )
        if cached is None or cached[0] != os.getpid():
            if cached is not None:
                # Inherited through fork (auth service workers): never use them, and never
                # close them here either, which could disturb the parent's locks.
                self._inherited.extend(cached[1].values())
            cached = (os.getpid(), {})
            self._local.conns = cached
        conn = cached[1].get(busy_timeout_ms)
        if conn is None:
            conn = cached[1][busy_timeout_ms] = self._connect(busy_timeout_ms)
        return conn

    def _connect(self, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextmanager
    def transaction(self, *, write: bool = False, wait: bool = True) -> Iterator[_sql.Connection]:
        """One transaction; a write one starts with ``BEGIN IMMEDIATE``.

        ``wait=False`` runs it on a connection with no busy timeout: where it would wait
        for another connection's lock it raises StorageBusy, and nothing is left open.
        """
        conn = self._connection(BUSY_TIMEOUT_MS if wait else 0)
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield _sql.Connection(conn, postgres=False, integrity_errors=(sqlite3.IntegrityError,))
            conn.execute("COMMIT")
        except BaseException as exc:
            # Also when COMMIT itself failed: the reused connection must leave no
            # transaction open behind it.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if not wait and _is_busy(exc):
                raise StorageBusy(f"{self.location} is locked by another connection") from None
            raise

    def prepare(self) -> None:
        """Switch the file to WAL, a property of the file that must be set outside a transaction."""
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()

    def read_version(self, conn: _sql.Connection) -> int:
        """``PRAGMA user_version``."""
        return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def write_version(self, conn: _sql.Connection, version: int) -> None:
        """Set ``PRAGMA user_version``."""
        conn.execute(f"PRAGMA user_version = {int(version)}")


def _is_busy(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" (any extended busy or locked code)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return isinstance(exc, sqlite3.OperationalError) and code in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )


def is_postgres_url(storage: str) -> bool:
    """True when ``--storage`` names a PostgreSQL database rather than the default SQLite."""
    return storage.startswith(("postgres://", "postgresql://"))


class Storage:
    """The auth service's state; each table is reached through an attribute."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.path = backend.path if isinstance(backend, SQLiteBackend) else None
        self.bots = BotStore(self._transaction)
        self.tokens = TokenStore(self._transaction)
        self.instances = InstanceStore(self._transaction)
        self.roles = RoleStore(self._transaction)
        self.locks = locks.LockStore(self._transaction)
        self.cert_authorities = CAStore(self._transaction)
        self.workload_identities = workload_identities.WorkloadIdentityStore(self._transaction)
        self.join_tokens = join_tokens.JoinTokenStore(self._transaction)
        self.apps = apps.AppStore(self._transaction)
        self.databases = apps.DatabaseStore(self._transaction)

    @classmethod
    def open(cls, path: Path) -> Storage:
        """Open the SQLite file ``path``, creating it (mode 0600) and migrating its schema."""
        # Create the file ourselves so it is 0600 from the start; SQLite gives
        # its -wal and -shm files the same mode as the database.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        storage = cls(SQLiteBackend(path))
        storage._migrate()
        return storage

    @classmethod
    def open_postgres(cls, url: str) -> Storage:
        """Open the PostgreSQL database ``url`` (``postgres://...``), migrating its schema.

        Raises StorageUnavailable, without the password, when it cannot be reached.
        """
        from tbot_py.authservice._postgres import PostgresBackend

        storage = cls(PostgresBackend(url))
        storage._migrate()
        return storage

    @property
    def postgres(self) -> bool:
        """True when the state is in PostgreSQL."""
        return self.path is None

    def _transaction(self, *, write: bool = False) -> AbstractContextManager[_sql.Connection]:
        return self.backend.transaction(write=write)

    def read(self, fn: Callable[[_sql.Connection], T], *, wait: bool = True) -> T:
        """``fn(conn)`` in one read transaction, so its reads see one snapshot.

        ``fn`` must only read. With ``wait=False`` this raises StorageBusy rather than
        wait for a lock or the network (see the module docstring); ``fn`` may then have
        run in part, and running it again is safe because it only reads.
        """
        with self.backend.transaction(wait=wait) as conn:
            return fn(conn)

    def _migrate(self) -> None:
        self.backend.prepare()
        with self._transaction(write=True) as conn:
            version = self.backend.read_version(conn)
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"{self.backend.location} has schema version {version}, newer than this "
                    f"tbot-py understands ({SCHEMA_VERSION}); upgrade tbot-py"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    if callable(statement):
                        statement(conn)
                    else:
                        conn.execute(statement)
            if version != SCHEMA_VERSION:
                self.backend.write_version(conn, SCHEMA_VERSION)

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._transaction() as conn:
            return self.backend.read_version(conn)

    # -- cluster metadata -------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """A cluster-wide setting, or None when unset."""
        with self._transaction() as conn:
            return get_meta(conn, key)

    def set_meta(self, key: str, value: str) -> None:
        """Set a cluster-wide setting."""
        with self._transaction(write=True) as conn:
            set_meta(conn, key, value)


def get_meta(conn: _sql.Connection, key: str) -> str | None:
    """A cluster-wide setting, or None when unset, in a Storage transaction."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: _sql.Connection, key: str, value: str) -> None:
    """Set a cluster-wide setting in a Storage transaction."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
