"""``workload_identity`` resources, as in Teleport, and their table in ``state.db``.

A resource names a SPIFFE ID path; a bot whose roles allow the resource's labels
(``workload_identity_labels``, :func:`.rbac.check_workload_identity_access`) may get
X.509 and JWT SVIDs for ``spiffe://<cluster><path>``::

    kind: workload_identity
    version: v1
    metadata:
      name: payments-api
      labels: {team: payments, env: prod}
    spec:
      spiffe:
        id: /svc/payments/{{user.bot_name}}

Templating: only ``{{user.bot_name}}`` (the requesting bot's name) is expanded; any
other ``{{...}}`` is refused when the file is read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator

from tbot_py.authservice import _sql, rbac
from tbot_py.authservice.errors import AccessDenied, AlreadyExists, AuthServiceError, NotFound
from tbot_py.authservice.roles import NAME_RE, Role, _Strict
from tbot_py.authservice.workload import spiffe_path_problem
from tbot_py.config._checks import config_problem
from tbot_py.config.loader import _parse_yaml, config_error_from_validation
from tbot_py.errors import ConfigError

KIND_WORKLOAD_IDENTITY = "workload_identity"
VERSION = "v1"
#: The one template a SPIFFE ID path may hold.
BOT_NAME_TEMPLATE = "{{user.bot_name}}"
_TEMPLATE_RE = re.compile(r"\{\{\s*user\.bot_name\s*\}\}")
# Label keys and values as Teleport allows them, minus the exotic characters.
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9/._:*-]{1,63}$")

#: SQL of the v5 migration (:mod:`.storage`).
CREATE_TABLE = """CREATE TABLE workload_identities (
        name       TEXT PRIMARY KEY,
        definition TEXT NOT NULL,     -- the WorkloadIdentity as JSON
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )"""


def _check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise config_problem(
            f"invalid workload identity name {value!r}: use 1-128 letters, digits and _ . @ : -"
        )
    return value


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key in labels:
        if not _LABEL_KEY_RE.match(key):
            raise config_problem(f"invalid label name {key!r}: use letters, digits and / . _ : -")
    return labels


def _check_spiffe_path(value: str) -> str:
    if "{{" in _TEMPLATE_RE.sub("", value):
        raise config_problem(
            f"unsupported template in {value!r}; only {BOT_NAME_TEMPLATE} is supported"
        )
    # Check the path as it would look for a bot named "bot".
    problem = spiffe_path_problem(_TEMPLATE_RE.sub("bot", value))
    if problem:
        raise config_problem(problem)
    return value


class WorkloadIdentityMetadata(_Strict):
    """``metadata``: the name, labels that roles select on, and a description."""

    name: Annotated[str, AfterValidator(_check_name)]
    labels: Annotated[dict[str, str], AfterValidator(_check_labels)] = Field(default_factory=dict)
    description: str = ""


class SPIFFESpec(_Strict):
    """``spec.spiffe``: the SPIFFE ID path (``/svc/foo``) within the cluster's trust domain."""

    id: Annotated[str, AfterValidator(_check_spiffe_path)]


class WorkloadIdentitySpec(_Strict):
    """``spec``."""

    spiffe: SPIFFESpec


class WorkloadIdentity(_Strict):
    """A workload_identity resource."""

    kind: str = KIND_WORKLOAD_IDENTITY
    version: str = VERSION
    metadata: WorkloadIdentityMetadata
    spec: WorkloadIdentitySpec

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, kind: str) -> str:
        if kind != KIND_WORKLOAD_IDENTITY:
            raise config_problem(f'unsupported kind "{kind}"; expected "{KIND_WORKLOAD_IDENTITY}"')
        return kind

    @field_validator("version")
    @classmethod
    def _check_version(cls, version: str) -> str:
        if version != VERSION:
            raise config_problem(f'unsupported version "{version}"; use "{VERSION}"')
        return version

    @property
    def name(self) -> str:
        """``metadata.name``."""
        return self.metadata.name

    @property
    def labels(self) -> Mapping[str, str]:
        """``metadata.labels``."""
        return self.metadata.labels

    def spiffe_path(self, bot_name: str) -> str:
        """``spec.spiffe.id`` with ``{{user.bot_name}}`` replaced by ``bot_name``."""
        return _TEMPLATE_RE.sub(bot_name, self.spec.spiffe.id)

    def to_yaml(self) -> str:
        """The resource as YAML that :func:`parse_workload_identity_yaml` reads back."""
        return yaml.safe_dump(self.to_json(), sort_keys=False, allow_unicode=True)

    def to_json(self) -> dict[str, Any]:
        """The resource as plain JSON data."""
        return self.model_dump(mode="json")


