"""Role resources in ``state.db``: one row per role, its definition stored as JSON.

A bot may only reference roles that exist (:func:`require_roles`, called in the
transaction that creates or changes the bot), and a role a bot uses cannot be
deleted; both are checked in the transaction that makes the change.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime

from tbot_py.authservice import _sql
from tbot_py.authservice.errors import AlreadyExists, AuthServiceError, BadParameter, NotFound
from tbot_py.authservice.roles import PRESET_ROLES, Role, role_from_data
from tbot_py.errors import ConfigError

#: How many distinct role definitions :func:`_parse_role` keeps validated.
ROLE_CACHE_SIZE = 256


def role_not_found(name: str) -> str:
    """The error for a bot naming a role that does not exist."""
    return f'role "{name}" not found; create it with tbot-py auth create -f role.yaml'


def seed_preset_roles(conn: _sql.Connection) -> None:
    """Insert the preset roles (access, editor, auditor); a step of the v3 migration."""
    now = _sql.ts(datetime.now(UTC))
    for role in PRESET_ROLES:
        conn.execute(
            "INSERT INTO roles (name, definition, created_at, updated_at) VALUES (?, ?, ?, ?)",
            (role.name, role.model_dump_json(), now, now),
        )


def grant_presets_databases(conn: _sql.Connection) -> None:
    """Give the stored access and editor presets their db rules; a step of the v7 migration.

    Only a preset whose spec is still the one seeded before v7 is changed; a preset
    an admin edited, or removed, is left as it is.
    """
    presets = {role.name: role for role in PRESET_ROLES}
    now = _sql.ts(datetime.now(UTC))
    for name, stored in get_roles(conn, tuple(presets)).items():
        preset = presets[name]
        without_db = preset.spec.allow.model_copy(
            update={"db_labels": {}, "db_names": (), "db_users": ()}
        )
        if without_db == preset.spec.allow or stored.spec != preset.spec.model_copy(
            update={"allow": without_db}
        ):
            continue
        upgraded = stored.model_copy(update={"spec": preset.spec})
        conn.execute(
            "UPDATE roles SET definition = ?, updated_at = ? WHERE name = ?",
            (upgraded.model_dump_json(), now, name),
        )


def require_roles(conn: _sql.Connection, names: tuple[str, ...]) -> None:
    """Raise NotFound for the first of ``names`` that is not a stored role."""
    if not names:
        return
    rows = conn.execute(
        f"SELECT name FROM roles WHERE name IN ({_sql.placeholders(names)})",  # noqa: S608
        names,
    ).fetchall()
    found = {str(row[0]) for row in rows}
    for name in names:
        if name not in found:
            raise NotFound(role_not_found(name))


def get_roles(conn: _sql.Connection, names: tuple[str, ...]) -> dict[str, Role]:
    """The stored roles among ``names``, by name, in a Storage transaction."""
    if not names:
        return {}
    rows = conn.execute(
        f"SELECT name, definition FROM roles WHERE name IN ({_sql.placeholders(names)})",  # noqa: S608
        names,
    ).fetchall()
    return {str(name): _role_from_json(str(name), str(text)) for name, text in rows}


class RoleStore:
    """The roles table, used through ``Storage.roles``."""

    def __init__(self, transaction: _sql.Transaction) -> None:
        self._transaction = transaction

    def put(self, role: Role, now: datetime, *, overwrite: bool = False) -> bool:
        """Store ``role``; True when it replaced one of the same name.

        Raises AlreadyExists when the role exists and ``overwrite`` is False.
        """
        with self._transaction(write=True) as conn:
            exists = (
                conn.execute("SELECT 1 FROM roles WHERE name = ?", (role.name,)).fetchone()
                is not None
            )
            if exists and not overwrite:
                raise AlreadyExists(f'role "{role.name}" already exists')
            conn.execute(
                "INSERT INTO roles (name, definition, created_at, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, "
                "updated_at = excluded.updated_at",
                (role.name, role.model_dump_json(), _sql.ts(now), _sql.ts(now)),
            )
        return exists

    def get(self, name: str) -> Role | None:
        """The role called ``name``, or None."""
        return self.get_many((name,)).get(name)

    def get_many(self, names: tuple[str, ...]) -> dict[str, Role]:
        """The roles among ``names`` that exist, by name."""
        with self._transaction() as conn:
            return get_roles(conn, names)

    def list_all(self) -> list[Role]:
        """Every role, by name."""
        with self._transaction() as conn:
            rows = conn.execute("SELECT name, definition FROM roles ORDER BY name").fetchall()
        return [_role_from_json(str(name), str(text)) for name, text in rows]

    def delete(self, name: str) -> None:
        """Delete role ``name``.

        Raises NotFound when there is none and BadParameter when a bot still uses it.
        """
        with self._transaction(write=True) as conn:
            users = [
                str(bot)
                for bot, roles in conn.execute("SELECT name, roles FROM bots ORDER BY name")
                if name in json.loads(str(roles))
            ]
            if users:
                raise BadParameter(
                    f'role "{name}" is still used by bot{"s" if len(users) > 1 else ""} '
                    f"{', '.join(users)}; first take it away with "
                    f"tbot-py auth bots update BOT --remove-roles {name}"
                )
            if conn.execute("DELETE FROM roles WHERE name = ?", (name,)).rowcount != 1:
                raise NotFound(f'role "{name}" not found')


def _role_from_json(name: str, text: str) -> Role:
    try:
        return _parse_role(text)
    except (ValueError, ConfigError):
        pass
    # Not chained: the error would quote the stored definition.
    raise AuthServiceError(
        f'stored role "{name}" is damaged; replace it with tbot-py auth create -f role.yaml --force'
    )


@functools.lru_cache(maxsize=ROLE_CACHE_SIZE)
def _parse_role(text: str) -> Role:
    """A stored definition, validated once per distinct text.

    Every request reads its roles' definitions afresh, so a changed role is in force
    at once; only the validation of an unchanged text, the costly part, is cached.
    Sharing one Role between requests is safe: roles are frozen and nothing changes
    them in place.
    """
    return role_from_data(json.loads(text))
