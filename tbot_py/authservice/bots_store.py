"""Bots in ``state.db``: a name, the roles it may use and its SSH logins.

A bot is created together with its first join token, in one transaction,
and may only name roles that exist (:func:`.roles_store.require_roles`).
Removing a bot removes its join tokens and instances, but not its locks
(see :mod:`.locks`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from tbot_py.authservice import _sql
from tbot_py.authservice.errors import AlreadyExists, BadParameter, NotFound
from tbot_py.authservice.roles_store import require_roles
from tbot_py.authservice.tokens_store import insert_token


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


# -- in a Storage transaction ---------------------------------------------------------


def get_bot(conn: _sql.Connection, name: str) -> BotRecord | None:
    """The bot called ``name``, or None."""
    row = conn.execute(
        "SELECT name, roles, logins, created_at FROM bots WHERE name = ?", (name,)
    ).fetchone()
    return None if row is None else _bot_from_row(row)


class BotStore:
    """The bots table, used through ``Storage.bots``."""

    def __init__(self, transaction: _sql.Transaction) -> None:
        self._transaction = transaction

    def add(
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
            except _sql.IntegrityError:
                raise AlreadyExists(f'bot "{bot.name}" already exists') from None
            require_roles(conn, bot.roles)
            if token_hash is not None and token_expires is not None:
                insert_token(conn, token_hash, bot.name, token_expires, bot.created_at)

    def get(self, name: str) -> BotRecord | None:
        """The bot called ``name``, or None."""
        with self._transaction() as conn:
            return get_bot(conn, name)

    def list_all(self) -> list[BotSummary]:
        """Every bot with its instance count, by name."""
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT b.name, b.roles, b.logins, b.created_at, COUNT(i.id) "
                "FROM bots b LEFT JOIN bot_instances i ON i.bot_name = b.name "
                "GROUP BY b.name ORDER BY b.name"
            ).fetchall()
        return [BotSummary(bot=_bot_from_row(row[:4]), instance_count=int(row[4])) for row in rows]

    def update_roles(
        self, name: str, *, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()
    ) -> BotRecord:
        """Add and remove roles of bot ``name``; the bot keeps at least one role.

        Raises NotFound for an unknown bot or role, BadParameter when a role to
        remove is not the bot's or none would be left.
        """
        with self._transaction(write=True) as conn:
            bot = get_bot(conn, name)
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

    def remove(self, name: str) -> None:
        """Delete a bot with its tokens and instances; NotFound when there is no such bot."""
        with self._transaction(write=True) as conn:
            conn.execute("DELETE FROM join_tokens WHERE bot_name = ?", (name,))
            conn.execute("DELETE FROM bot_instances WHERE bot_name = ?", (name,))
            if conn.execute("DELETE FROM bots WHERE name = ?", (name,)).rowcount != 1:
                raise NotFound(f'bot "{name}" not found')


def _bot_from_row(row: tuple[object, ...]) -> BotRecord:
    name, roles, logins, created_at = row
    return BotRecord(
        name=str(name),
        roles=tuple(json.loads(str(roles))),
        logins=tuple(json.loads(str(logins))),
        created_at=_sql.dt(created_at),
    )
