"""Admin operations on a cluster's state: roles, workload identities, bots, tokens and locks.

The admin commands call them on the data directory directly (the server need
not run); the server's admin API (:mod:`.admin_api`) calls the same functions. A join
token value exists only in the returned :class:`IssuedToken`, which the caller
shows once; the database keeps its SHA-256.

Every change is recorded in the audit log with one call after it succeeded,
e.g. ``audit.emit(cluster, "admin.role.create", resource=f"role/{name}")``; the
actor is the local OS user, or the remote admin set by ``audit.acting_as``.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from tbot_py.authservice import audit, ca, locks
from tbot_py.authservice.bots_store import BotRecord, BotSummary
from tbot_py.authservice.cluster import Cluster
from tbot_py.authservice.errors import AlreadyExists, BadParameter, NotFound
from tbot_py.authservice.instances_store import BotInstanceRecord
from tbot_py.authservice.locks import Lock
from tbot_py.authservice.resource_kinds import KINDS, R, Resource, ResourceKind
from tbot_py.authservice.roles import NAME_RE, Role, parse_role_yaml
from tbot_py.authservice.tokens_store import JOIN_METHOD_TOKEN, TokenRecord
from tbot_py.client.wire import format_time
from tbot_py.config._checks import read_text_file
from tbot_py.config.duration import InvalidDurationError, parse_duration
from tbot_py.identity import keys
from tbot_py.identity.identityfile import host_ca_line, render_identity_file

DEFAULT_TOKEN_TTL = timedelta(hours=1)
DEFAULT_LOCK_MESSAGE = "locked by an administrator"
MAX_LOCK_MESSAGE = 256

_BOT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_TOKEN_ID_RE = re.compile(r"^[0-9a-f]{4,64}$")
_INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# What ``auth get`` and ``auth rm`` accept: ``role/NAME``, or ``roles`` for all of them.
_ROLE_KINDS = ("role", "roles")


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


def bot_summary_json(summary: BotSummary) -> dict[str, Any]:
    """One bot in ``bots ls --format json`` (and the admin API)."""
    bot = summary.bot
    return {
        "bot_name": bot.name,
        "roles": list(bot.roles),
        "logins": list(bot.logins),
        "instances": summary.instance_count,
        "created": format_time(bot.created_at.replace(microsecond=0)),
    }


def bot_json(bot: BotRecord) -> dict[str, Any]:
    """A bot in ``bots update --format json`` (and the admin API)."""
    return {"bot_name": bot.name, "roles": list(bot.roles), "logins": list(bot.logins)}


def instance_json(instance: BotInstanceRecord) -> dict[str, Any]:
    """One instance in ``bots instances ls --format json`` (and the admin API)."""
    return {
        "instance_id": instance.id,
        "bot_name": instance.bot_name,
        "generation": instance.generation,
        "created": format_time(instance.created_at.replace(microsecond=0)),
        "last_seen": format_time(instance.last_seen_at.replace(microsecond=0)),
    }


def removed_token_json(record: TokenRecord) -> dict[str, Any]:
    """A removed join token, by its short id (``tokens rm`` over the admin API)."""
    return {"id": audit.token_id(record.token_hash), "bot_name": record.bot_name}


def token_json(record: TokenRecord, now: datetime) -> dict[str, Any]:
    """One join token in ``tokens ls --format json``: its short id, never the token or hash."""
    return {
        "id": audit.token_id(record.token_hash),
        "bot_name": record.bot_name,
        "join_method": record.join_method,
        "expires": format_time(record.expires_at.replace(microsecond=0)),
        "expired": record.expires_at <= now,
    }


def lock_json(lock: Lock, now: datetime) -> dict[str, Any]:
    """A lock in ``locks ls`` and ``locks add`` JSON."""
    return {
        "id": lock.id,
        "target_kind": lock.target_kind,
        "target": lock.target,
        "message": lock.message,
        "created_by": lock.created_by,
        "created": format_time(lock.created_at.replace(microsecond=0)),
        "expires": None
        if lock.expires_at is None
        else format_time(lock.expires_at.replace(microsecond=0)),
        "expired": not lock.in_force(now),
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
        if not NAME_RE.match(item):
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
    token_hash = keys.token_hash(token)
    cluster.storage.bots.add(bot, token_hash=token_hash, token_expires=expires)
    audit.emit(
        cluster,
        "admin.bot.add",
        resource=f"bot/{name}",
        details={"roles": ",".join(roles), "logins": ",".join(logins)},
    )
    _emit_token_added(cluster, token_hash, name, expires)
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
    token_hash = keys.token_hash(token)
    cluster.storage.tokens.add(token_hash, bot_name, expires, now)
    _emit_token_added(cluster, token_hash, bot_name, expires)
    return IssuedToken(token=token, bot_name=bot_name, expires=expires)


def list_bots(cluster: Cluster) -> list[BotSummary]:
    """Every bot with its number of instances, by name."""
    return cluster.storage.bots.list_all()


def remove_bot(cluster: Cluster, name: str) -> None:
    """Remove a bot, its tokens and its instances; NotFound when there is no such bot."""
    validate_bot_name(name)
    cluster.storage.bots.remove(name)
    audit.emit(cluster, "admin.bot.rm", resource=f"bot/{name}")


def update_bot_roles(
    cluster: Cluster, name: str, *, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()
) -> BotRecord:
    """Add roles to and remove roles from bot ``name``; the bot keeps at least one.

    Raises BadParameter when there is nothing to do or no role would be left,
    NotFound for an unknown bot or role.
    """
    validate_bot_name(name)
    if not add and not remove:
        raise BadParameter("nothing to update: give --add-roles and/or --remove-roles")
    both = set(add) & set(remove)
    if both:
        raise BadParameter(f"role {sorted(both)[0]!r} is both added and removed")
    bot = cluster.storage.bots.update_roles(name, add=add, remove=remove)
    audit.emit(
        cluster, "admin.bot.update", resource=f"bot/{name}", details={"roles": ",".join(bot.roles)}
    )
    return bot


def list_instances(cluster: Cluster, bot_name: str) -> list[BotInstanceRecord]:
    """The joined instances of a bot, oldest first; NotFound when there is no such bot."""
    validate_bot_name(bot_name)
    return cluster.storage.instances.list_for_bot(bot_name)


def list_tokens(cluster: Cluster) -> list[TokenRecord]:
    """Every stored join token, by expiry. Show them by :func:`audit.token_id`, never the hash."""
    return cluster.storage.tokens.list_all()


def remove_token(cluster: Cluster, token_id: str) -> TokenRecord:
    """Remove the join token whose id (its hash's first hex characters) starts with ``token_id``.

    Raises BadParameter for a malformed or ambiguous id, NotFound when none matches.
    """
    prefix = normalize_token_id(token_id)
    removed = cluster.storage.tokens.remove(prefix)
    audit.emit(
        cluster,
        "admin.token.rm",
        resource="token/" + audit.token_id(removed.token_hash),
        details={"bot": removed.bot_name},
    )
    return removed


def normalize_token_id(token_id: str) -> str:
    """A token id (or its first hex characters) in lower case; BadParameter when malformed."""
    prefix = token_id.strip().lower()
    if not _TOKEN_ID_RE.match(prefix):
        raise BadParameter(
            f"invalid token id {token_id[:80]!r}: use the ID column of tbot-py auth tokens ls"
        )
    return prefix


def read_role_file(path: Path) -> Role:
    """Read and validate a role YAML file. Raises ConfigError or BadParameter."""
    text, problem = read_text_file(path)
    if text is None:
        raise BadParameter(f"role file {path} {problem}")
    return parse_role_yaml(text, source=str(path))


def create_role(
    cluster: Cluster, role: Role, *, force: bool = False, now: datetime | None = None
) -> bool:
    """Store ``role``; True when it replaced an existing one (only with ``force``).

    Raises AlreadyExists when the role exists and ``force`` is False.
    """
    now = now or datetime.now(UTC)
    try:
        replaced = cluster.storage.roles.put(role, now, overwrite=force)
    except AlreadyExists as exc:
        raise AlreadyExists(f"{exc.message}; use --force to replace it") from None
    event = "admin.role.update" if replaced else "admin.role.create"
    audit.emit(cluster, event, resource=f"role/{role.name}", now=now)
    return replaced


def get_role(cluster: Cluster, name: str) -> Role:
    """The role called ``name``; NotFound when there is none."""
    role = cluster.storage.roles.get(name)
    if role is None:
        raise NotFound(f'role "{name}" not found')
    return role


def list_roles(cluster: Cluster) -> list[Role]:
    """Every role, by name."""
    return cluster.storage.roles.list_all()


def delete_role(cluster: Cluster, name: str) -> None:
    """Delete a role; BadParameter while a bot uses it, NotFound when there is none."""
    cluster.storage.roles.delete(name)
    audit.emit(cluster, "admin.role.rm", resource=f"role/{name}")


def read_resource_file(path: Path) -> Role | Resource:
    """Read a role, workload_identity, token, app or db YAML file, by its ``kind``.

    Raises ConfigError for a bad document, BadParameter for an unreadable file.
    """
    text, problem = read_text_file(path)
    if text is None:
        raise BadParameter(f"resource file {path} {problem}")
    kind = KINDS.get(resource_kind(text) or "")
    if kind is not None:
        parsed: Resource = kind.parse_yaml(text, str(path))
        return parsed
    return parse_role_yaml(text, source=str(path))


def resource_kind(text: str) -> str | None:
    """The top-level ``kind`` of a YAML document, or None; the parsers report any error."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def kind_of(resource: Resource) -> ResourceKind[Any]:
    """The :class:`ResourceKind` of a parsed resource (by its ``kind`` field)."""
    return KINDS[resource.to_json()["kind"]]


def create_resource(cluster: Cluster, resource: Resource, *, force: bool = False) -> bool:
    """Store a resource of a listed kind; True when it replaced one (only with ``force``)."""
    kind = kind_of(resource)
    now = datetime.now(UTC)
    try:
        replaced = kind.store(cluster.storage).put(resource, now, overwrite=force)
    except AlreadyExists as exc:
        raise AlreadyExists(f"{exc.message}; use --force to replace it") from None
    event = f"admin.{kind.kind}.{'update' if replaced else 'create'}"
    audit.emit(cluster, event, resource=kind.audit_resource(resource.name), now=now)
    return replaced


def get_resource(cluster: Cluster, kind: ResourceKind[R], name: str) -> R:
    """The resource of ``kind`` called ``name``; NotFound when there is none."""
    found = kind.store(cluster.storage).get(name)
    if found is None:
        raise NotFound(f'{kind.title} "{name}" not found')
    return found


def list_resources(cluster: Cluster, kind: ResourceKind[R]) -> list[R]:
    """Every resource of ``kind``, by name."""
    return kind.store(cluster.storage).list_all()


def delete_resource(cluster: Cluster, kind: ResourceKind[Any], name: str) -> None:
    """Delete a resource of ``kind``; NotFound when there is none."""
    kind.store(cluster.storage).delete(name)
    audit.emit(cluster, f"admin.{kind.kind}.rm", resource=kind.audit_resource(name))


def add_lock(
    cluster: Cluster,
    *,
    bot: str | None = None,
    instance: str | None = None,
    message: str | None = None,
    ttl: timedelta | None = None,
    now: datetime | None = None,
) -> Lock:
    """Lock bot ``bot`` or bot instance ``instance`` (``BOT/ID``): exactly one of them.

    The lock holds until removed, or for ``ttl``. Raises BadParameter for a
    malformed target, message or TTL, NotFound when the target does not exist.
    """
    kind, target = _lock_target(bot, instance)
    text = DEFAULT_LOCK_MESSAGE if message is None else message.strip()
    if not text or not text.isprintable() or len(text) > MAX_LOCK_MESSAGE:
        raise BadParameter(
            f"the lock message must be one printable line of 1-{MAX_LOCK_MESSAGE} characters"
        )
    if ttl is not None and ttl < timedelta(seconds=1):
        raise BadParameter("lock TTL must be at least 1s")
    now = now or datetime.now(UTC)
    user = str(audit.admin_actor()["user"])
    lock = locks.new_lock(kind, target, text, created_by=user, now=now, ttl=ttl)
    cluster.storage.locks.add(lock)
    audit.emit(
        cluster, "admin.lock.add", resource=f"lock/{lock.id}", details=audit.lock_details(lock)
    )
    return lock


def list_locks(cluster: Cluster) -> list[Lock]:
    """Every stored lock, expired ones included, oldest first."""
    return cluster.storage.locks.list_all()


def remove_lock(cluster: Cluster, lock_id: str) -> Lock:
    """Remove lock ``lock_id`` (the ID column of ``auth locks ls``).

    Raises BadParameter for a malformed id, NotFound when there is no such lock.
    """
    try:
        canonical = str(uuid.UUID(lock_id.strip()))
    except ValueError:
        raise BadParameter(
            f"invalid lock id {lock_id[:80]!r}: use the ID column of tbot-py auth locks ls"
        ) from None
    removed = cluster.storage.locks.remove(canonical)
    audit.emit(
        cluster, "admin.lock.rm", resource=f"lock/{removed.id}", details=audit.lock_details(removed)
    )
    return removed


def admin_username(os_user: str) -> str:
    """The user an admin identity names: ``admin-<os user>``."""
    return f"admin-{os_user}"


def render_admin_identity(
    cas: ca.ClusterCAs, os_user: str, private_key: keys.PrivateKey, *, now: datetime
) -> bytes:
    """A tsh identity file for ``admin-<os_user>``, valid 12h, trusted by the admin API.

    Pure: the caller generates ``private_key`` and writes the result (0600).
    """
    certs = ca.issue_admin_identity(cas, admin_username(os_user), private_key.public_key(), now=now)
    return render_identity_file(
        private_key_pem=keys.private_key_pem(private_key),
        ssh_cert=certs.ssh,
        tls_cert_pem=certs.tls,
        ssh_ca_lines=[host_ca_line(cas.cluster_name, cas.host.ssh_public_key_line)],
        tls_ca_pems=list(cas.tls_ca_certs),
    )


def parse_resource_ref(text: str) -> tuple[str, str | None]:
    """``role/NAME`` as ``("role", NAME)``; ``roles`` (or ``role``) as ``("role", None)``.

    Likewise ``workload_identity/NAME`` and ``workload_identities``, ``token/NAME`` and
    ``tokens``, ``app/NAME`` and ``apps``, ``db/NAME`` and ``dbs``: the first element is
    the ``kind``.
    """
    kind, slash, name = text.partition("/")
    if (slash and not name) or kind not in (*_ROLE_KINDS, *KINDS):
        raise BadParameter(
            f"unsupported resource {text[:80]!r}: use role/NAME, roles, "
            "workload_identity/NAME, workload_identities, token/NAME, tokens, "
            "app/NAME, apps, db/NAME or dbs"
        )
    return ("role" if kind in _ROLE_KINDS else KINDS[kind].kind), name or None


def _lock_target(bot: str | None, instance: str | None) -> tuple[str, str]:
    """The kind and target of a lock on ``bot`` or on ``instance`` (``BOT/ID``)."""
    if bot is not None and instance is None:
        validate_bot_name(bot)
        return locks.KIND_BOT, bot
    if instance is None or bot is not None:
        raise BadParameter("give exactly one of --bot NAME and --instance BOT/ID")
    bot_name, slash, instance_id = instance.partition("/")
    if not slash or not _INSTANCE_ID_RE.match(instance_id):
        raise BadParameter(
            f"invalid instance {instance[:80]!r}: use BOT/ID with an ID from "
            "tbot-py auth bots instances ls BOT"
        )
    validate_bot_name(bot_name)
    return locks.KIND_BOT_INSTANCE, locks.instance_target(bot_name, instance_id)


def _emit_token_added(cluster: Cluster, token_hash: str, bot_name: str, expires: datetime) -> None:
    audit.emit(
        cluster,
        "admin.token.add",
        resource="token/" + audit.token_id(token_hash),
        details={"bot": bot_name, "expires": format_time(expires)},
    )


def _new_token(ttl: timedelta, now: datetime) -> tuple[str, datetime]:
    if ttl < timedelta(seconds=1):
        raise BadParameter("token TTL must be at least 1s")
    return secrets.token_hex(16), (now + ttl).replace(microsecond=0)
