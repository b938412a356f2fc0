"""SQLite state of the auth service: bots, hashed join tokens and bot instances.

The running server and the admin CLI open the same ``state.db`` at the same
time, so every operation is one short transaction on its own connection:
WAL lets readers run beside a writer, ``busy_timeout`` makes a writer wait
for another instead of failing, and ``BEGIN IMMEDIATE`` takes the write lock
up front so a read-then-write step cannot race another process.

Join tokens are stored only as SHA-256 hex; the value itself never reaches
the database. Times are stored as fixed-width UTC text (:mod:`._sql`).

Each bot instance also keeps its last renewal (the generation it was renewed
from, the SHA-256 of the new public key and the exact answer), so a bot that
crashed before saving that answer can fetch it again: see ``renew_instance``.
The answer holds only certificates, never a private key.

This module owns the file and its schema. The roles table is reached through
``Storage.roles`` (:mod:`.roles_store`) and the locks table through
``Storage.locks`` (:mod:`.locks`); the renewal, join and instance checks here
consult the locks in their own transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tbot_py.authservice import _sql, locks
from tbot_py.authservice.errors import (
    AccessDenied,
    AlreadyExists,
    AuthServiceError,
    BadParameter,
    GenerationMismatch,
    NotFound,
)
from tbot_py.authservice.roles_store import RoleStore, require_roles, seed_preset_roles

#: Bump when the schema changes and add a step to ``_MIGRATIONS``.
SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 5000
JOIN_METHOD_TOKEN = "token"  # noqa: S105 - a join method name, not a secret

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

# v2: each instance's last renewal, for idempotent retries (see Storage.renew_instance):
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

# Teleport's wording; deliberately the same for unknown, used and expired tokens.
TOKEN_NOT_VALID = 'can not join the cluster with role "Bot", the token is not valid'  # noqa: S105


class SchemaTooNew(AuthServiceError):
    """``state.db`` was written by a newer tbot-py."""


@dataclass(frozen=True)
class BotRecord:
    """A bot: its roles and SSH logins."""

    name: str
    roles: tuple[str, ...]
    logins: tuple[str, ...]
    created_at: datetime

    @property
    def traits(self) -> dict[str, tuple[str, ...]]:
        """The bot's traits, which role templates such as ``{{internal.logins}}`` expand."""
        return {"logins": self.logins}


@dataclass(frozen=True)
class BotSummary:
    """A bot and how many instances have joined as it."""

    bot: BotRecord
    instance_count: int


@dataclass(frozen=True)
class BotInstanceRecord:
    """One joined copy of a bot, with its renewal generation counter."""

    id: str
    bot_name: str
    generation: int
    created_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True)
class TokenRecord:
    """A stored join token: its hash (never shown), bot, join method and expiry."""

    token_hash: str
    bot_name: str
    join_method: str
    expires_at: datetime
    created_at: datetime


@dataclass(frozen=True)
class RenewalAnswer:
    """The answer to a bot renewal.

    ``body`` is the exact JSON response, ``generation`` and ``expires`` the
    generation and NotAfter of the certificates in it. ``retry`` is True when
    this is the stored answer to an earlier renewal, given again.
    """

    generation: int
    body: str
    expires: datetime
    retry: bool = False


#: Issues the certificates for a generation: returns the JSON answer and its NotAfter.
IssueRenewal = Callable[[int], tuple[str, datetime]]


