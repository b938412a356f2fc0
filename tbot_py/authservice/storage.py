"""SQLite state of the auth service: the ``state.db`` file, its schema and migrations.

The running server and the admin CLI open the same ``state.db`` at the same
time, so every operation is one short transaction on its own connection:
WAL lets readers run beside a writer, ``busy_timeout`` makes a writer wait
for another instead of failing, and ``BEGIN IMMEDIATE`` takes the write lock
up front so a read-then-write step cannot race another process.

This module owns the file, the connection and transaction rules, the schema
and the cluster metadata. Each table's queries live in their own module and
are reached through a ``Storage`` attribute that shares its transactions:
``bots`` (:mod:`.bots_store`), ``tokens`` (:mod:`.tokens_store`),
``instances`` (:mod:`.instances_store`), ``roles`` (:mod:`.roles_store`) and
``locks`` (:mod:`.locks`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tbot_py.authservice import locks
from tbot_py.authservice.bots_store import BotStore
from tbot_py.authservice.errors import AuthServiceError
from tbot_py.authservice.instances_store import InstanceStore
from tbot_py.authservice.roles_store import RoleStore, seed_preset_roles
from tbot_py.authservice.tokens_store import TokenStore

#: Bump when the schema changes and add a step to ``_MIGRATIONS``.
SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 5000

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
_SCHEMA_V3: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
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

_MIGRATIONS: dict[int, tuple[str | Callable[[sqlite3.Connection], None], ...]] = {
    1: _SCHEMA_V1,
    2: _SCHEMA_V2,
    3: _SCHEMA_V3,
    4: _SCHEMA_V4,
}


class SchemaTooNew(AuthServiceError):
    """``state.db`` was written by a newer tbot-py."""


class Storage:
    """The auth service's state in one SQLite file; each table is reached through an attribute."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bots = BotStore(self._transaction)
        self.tokens = TokenStore(self._transaction)
        self.instances = InstanceStore(self._transaction)
        self.roles = RoleStore(self._transaction)
        self.locks = locks.LockStore(self._transaction)

    @classmethod
    def open(cls, path: Path) -> Storage:
        """Open ``path``, creating it (mode 0600) and migrating its schema as needed."""
        # Create the file ourselves so it is 0600 from the start; SQLite gives
        # its -wal and -shm files the same mode as the database.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        storage = cls(path)
        storage._migrate()
        return storage

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            # WAL is a property of the file; it must be set outside a transaction.
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()
        with self._transaction(write=True) as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"state.db has schema version {version}, newer than this tbot-py "
                    f"understands ({SCHEMA_VERSION}); upgrade tbot-py"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    if callable(statement):
                        statement(conn)
                    else:
                        conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        """The schema version recorded in the file."""
        with self._transaction() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # -- cluster metadata -------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """A cluster-wide setting, or None when unset."""
        with self._transaction() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a cluster-wide setting."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
