"""Admin operations on a cluster's state: bots and join tokens.

They work on the data directory directly; the server need not run. A join
token value exists only in the returned :class:`IssuedToken`, which the caller
shows once; the database keeps its SHA-256.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tbot_py.authservice.cluster import Cluster
from tbot_py.authservice.errors import BadParameter
from tbot_py.authservice.storage import JOIN_METHOD_TOKEN, BotRecord, BotSummary
from tbot_py.client.wire import format_time
from tbot_py.config.duration import InvalidDurationError, parse_duration
from tbot_py.identity import keys

DEFAULT_TOKEN_TTL = timedelta(hours=1)

_BOT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# Roles and logins end up in certificate subjects and SSH principals: printable,
# no separators, no spaces.
_ITEM_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


@dataclass(frozen=True)
class IssuedToken:
    """A freshly created join token. ``token`` is the secret, shown to the admin once."""

    token: str
    bot_name: str
    expires: datetime
    join_method: str = JOIN_METHOD_TOKEN

    def to_json(self) -> dict[str, Any]:
        """The ``tokens add --format json`` object."""
        return {
            "token": self.token,
            "bot_name": self.bot_name,
            "token_expires": format_time(self.expires),
            "join_method": self.join_method,
        }


@dataclass(frozen=True)
class NewBot:
    """A created bot and its first join token."""

    bot: BotRecord
    token: IssuedToken

    def to_json(self) -> dict[str, Any]:
        """The ``bots add --format json`` object."""
        return {
            "bot_name": self.bot.name,
            "roles": list(self.bot.roles),
            "logins": list(self.bot.logins),
            "token": self.token.token,
            "token_expires": format_time(self.token.expires),
            "join_method": self.token.join_method,
        }


def parse_go_duration(text: str) -> timedelta:
    """Parse a Go duration such as ``1h``, ``30m`` or ``1h30m``; BadParameter otherwise."""
    try:
        return parse_duration(text)
    except InvalidDurationError as exc:
        raise BadParameter(str(exc)) from None


def parse_name_list(text: str, what: str) -> tuple[str, ...]:
    """Split a comma-separated list of ``what`` (role, login); reject empty or odd items."""
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    for item in items:
        if not item:
            raise BadParameter(f"{what} list {text!r} has an empty item; use a,b,c")
        if not _ITEM_RE.match(item):
            raise BadParameter(f"invalid {what} {item!r}: use letters, digits and _ . @ : -")
    return tuple(dict.fromkeys(items))


def validate_bot_name(name: str) -> None:
    """Raise BadParameter unless ``name`` matches ``^[a-z0-9][a-z0-9_.-]{0,62}$``."""
    if not _BOT_NAME_RE.match(name):
        raise BadParameter(
            f"invalid bot name {name!r}: use 1-63 lowercase letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def add_bot(
    cluster: Cluster,
    name: str,
    *,
    roles: tuple[str, ...],
    logins: tuple[str, ...] = (),
    token_ttl: timedelta = DEFAULT_TOKEN_TTL,
    now: datetime | None = None,
) -> NewBot:
    """Create bot ``name`` with ``roles`` and ``logins`` and its first join token.

    Raises BadParameter for an invalid name, no roles or a bad TTL, and
    AlreadyExists when the bot exists.
    """
    validate_bot_name(name)
    if not roles:
        raise BadParameter(f'bot "{name}" needs at least one role (--roles a,b)')
    now = now or datetime.now(UTC)
    token, expires = _new_token(token_ttl, now)
    bot = BotRecord(name=name, roles=roles, logins=logins, created_at=now)
    cluster.storage.add_bot(bot, token_hash=keys.token_hash(token), token_expires=expires)
    return NewBot(bot=bot, token=IssuedToken(token=token, bot_name=name, expires=expires))


def add_token(
    cluster: Cluster,
    bot_name: str,
    *,
    ttl: timedelta = DEFAULT_TOKEN_TTL,
    now: datetime | None = None,
) -> IssuedToken:
    """A new single-use join token for an existing bot; NotFound when there is none."""
    validate_bot_name(bot_name)
    now = now or datetime.now(UTC)
    token, expires = _new_token(ttl, now)
    cluster.storage.add_token(keys.token_hash(token), bot_name, expires, now)
    return IssuedToken(token=token, bot_name=bot_name, expires=expires)


def list_bots(cluster: Cluster) -> list[BotSummary]:
    """Every bot with its number of instances, by name."""
    return cluster.storage.list_bots()


def remove_bot(cluster: Cluster, name: str) -> None:
    """Remove a bot, its tokens and its instances; NotFound when there is no such bot."""
    validate_bot_name(name)
    cluster.storage.remove_bot(name)


def _new_token(ttl: timedelta, now: datetime) -> tuple[str, datetime]:
    if ttl < timedelta(seconds=1):
        raise BadParameter("token TTL must be at least 1s")
    return secrets.token_hex(16), (now + ttl).replace(microsecond=0)