class Storage:
    """The auth service's state in one SQLite file; ``roles`` and ``locks`` are its tables."""

    def __init__(self, path: Path) -> None:
        self.path = path
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

    # -- bots -------------------------------------------------------------------------

    def add_bot(
        self,
        bot: BotRecord,
        *,
        token_hash: str | None = None,
        token_expires: datetime | None = None,
    ) -> None:
        """Create ``bot`` and, in the same transaction, its first join token.

        Raises AlreadyExists when a bot of that name exists, NotFound when one of
        its roles does not.
        """
        with self._transaction(write=True) as conn:
            try:
                conn.execute(
                    "INSERT INTO bots (name, roles, logins, created_at) VALUES (?, ?, ?, ?)",
                    (
                        bot.name,
                        json.dumps(bot.roles),
                        json.dumps(bot.logins),
                        _sql.ts(bot.created_at),
                    ),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f'bot "{bot.name}" already exists') from None
            require_roles(conn, bot.roles)
            if token_hash is not None and token_expires is not None:
                _insert_token(conn, token_hash, bot.name, token_expires, bot.created_at)

    def get_bot(self, name: str) -> BotRecord | None:
        """The bot called ``name``, or None."""
        with self._transaction() as conn:
            return _get_bot(conn, name)

    def list_bots(self) -> list[BotSummary]:
        """Every bot with its instance count, by name."""
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT b.name, b.roles, b.logins, b.created_at, COUNT(i.id) "
                "FROM bots b LEFT JOIN bot_instances i ON i.bot_name = b.name "
                "GROUP BY b.name ORDER BY b.name"
            ).fetchall()
        return [BotSummary(bot=_bot_from_row(row[:4]), instance_count=int(row[4])) for row in rows]

    def update_bot_roles(
        self, name: str, *, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()
    ) -> BotRecord:
        """Add and remove roles of bot ``name``; the bot keeps at least one role.

        Raises NotFound for an unknown bot or role, BadParameter when a role to
        remove is not the bot's or none would be left.
        """
        with self._transaction(write=True) as conn:
            bot = _get_bot(conn, name)
            if bot is None:
                raise NotFound(f'bot "{name}" not found')
            require_roles(conn, add)
            for role in remove:
                if role not in bot.roles:
                    raise BadParameter(f'bot "{name}" does not have role "{role}"')
            roles = tuple(r for r in dict.fromkeys((*bot.roles, *add)) if r not in remove)
            if not roles:
                raise BadParameter(f'bot "{name}" needs at least one role')
            conn.execute("UPDATE bots SET roles = ? WHERE name = ?", (json.dumps(roles), name))
        return BotRecord(name=name, roles=roles, logins=bot.logins, created_at=bot.created_at)

    def remove_bot(self, name: str) -> None:
        """Delete a bot with its tokens and instances; NotFound when there is no such bot."""
        with self._transaction(write=True) as conn:
            conn.execute("DELETE FROM join_tokens WHERE bot_name = ?", (name,))
            conn.execute("DELETE FROM bot_instances WHERE bot_name = ?", (name,))
            if conn.execute("DELETE FROM bots WHERE name = ?", (name,)).rowcount != 1:
                raise NotFound(f'bot "{name}" not found')

    # -- join tokens ------------------------------------------------------------------

    def add_token(self, token_hash: str, bot_name: str, expires: datetime, now: datetime) -> None:
        """Store a join token (by hash) for an existing bot; NotFound when there is none."""
        with self._transaction(write=True) as conn:
            if _get_bot(conn, bot_name) is None:
                raise NotFound(f'bot "{bot_name}" not found')
            # Expired tokens are useless; drop them while we hold the write lock anyway.
            conn.execute("DELETE FROM join_tokens WHERE expires_at <= ?", (_sql.ts(now),))
            _insert_token(conn, token_hash, bot_name, expires, now)

    def list_tokens(self) -> list[TokenRecord]:
        """Every stored join token (expired ones included), by expiry."""
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT token_hash, bot_name, join_method, expires_at, created_at "
                "FROM join_tokens ORDER BY expires_at, bot_name, token_hash"
            ).fetchall()
        return [_token_from_row(row) for row in rows]

    def remove_token(self, hash_prefix: str) -> TokenRecord:
        """Delete the one token whose hash starts with ``hash_prefix`` (lowercase hex).

        Raises NotFound when none matches and BadParameter when several do.
        """
        with self._transaction(write=True) as conn:
            rows = conn.execute(
                "SELECT token_hash, bot_name, join_method, expires_at, created_at "
                "FROM join_tokens WHERE substr(token_hash, 1, ?) = ?",
                (len(hash_prefix), hash_prefix),
            ).fetchall()
            if not rows:
                raise NotFound(f'no join token with id "{hash_prefix}"')
            if len(rows) > 1:
                raise BadParameter(
                    f'token id "{hash_prefix}" is ambiguous: {len(rows)} tokens match; '
                    "give more of the id shown by tbot-py auth tokens ls"
                )
            conn.execute("DELETE FROM join_tokens WHERE token_hash = ?", (rows[0][0],))
        return _token_from_row(rows[0])

    def count_tokens(self, bot_name: str) -> int:
        """How many join tokens are stored for ``bot_name`` (used or expired ones excluded)."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM join_tokens WHERE bot_name = ?", (bot_name,)
            ).fetchone()
        return int(row[0])

    def consume_token(self, token_hash: str, *, instance_id: str, now: datetime) -> BotRecord:
        """Use a join token once: delete it and create bot instance ``instance_id`` (generation 1).

        Both happen in one transaction, so two joins with one token cannot both
        succeed. Raises AccessDenied when the token is unknown, used, expired,
        or its bot is gone, and Locked when a lock is in force on its bot; the
        token of a locked bot stays unused.
        """
        with self._transaction(write=True) as conn:
            row = conn.execute(
                "DELETE FROM join_tokens WHERE token_hash = ? AND join_method = ? "
                "RETURNING bot_name, expires_at",
                (token_hash, JOIN_METHOD_TOKEN),
            ).fetchone()
            bot = None
            if row is not None and _sql.dt(row[1]) > now:
                bot = _get_bot(conn, str(row[0]))
            if bot is not None:
                # Raising rolls the DELETE back: the token is not spent on a locked bot.
                locks.refuse_if_locked(conn, bot.name, None, now)
                conn.execute(
                    "INSERT INTO bot_instances (id, bot_name, generation, created_at, "
                    "last_seen_at) VALUES (?, ?, 1, ?, ?)",
                    (instance_id, bot.name, _sql.ts(now), _sql.ts(now)),
                )
        # Raised after COMMIT: an expired token found here stays deleted.
        if bot is None:
            raise AccessDenied(TOKEN_NOT_VALID)
        return bot

    # -- bot instances ----------------------------------------------------------------

    def get_instance(self, bot_name: str, instance_id: str) -> BotInstanceRecord | None:
        """Instance ``instance_id`` of ``bot_name``, or None."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT id, bot_name, generation, created_at, last_seen_at FROM bot_instances "
                "WHERE id = ? AND bot_name = ?",
                (instance_id, bot_name),
            ).fetchone()
        return None if row is None else _instance_from_row(row)

    def list_instances(self, bot_name: str) -> list[BotInstanceRecord]:
        """The instances of ``bot_name``, oldest first; NotFound when there is no such bot."""
        with self._transaction() as conn:
            if _get_bot(conn, bot_name) is None:
                raise NotFound(f'bot "{bot_name}" not found')
            rows = conn.execute(
                "SELECT id, bot_name, generation, created_at, last_seen_at FROM bot_instances "
                "WHERE bot_name = ? ORDER BY created_at, id",
                (bot_name,),
            ).fetchall()
        return [_instance_from_row(row) for row in rows]

    def renew_instance(
        self,
        bot_name: str,
        instance_id: str,
        *,
        presented: int,
        new_key_spki: bytes,
        now: datetime,
        issue: IssueRenewal,
    ) -> RenewalAnswer:
        """Renew an instance from generation ``presented`` for a new key; at most once.

        When ``presented`` is the stored generation, ``issue(presented + 1)``
        makes the answer; it is stored with ``presented`` and the SHA-256 of
        ``new_key_spki`` (the new key's SubjectPublicKeyInfo DER), and the
        generation advances. When ``presented`` is one behind, the last renewal
        was from ``presented`` for the same key and its answer has not expired
        at ``now``, this is a retry by a bot that lost that answer: the stored
        answer comes back, nothing is issued and the generation stays. Anything
        else is a generation mismatch: two holders of one identity. It locks
        the instance (see :mod:`.locks`) and is refused.

        Checked and written in one transaction, so concurrent renewals from one
        generation advance it once. Raises Locked when a lock is in force on
        the instance or its bot, AccessDenied when the instance is unknown and
        GenerationMismatch, after committing the new lock, on a mismatch.
        """
        key_sha256 = hashlib.sha256(new_key_spki).hexdigest()
        with self._transaction(write=True) as conn:
            locks.refuse_if_locked(conn, bot_name, instance_id, now)
            row = conn.execute(
                "SELECT generation, renewed_from, renewal_key_sha256, renewal_answer, "
                "renewal_expires_at FROM bot_instances WHERE id = ? AND bot_name = ?",
                (instance_id, bot_name),
            ).fetchone()
            if row is None:
                raise AccessDenied(f"bot instance {bot_name}/{instance_id} not found")
            stored = int(row[0])
            renewed_from, renewal_key, renewal_answer, renewal_expires = row[1:]
            if presented == stored:
                generation = stored + 1
                body, expires = issue(generation)
                conn.execute(
                    "UPDATE bot_instances SET generation = ?, last_seen_at = ?, "
                    "renewed_from = ?, renewal_key_sha256 = ?, renewal_answer = ?, "
                    "renewal_expires_at = ? WHERE id = ? AND bot_name = ?",
                    (
                        generation,
                        _sql.ts(now),
                        presented,
                        key_sha256,
                        body,
                        _sql.ts(expires),
                        instance_id,
                        bot_name,
                    ),
                )
                return RenewalAnswer(generation=generation, body=body, expires=expires)
            if (
                presented == stored - 1
                and renewed_from == presented
                and renewal_key is not None
                and hmac.compare_digest(renewal_key, key_sha256)
                and renewal_answer is not None
                and renewal_expires is not None
                and _sql.dt(renewal_expires) > now
            ):
                conn.execute(
                    "UPDATE bot_instances SET last_seen_at = ? WHERE id = ? AND bot_name = ?",
                    (_sql.ts(now), instance_id, bot_name),
                )
                return RenewalAnswer(
                    generation=stored,
                    body=str(renewal_answer),
                    expires=_sql.dt(renewal_expires),
                    retry=True,
                )
            lock = locks.lock_mismatched_instance(
                conn, bot_name, instance_id, stored=stored, presented=presented, now=now
            )
        # Raised after COMMIT: the lock stands although the renewal is refused.
        raise GenerationMismatch(lock.denial(), lock=lock, stored=stored, presented=presented)

    def admit_instance(self, bot_name: str, instance_id: str, now: datetime) -> None:
        """Record that the instance was seen, if it may be served.

        Raises Locked when a lock is in force on the instance or its bot, and
        AccessDenied when the instance does not exist.
        """
        with self._transaction(write=True) as conn:
            locks.refuse_if_locked(conn, bot_name, instance_id, now)
            updated = conn.execute(
                "UPDATE bot_instances SET last_seen_at = ? WHERE id = ? AND bot_name = ?",
                (_sql.ts(now), instance_id, bot_name),
            ).rowcount
        if updated != 1:
            raise AccessDenied(f"bot instance {bot_name}/{instance_id} not found")


