"""Locks: a bot, or one instance of a bot, that the auth service refuses to serve.

A lock targets a ``bot`` (by name) or a ``bot_instance`` (``<bot>/<instance id>``).
While it is in force (no expiry, or an expiry still ahead) the auth service
refuses with 403 every renewal, issuance and CA fetch of the target, and a
``bot`` lock also refuses joins without spending the token. The message names
the lock: ``bot instance ci/9f0c... is locked: <message> (lock <id>)``.

The auth service locks an instance by itself when a renewal presents the wrong
generation (protocol §4): two holders of one identity, e.g. a stolen copy.
Only that instance is locked, not the bot: teleport#52021 shows how a bot-wide
lock takes down every healthy instance. The bot recovers with a new join
token, which makes a new instance.

Locks outlive their target: removing a bot does not lift its locks, so a
re-created bot of the same name is not silently unlocked.

Every statement here runs in a transaction ``Storage`` hands in, so a check is
atomic with the renewal or join it guards, and the lock made on a mismatch is
written in the transaction that refuses it. A check is one indexed query.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from tbot_py.authservice import _sql
from tbot_py.authservice.errors import Locked, NotFound

KIND_BOT = "bot"
KIND_BOT_INSTANCE = "bot_instance"
TARGET_KINDS = (KIND_BOT, KIND_BOT_INSTANCE)
#: ``created_by`` of the locks the auth service makes itself.
CREATED_BY_AUTH = "auth"

_COLUMNS = "id, target_kind, target, message, created_at, created_by, expires_at"


def describe_target(target_kind: str, target: str) -> str:
    """``bot ci`` or ``bot instance ci/9f0c...``: a lock target as messages name it."""
    return f"{target_kind.replace('_', ' ')} {target}"


@dataclass(frozen=True)
class Lock:
    """One lock. ``expires_at`` None means until it is removed."""

    id: str
    target_kind: str
    target: str
    message: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None

    @property
    def bot_name(self) -> str:
        """The bot the target belongs to."""
        return self.target.partition("/")[0]

    def in_force(self, now: datetime) -> bool:
        """True unless the lock has expired at ``now``."""
        return self.expires_at is None or self.expires_at > now

    def describe_target(self) -> str:
        """``bot ci`` or ``bot instance ci/9f0c...``."""
        return describe_target(self.target_kind, self.target)

    def denial(self) -> str:
        """The message of the 403 a locked caller gets.

        A theft lock also says how to recover: the legitimate holder is locked
        out too, and only a new join (a new instance) lets it in again; the lock
        stays, so a stolen copy of the old instance stays useless.
        """
        text = f"{self.describe_target()} is locked: {self.message} (lock {self.id})"
        if self.created_by == CREATED_BY_AUTH and self.target_kind == KIND_BOT_INSTANCE:
            # Not "remove the lock": that hands the instance back to whoever renews first,
            # which may be the thief. A new token makes a new, clean instance.
            text += (
                f"; give the bot a new token with tbot-py auth bots instances add "
                f"{self.bot_name} and keep the lock"
            )
        return text


def instance_target(bot_name: str, instance_id: str) -> str:
    """The target of a ``bot_instance`` lock: ``<bot>/<instance id>``."""
    return f"{bot_name}/{instance_id}"


def new_lock(
    target_kind: str,
    target: str,
    message: str,
    *,
    created_by: str,
    now: datetime,
    ttl: timedelta | None = None,
) -> Lock:
    """A lock with a fresh id (uuid4), in force from ``now`` for ``ttl`` or until removed."""
    return Lock(
        id=str(uuid.uuid4()),
        target_kind=target_kind,
        target=target,
        message=message,
        created_at=now,
        created_by=created_by,
        expires_at=None if ttl is None else now + ttl,
    )


# -- in a Storage transaction ---------------------------------------------------------


def in_force(
    conn: _sql.Connection, bot_name: str, instance_id: str | None, now: datetime
) -> Lock | None:
    """The oldest lock in force on bot ``bot_name`` or on its instance ``instance_id``.

    One query on the ``locks_target`` index; ``instance_id`` None checks the bot only.
    """
    targets: list[str] = [KIND_BOT, bot_name]
    if instance_id is not None:
        targets += [KIND_BOT_INSTANCE, instance_target(bot_name, instance_id)]
    match = " OR ".join(["(target_kind = ? AND target = ?)"] * (len(targets) // 2))
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM locks WHERE ({match}) "  # noqa: S608
        "AND (expires_at IS NULL OR expires_at > ?) ORDER BY created_at, id LIMIT 1",
        (*targets, _sql.ts(now)),
    ).fetchone()
    return None if row is None else _lock_from_row(row)


def refuse_if_locked(
    conn: _sql.Connection, bot_name: str, instance_id: str | None, now: datetime
) -> None:
    """Raise Locked when a lock is in force on the bot or the instance (see :func:`in_force`)."""
    lock = in_force(conn, bot_name, instance_id, now)
    if lock is not None:
        raise Locked(lock.denial(), lock=lock)


def lock_mismatched_instance(
    conn: _sql.Connection,
    bot_name: str,
    instance_id: str,
    *,
    stored: int,
    presented: int,
    now: datetime,
) -> Lock:
    """Lock an instance whose renewal presented generation ``presented`` instead of ``stored``."""
    lock = new_lock(
        KIND_BOT_INSTANCE,
        instance_target(bot_name, instance_id),
        f"certificate generation mismatch (stored={stored}, presented={presented}): "
        "possible stolen credentials",
        created_by=CREATED_BY_AUTH,
        now=now,
    )
    _insert(conn, lock)
    return lock


def _insert(conn: _sql.Connection, lock: Lock) -> None:
    conn.execute(
        f"INSERT INTO locks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
        (
            lock.id,
            lock.target_kind,
            lock.target,
            lock.message,
            _sql.ts(lock.created_at),
            lock.created_by,
            None if lock.expires_at is None else _sql.ts(lock.expires_at),
        ),
    )


class LockStore:
    """The locks table for the admin commands, used through ``Storage.locks``."""

    def __init__(self, transaction: _sql.Transaction) -> None:
        self._transaction = transaction

    def add(self, lock: Lock) -> None:
        """Store ``lock``; NotFound unless its bot or bot instance exists.

        Locks that expired by ``lock.created_at`` are dropped on the way.
        """
        with self._transaction(write=True) as conn:
            if lock.target_kind == KIND_BOT:
                found = conn.execute("SELECT 1 FROM bots WHERE name = ?", (lock.target,))
                missing = f'bot "{lock.target}" not found'
            else:
                bot_name, _, instance_id = lock.target.partition("/")
                found = conn.execute(
                    "SELECT 1 FROM bot_instances WHERE bot_name = ? AND id = ?",
                    (bot_name, instance_id),
                )
                missing = (
                    f"bot instance {lock.target} not found; "
                    f"see tbot-py auth bots instances ls {bot_name}"
                )
            if found.fetchone() is None:
                raise NotFound(missing)
            conn.execute("DELETE FROM locks WHERE expires_at <= ?", (_sql.ts(lock.created_at),))
            _insert(conn, lock)

    def list_all(self) -> list[Lock]:
        """Every stored lock, expired ones included, oldest first."""
        with self._transaction() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM locks ORDER BY created_at, id"  # noqa: S608
            ).fetchall()
        return [_lock_from_row(row) for row in rows]

    def remove(self, lock_id: str) -> Lock:
        """Delete lock ``lock_id``; NotFound when there is none."""
        with self._transaction(write=True) as conn:
            row = conn.execute(
                f"DELETE FROM locks WHERE id = ? RETURNING {_COLUMNS}",  # noqa: S608
                (lock_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f'no lock with id "{lock_id}"; see tbot-py auth locks ls')
        return _lock_from_row(row)


def _lock_from_row(row: tuple[object, ...]) -> Lock:
    lock_id, target_kind, target, message, created_at, created_by, expires_at = row
    return Lock(
        id=str(lock_id),
        target_kind=str(target_kind),
        target=str(target),
        message=str(message),
        created_at=_sql.dt(created_at),
        created_by=str(created_by),
        expires_at=None if expires_at is None else _sql.dt(expires_at),
    )
