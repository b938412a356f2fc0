"""Join tokens in ``state.db``: single-use, stored only as their SHA-256 hex.

The token value never reaches the database; :mod:`.admin` hands it to the
admin once. A join spends a token in the transaction that creates the bot
instance (:meth:`.instances_store.InstanceStore.join`, via :func:`take_token`),
so one token admits at most one instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tbot_py.authservice import _sql
from tbot_py.authservice.errors import AlreadyExists, BadParameter, NotFound

JOIN_METHOD_TOKEN = "token"  # noqa: S105 - a join method name, not a secret

# Teleport's wording; deliberately the same for unknown, used and expired tokens.
TOKEN_NOT_VALID = 'can not join the cluster with role "Bot", the token is not valid'  # noqa: S105

_COLUMNS = "token_hash, bot_name, join_method, expires_at, created_at"


@dataclass(frozen=True)
class TokenRecord:
    """A stored join token: its hash (never shown), bot, join method and expiry."""

    token_hash: str
    bot_name: str
    join_method: str
    expires_at: datetime
    created_at: datetime


# -- in a Storage transaction ---------------------------------------------------------


def insert_token(
    conn: _sql.Connection, token_hash: str, bot_name: str, expires: datetime, now: datetime
) -> None:
    """Store a join token by its hash for ``bot_name``, which the caller has checked exists."""
    try:
        conn.execute(
            f"INSERT INTO join_tokens ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",  # noqa: S608
            (token_hash, bot_name, JOIN_METHOD_TOKEN, _sql.ts(expires), _sql.ts(now)),
        )
    except _sql.IntegrityError:
        # Only a hash collision of two random tokens could get here.
        raise AlreadyExists("join token already exists") from None


def take_token(conn: _sql.Connection, token_hash: str, now: datetime) -> str | None:
    """Delete the token joining by ``token_hash``; its bot's name, or None when it was not valid.

    An expired token is deleted too, and None returned; the caller raises
    after COMMIT so that deletion stands.
    """
    row = conn.execute(
        "DELETE FROM join_tokens WHERE token_hash = ? AND join_method = ? "
        "RETURNING bot_name, expires_at",
        (token_hash, JOIN_METHOD_TOKEN),
    ).fetchone()
    if row is None or _sql.dt(row[1]) <= now:
        return None
    return str(row[0])


class TokenStore:
    """The join_tokens table for the admin commands, used through ``Storage.tokens``."""

    def __init__(self, transaction: _sql.Transaction) -> None:
        self._transaction = transaction

    def add(self, token_hash: str, bot_name: str, expires: datetime, now: datetime) -> None:
        """Store a join token (by hash) for an existing bot; NotFound when there is none."""
        with self._transaction(write=True) as conn:
            if conn.execute("SELECT 1 FROM bots WHERE name = ?", (bot_name,)).fetchone() is None:
                raise NotFound(f'bot "{bot_name}" not found')
            # Expired tokens are useless; drop them while we hold the write lock anyway.
            conn.execute("DELETE FROM join_tokens WHERE expires_at <= ?", (_sql.ts(now),))
            insert_token(conn, token_hash, bot_name, expires, now)

    def list_all(self) -> list[TokenRecord]:
        """Every stored join token (expired ones included), by expiry."""
        with self._transaction() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM join_tokens "  # noqa: S608
                "ORDER BY expires_at, bot_name, token_hash"
            ).fetchall()
        return [_token_from_row(row) for row in rows]

    def remove(self, hash_prefix: str) -> TokenRecord:
        """Delete the one token whose hash starts with ``hash_prefix`` (lowercase hex).

        Raises NotFound when none matches and BadParameter when several do.
        """
        with self._transaction(write=True) as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM join_tokens "  # noqa: S608
                "WHERE substr(token_hash, 1, ?) = ?",
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

    def count(self, bot_name: str) -> int:
        """How many join tokens are stored for ``bot_name`` (used or expired ones excluded)."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM join_tokens WHERE bot_name = ?", (bot_name,)
            ).fetchone()
        return int(row[0])


def _token_from_row(row: tuple[object, ...]) -> TokenRecord:
    token_hash, bot_name, join_method, expires_at, created_at = row
    return TokenRecord(
        token_hash=str(token_hash),
        bot_name=str(bot_name),
        join_method=str(join_method),
        expires_at=_sql.dt(expires_at),
        created_at=_sql.dt(created_at),
    )
