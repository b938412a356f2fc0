"""One table per stored resource kind: rows of ``name`` and the resource as JSON.

``workload_identity``, ``token`` (OIDC join tokens), ``app`` and ``db`` resources are each
kept this way. A kind's store subclasses :class:`ResourceTable`, naming its table, how
messages call it, the file its re-create hint names, and how a row is validated back
into the model. A stored row that no longer validates is reported without quoting it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import yaml
from pydantic import field_validator

from tbot_py.authservice import _sql
from tbot_py.authservice.errors import AlreadyExists, AuthServiceError, NotFound
from tbot_py.authservice.roles import _Strict
from tbot_py.config._checks import config_problem
from tbot_py.errors import ConfigError


class NamedMetadata(_Strict):
    """What every stored resource's ``metadata`` has: its name."""

    name: str


class StoredResource(_Strict):
    """What the stored kinds' models share: kind and version checks, name, JSON and YAML.

    A subclass sets :attr:`KIND` and :attr:`VERSION`, the defaults of ``kind`` and
    ``version``, and its own ``metadata`` and ``spec``.
    """

    KIND: ClassVar[str]
    VERSION: ClassVar[str]
    kind: str
    version: str
    metadata: NamedMetadata

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, kind: str) -> str:
        if kind != cls.KIND:
            raise config_problem(f'unsupported kind "{kind[:64]}"; expected "{cls.KIND}"')
        return kind

    @field_validator("version")
    @classmethod
    def _check_version(cls, version: str) -> str:
        if version != cls.VERSION:
            raise config_problem(f'unsupported version "{version[:64]}"; use "{cls.VERSION}"')
        return version

    @property
    def name(self) -> str:
        """``metadata.name``."""
        return self.metadata.name

    def to_json(self) -> dict[str, Any]:
        """The resource as plain JSON data (unset optional parts left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        """The resource as YAML that its parser reads back."""
        return yaml.safe_dump(self.to_json(), sort_keys=False, allow_unicode=True)


class _Named(Protocol):
    @property
    def name(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


M = TypeVar("M", bound=_Named)


class ResourceTable(Generic[M]):
    """A resource table: ``name TEXT PRIMARY KEY, definition, created_at, updated_at``."""

    #: The SQL table.
    TABLE: ClassVar[str]
    #: How messages name one resource: ``workload identity``.
    TITLE: ClassVar[str]
    #: The file named in the hint for a damaged row: ``workload_identity.yaml``.
    HINT: ClassVar[str]

    def __init__(self, transaction: _sql.Transaction) -> None:
        self._transaction = transaction

    def put(self, resource: M, now: datetime, *, overwrite: bool = False) -> bool:
        """Store ``resource``; True when it replaced one. AlreadyExists unless ``overwrite``."""
        with self._transaction(write=True) as conn:
            exists = (
                conn.execute(
                    f"SELECT 1 FROM {self.TABLE} WHERE name = ?",  # noqa: S608
                    (resource.name,),
                ).fetchone()
                is not None
            )
            if exists and not overwrite:
                raise AlreadyExists(f'{self.TITLE} "{resource.name}" already exists')
            conn.execute(
                f"INSERT INTO {self.TABLE} (name, definition, created_at, updated_at) "  # noqa: S608
                "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "definition = excluded.definition, updated_at = excluded.updated_at",
                (resource.name, json.dumps(resource.to_json()), _sql.ts(now), _sql.ts(now)),
            )
        return exists

    def get(self, name: str) -> M | None:
        """The resource called ``name``, or None."""
        with self._transaction() as conn:
            return self.read(conn, name)

    def list_all(self) -> list[M]:
        """Every resource, by name."""
        with self._transaction() as conn:
            return self.read_all(conn)

    def delete(self, name: str) -> None:
        """Delete ``name``; NotFound when there is none."""
        with self._transaction(write=True) as conn:
            deleted = conn.execute(
                f"DELETE FROM {self.TABLE} WHERE name = ?",  # noqa: S608
                (name,),
            )
            if deleted.rowcount != 1:
                raise NotFound(f'{self.TITLE} "{name}" not found')

    @classmethod
    def read(cls, conn: _sql.Connection, name: str) -> M | None:
        """The resource called ``name``, or None, in a Storage transaction."""
        row = conn.execute(
            f"SELECT definition FROM {cls.TABLE} WHERE name = ?",  # noqa: S608
            (name,),
        ).fetchone()
        return None if row is None else cls._from_json(name, str(row[0]))

    @classmethod
    def read_all(cls, conn: _sql.Connection) -> list[M]:
        """Every resource, by name, in a Storage transaction."""
        rows = conn.execute(
            f"SELECT name, definition FROM {cls.TABLE} ORDER BY name"  # noqa: S608
        ).fetchall()
        return [cls._from_json(str(name), str(text)) for name, text in rows]

    @classmethod
    def validate(cls, data: Any) -> M:
        """Plain data back into the model; raises ConfigError."""
        raise NotImplementedError

    @classmethod
    def _from_json(cls, name: str, text: str) -> M:
        try:
            return cls.validate(json.loads(text))
        except (ValueError, ConfigError):
            pass
        # Not chained: the error would quote the stored definition.
        raise AuthServiceError(
            f'stored {cls.TITLE} "{name}" is damaged; replace it with '
            f"tbot-py auth create -f {cls.HINT} --force"
        )
