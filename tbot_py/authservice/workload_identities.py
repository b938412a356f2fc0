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

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field, ValidationError

from tbot_py.authservice import _sql, rbac
from tbot_py.authservice.errors import AccessDenied, NotFound
from tbot_py.authservice.resource_table import NamedMetadata, ResourceTable, StoredResource
from tbot_py.authservice.roles import NAME_RE, Role, _Strict
from tbot_py.authservice.workload import spiffe_path_problem
from tbot_py.config._checks import config_problem
from tbot_py.config.loader import _parse_yaml, config_error_from_validation

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


class WorkloadIdentityMetadata(NamedMetadata):
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


class WorkloadIdentity(StoredResource):
    """A workload_identity resource."""

    KIND: ClassVar[str] = KIND_WORKLOAD_IDENTITY
    VERSION: ClassVar[str] = VERSION
    kind: str = KIND_WORKLOAD_IDENTITY
    version: str = VERSION
    metadata: WorkloadIdentityMetadata
    spec: WorkloadIdentitySpec

    @property
    def labels(self) -> Mapping[str, str]:
        """``metadata.labels``."""
        return self.metadata.labels

    def spiffe_path(self, bot_name: str) -> str:
        """``spec.spiffe.id`` with ``{{user.bot_name}}`` replaced by ``bot_name``."""
        return _TEMPLATE_RE.sub(bot_name, self.spec.spiffe.id)


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


class WorkloadIdentityStore(ResourceTable[WorkloadIdentity]):
    """The workload_identities table, used through ``Storage.workload_identities``."""

    TABLE = "workload_identities"
    TITLE = "workload identity"
    HINT = "workload_identity.yaml"

    @classmethod
    def validate(cls, data: Any) -> WorkloadIdentity:
        return workload_identity_from_data(data)


def list_workload_identities(conn: _sql.Connection) -> list[WorkloadIdentity]:
    """Every stored workload identity, by name, in a Storage transaction."""
    return WorkloadIdentityStore.read_all(conn)


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
