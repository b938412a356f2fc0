"""Bot instances in ``state.db``: each joined copy of a bot, its generation and last renewal.

A join spends a token and creates an instance at generation 1, in one
transaction (:meth:`InstanceStore.join`). Every renewal advances the
generation by one.

Each instance also keeps its last renewal (the generation it was renewed
from, the SHA-256 of the new public key and the exact answer), so a bot that
crashed before saving that answer can fetch it again: see
:meth:`InstanceStore.renew`. The answer holds only certificates, never a
private key.

The join, renewal and admission checks consult the locks (:mod:`.locks`) in
their own transaction.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tbot_py.authservice import _sql, locks
from tbot_py.authservice.bots_store import BotRecord, get_bot
from tbot_py.authservice.errors import AccessDenied, GenerationMismatch, NotFound
from tbot_py.authservice.tokens_store import TOKEN_NOT_VALID, take_token

_COLUMNS = "id, bot_name, generation, created_at, last_seen_at"


#: ``last_seen_at`` is kept to this resolution: a request within it of the last one
#: recorded writes nothing, so serving certificates costs no disk sync each time.
LAST_SEEN_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class BotInstanceRecord:
    """One joined copy of a bot, with its renewal generation counter."""

    id: str
    bot_name: str
    generation: int
    created_at: datetime
    last_seen_at: datetime


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


@dataclass(frozen=True)
class DelegatedJoin:
    """The outcome of :meth:`InstanceStore.join_delegated`.

    ``stale`` is True when the presented certificate's generation was not the stored one.
    """

    bot: BotRecord
    instance_id: str
    generation: int
    stale: bool


#: Issues the certificates for a generation: returns the JSON answer and its NotAfter.
IssueRenewal = Callable[[int], tuple[str, datetime]]


class InstanceStore:
    """The bot_instances table, used through ``Storage.instances``."""

    def __init__(self, transaction: _sql.Transaction) -> None:
        self._transaction = transaction

    def join(self, token_hash: str, *, instance_id: str, now: datetime) -> BotRecord:
        """Use a join token once: delete it and create bot instance ``instance_id`` (generation 1).

        Both happen in one transaction, so two joins with one token cannot both
        succeed. Raises AccessDenied when the token is unknown, used, expired,
        or its bot is gone, and Locked when a lock is in force on its bot; the
        token of a locked bot stays unused.
        """
        with self._transaction(write=True) as conn:
            bot_name = take_token(conn, token_hash, now)
            bot = None if bot_name is None else get_bot(conn, bot_name)
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

    def join_delegated(
        self,
        bot_name: str,
        *,
        new_instance_id: str,
        presented: tuple[str, int] | None,
        now: datetime,
    ) -> DelegatedJoin:
        """Record a delegated (OIDC) join of ``bot_name``; the token was checked by the caller.

        ``presented`` is the (instance ID, generation) of the bot's own current
        certificate when the bot re-joins over mTLS: that instance is kept and its
        generation advances by one. A stale generation is reported, not enforced:
        delegated joins prove themselves with a fresh ID token every time (Teleport
        only logs it for these methods). Without ``presented``, or when that instance
        no longer exists, a new instance ``new_instance_id`` starts at generation 1.
        Raises AccessDenied when the bot does not exist, Locked when a lock is in force.
        """
        with self._transaction(write=True) as conn:
            bot = get_bot(conn, bot_name)
            if bot is None:
                raise AccessDenied(f'the join token names bot "{bot_name}", which does not exist')
            row = None
            if presented is not None:
                row = conn.execute(
                    "SELECT generation FROM bot_instances WHERE id = ? AND bot_name = ?",
                    (presented[0], bot_name),
                ).fetchone()
            if presented is not None and row is not None:
                instance_id, stored = presented[0], int(str(row[0]))
                locks.refuse_if_locked(conn, bot.name, instance_id, now)
                conn.execute(
                    "UPDATE bot_instances SET generation = ?, last_seen_at = ? WHERE id = ?",
                    (stored + 1, _sql.ts(now), instance_id),
                )
                return DelegatedJoin(bot, instance_id, stored + 1, stale=presented[1] != stored)
            locks.refuse_if_locked(conn, bot.name, None, now)
            conn.execute(
                "INSERT INTO bot_instances (id, bot_name, generation, created_at, "
                "last_seen_at) VALUES (?, ?, 1, ?, ?)",
                (new_instance_id, bot.name, _sql.ts(now), _sql.ts(now)),
            )
        return DelegatedJoin(bot, new_instance_id, 1, stale=False)

    def get(self, bot_name: str, instance_id: str) -> BotInstanceRecord | None:
        """Instance ``instance_id`` of ``bot_name``, or None."""
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM bot_instances WHERE id = ? AND bot_name = ?",  # noqa: S608
                (instance_id, bot_name),
            ).fetchone()
        return None if row is None else _instance_from_row(row)

    def list_for_bot(self, bot_name: str) -> list[BotInstanceRecord]:
        """The instances of ``bot_name``, oldest first; NotFound when there is no such bot."""
        with self._transaction() as conn:
            if get_bot(conn, bot_name) is None:
                raise NotFound(f'bot "{bot_name}" not found')
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM bot_instances "  # noqa: S608
                "WHERE bot_name = ? ORDER BY created_at, id",
                (bot_name,),
            ).fetchall()
        return [_instance_from_row(row) for row in rows]

    def renew(
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
                conn.for_update(
                    "SELECT generation, renewed_from, renewal_key_sha256, renewal_answer, "
                    "renewal_expires_at FROM bot_instances WHERE id = ? AND bot_name = ?"
                ),
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

    def record_seen(self, bot_name: str, instance_id: str, now: datetime) -> None:
        """Record that the instance was seen at ``now`` (see :func:`admit_instance`).

        A write transaction that checks the locks again, so a lock made since the
        caller was admitted still refuses it: raises Locked, or AccessDenied when the
        instance no longer exists.
        """
        with self._transaction(write=True) as conn:
            locks.refuse_if_locked(conn, bot_name, instance_id, now)
            updated = conn.execute(
                "UPDATE bot_instances SET last_seen_at = ? WHERE id = ? AND bot_name = ?",
                (_sql.ts(now), instance_id, bot_name),
            ).rowcount
        if updated != 1:
            raise AccessDenied(f"bot instance {bot_name}/{instance_id} not found")


# -- in a Storage transaction ---------------------------------------------------------


def admit_instance(conn: _sql.Connection, bot_name: str, instance_id: str, now: datetime) -> bool:
    """Check that the instance may be served; True when its ``last_seen_at`` is due.

    Raises Locked when a lock is in force on the instance or its bot, and
    AccessDenied when the instance does not exist. Reads only: the caller records
    a due ``last_seen_at`` with :meth:`InstanceStore.record_seen`, at most once per
    :data:`LAST_SEEN_RESOLUTION`, so serving certificates writes (and waits for the
    disk) rarely.
    """
    locks.refuse_if_locked(conn, bot_name, instance_id, now)
    row = conn.execute(
        "SELECT last_seen_at FROM bot_instances WHERE id = ? AND bot_name = ?",
        (instance_id, bot_name),
    ).fetchone()
    if row is None:
        raise AccessDenied(f"bot instance {bot_name}/{instance_id} not found")
    return row[0] is None or now - _sql.dt(row[0]) >= LAST_SEEN_RESOLUTION


def _instance_from_row(row: tuple[object, ...]) -> BotInstanceRecord:
    instance_id, bot_name, generation, created_at, last_seen_at = row
    return BotInstanceRecord(
        id=str(instance_id),
        bot_name=str(bot_name),
        generation=int(str(generation)),
        created_at=_sql.dt(created_at),
        last_seen_at=_sql.dt(last_seen_at),
    )