def _insert_token(
    conn: sqlite3.Connection, token_hash: str, bot_name: str, expires: datetime, now: datetime
) -> None:
    try:
        conn.execute(
            "INSERT INTO join_tokens (token_hash, bot_name, join_method, expires_at, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (token_hash, bot_name, JOIN_METHOD_TOKEN, _sql.ts(expires), _sql.ts(now)),
        )
    except sqlite3.IntegrityError:
        # Only a hash collision of two random tokens could get here.
        raise AlreadyExists("join token already exists") from None


def _get_bot(conn: sqlite3.Connection, name: str) -> BotRecord | None:
    row = conn.execute(
        "SELECT name, roles, logins, created_at FROM bots WHERE name = ?", (name,)
    ).fetchone()
    return None if row is None else _bot_from_row(row)


def _bot_from_row(row: tuple[object, ...]) -> BotRecord:
    name, roles, logins, created_at = row
    return BotRecord(
        name=str(name),
        roles=tuple(json.loads(str(roles))),
        logins=tuple(json.loads(str(logins))),
        created_at=_sql.dt(created_at),
    )


def _instance_from_row(row: tuple[object, ...]) -> BotInstanceRecord:
    instance_id, bot_name, generation, created_at, last_seen_at = row
    return BotInstanceRecord(
        id=str(instance_id),
        bot_name=str(bot_name),
        generation=int(str(generation)),
        created_at=_sql.dt(created_at),
        last_seen_at=_sql.dt(last_seen_at),
    )


def _token_from_row(row: tuple[object, ...]) -> TokenRecord:
    token_hash, bot_name, join_method, expires_at, created_at = row
    return TokenRecord(
        token_hash=str(token_hash),
        bot_name=str(bot_name),
        join_method=str(join_method),
        expires_at=_sql.dt(expires_at),
        created_at=_sql.dt(created_at),
    )