def parse_workload_identity_yaml(
    text: str, source: str = "<workload_identity>"
) -> WorkloadIdentity:
    """Read one workload_identity document; ``source`` names it in errors. Raises ConfigError."""
    data, lines = _parse_yaml(text, source)
    return workload_identity_from_data(data, source=source, lines=lines)


def workload_identity_from_data(
    data: Any, *, source: str | None = None, lines: Mapping[Any, int] | None = None
) -> WorkloadIdentity:
    """Validate plain data into a WorkloadIdentity, or raise one ConfigError."""
    try:
        return WorkloadIdentity.model_validate(data)
    except ValidationError as exc:
        failure = config_error_from_validation(exc, data, source=source, lines=lines)
    raise failure  # outside ``except``: pydantic's error holds the input


def workload_identity_not_found(name: str) -> str:
    """The error for a name that is not a stored workload identity."""
    return (
        f'workload identity "{name}" not found; '
        "create it with tbot-py auth create -f workload_identity.yaml"
    )


def list_workload_identities(conn: _sql.Connection) -> list[WorkloadIdentity]:
    """Every stored workload identity, by name, in a Storage transaction."""
    rows = conn.execute("SELECT name, definition FROM workload_identities ORDER BY name").fetchall()
    return [_from_json(str(name), str(text)) for name, text in rows]


class WorkloadIdentityStore:
    """The workload_identities table, used through ``Storage.workload_identities``."""

    def __init__(self, transaction: _sql.Transaction) -> None:
        self._transaction = transaction

    def put(self, resource: WorkloadIdentity, now: datetime, *, overwrite: bool = False) -> bool:
        """Store ``resource``; True when it replaced one. AlreadyExists unless ``overwrite``."""
        with self._transaction(write=True) as conn:
            exists = (
                conn.execute(
                    "SELECT 1 FROM workload_identities WHERE name = ?", (resource.name,)
                ).fetchone()
                is not None
            )
            if exists and not overwrite:
                raise AlreadyExists(f'workload identity "{resource.name}" already exists')
            conn.execute(
                "INSERT INTO workload_identities (name, definition, created_at, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "definition = excluded.definition, updated_at = excluded.updated_at",
                (resource.name, resource.model_dump_json(), _sql.ts(now), _sql.ts(now)),
            )
        return exists

    def get(self, name: str) -> WorkloadIdentity | None:
        """The workload identity called ``name``, or None."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT definition FROM workload_identities WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else _from_json(name, str(row[0]))

    def list_all(self) -> list[WorkloadIdentity]:
        """Every workload identity, by name."""
        with self._transaction() as conn:
            return list_workload_identities(conn)

    def delete(self, name: str) -> None:
        """Delete ``name``; NotFound when there is none."""
        with self._transaction(write=True) as conn:
            deleted = conn.execute("DELETE FROM workload_identities WHERE name = ?", (name,))
            if deleted.rowcount != 1:
                raise NotFound(f'workload identity "{name}" not found')


def choose_workload_identity(
    available: Sequence[WorkloadIdentity],
    roles: Sequence[Role],
    *,
    bot_name: str,
    name: str = "",
    labels: Mapping[str, str] | None = None,
) -> WorkloadIdentity:
    """The resource a bot with ``roles`` asked for, by ``name`` or by exact ``labels``.

    By name: NotFound when there is none, AccessDenied when no role allows it. By
    labels: among the resources carrying every one of ``labels`` that a role allows,
    the first by name; AccessDenied when there is none.
    """
    if name:
        found = next((r for r in available if r.name == name), None)
        if found is None:
            raise NotFound(workload_identity_not_found(name))
        decision = rbac.check_workload_identity_access(roles, found.name, found.labels)
        if not decision.allowed:
            raise AccessDenied(
                f'bot "{bot_name}" may not use workload identity "{name}": {decision.reason}'
            )
        return found
    wanted = dict(labels or {})
    for resource in sorted(available, key=lambda r: r.name):
        carries = all(resource.labels.get(key) == value for key, value in wanted.items())
        if (
            carries
            and rbac.check_workload_identity_access(roles, resource.name, resource.labels).allowed
        ):
            return resource
    shown = ", ".join(f"{key}={value}" for key, value in sorted(wanted.items()))
    raise AccessDenied(
        f'no workload identity with labels {shown[:200]} is allowed for bot "{bot_name}"'
    )


def _from_json(name: str, text: str) -> WorkloadIdentity:
    try:
        return workload_identity_from_data(json.loads(text))
    except (ValueError, ConfigError):
        pass
    # Not chained: the error would quote the stored definition.
    raise AuthServiceError(
        f'stored workload identity "{name}" is damaged; replace it with '
        "tbot-py auth create -f workload_identity.yaml --force"
    )
