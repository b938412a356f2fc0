"""The stored resource kinds that share one shape: YAML in, a table of JSON rows, CRUD.

``workload_identity``, ``token`` (the OIDC join tokens), ``app`` and ``db`` are each a
pydantic model with a ``name``, a YAML parser and a store with
``put``/``get``/``list_all``/``delete``.
:mod:`.admin`, :mod:`.admin_api` and ``tbot-py auth create|get|rm`` handle every kind
listed here the same way, through its :class:`ResourceKind`. Roles are not listed: a
role in use by a bot can not be removed, and they have their own commands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from tbot_py.authservice import apps, join_tokens, workload_identities
from tbot_py.authservice.apps import App, Database
from tbot_py.authservice.join_tokens import JoinToken
from tbot_py.authservice.workload_identities import WorkloadIdentity

if TYPE_CHECKING:
    from tbot_py.authservice.storage import Storage


class Resource(Protocol):
    """What every listed kind's model offers."""

    @property
    def name(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...

    def to_yaml(self) -> str: ...


R = TypeVar("R", bound=Resource)


class ResourceStore(Protocol[R]):
    """What every listed kind's store offers (see ``workload_identities.WorkloadIdentityStore``)."""

    def put(self, resource: R, now: datetime, *, overwrite: bool = False) -> bool: ...

    def get(self, name: str) -> R | None: ...

    def list_all(self) -> list[R]: ...

    def delete(self, name: str) -> None: ...


@dataclass(frozen=True)
class ResourceKind(Generic[R]):
    """One stored resource kind: its names, parsers, store and listing columns."""

    #: ``kind:`` in YAML and the ``KIND/NAME`` reference.
    kind: str
    #: The plural reference: ``get workload_identities``.
    plural: str
    #: Under ``/v1/admin/`` (``tokens`` there are the secret join tokens).
    api_path: str
    #: How messages name one (``workload identity``).
    title: str
    parse_yaml: Callable[[str, str], R]
    from_data: Callable[[Any], R]
    store: Callable[[Storage], ResourceStore[R]]
    #: The ``get PLURAL`` table: its header and one row per resource.
    columns: tuple[str, ...]
    row: Callable[[R], tuple[str, ...]]

    def audit_resource(self, name: str) -> str:
        """How the audit log names one: ``KIND/NAME``."""
        return f"{self.kind}/{name}"


def _labels(labels: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _workload_identity_row(resource: WorkloadIdentity) -> tuple[str, ...]:
    return resource.name, resource.spec.spiffe.id, _labels(resource.labels)


def _join_token_row(resource: JoinToken) -> tuple[str, ...]:
    expires = "never" if resource.expires is None else f"{resource.expires:%Y-%m-%d %H:%M:%S}Z"
    return resource.name, resource.join_method, resource.bot_name, expires


def _app_row(resource: App) -> tuple[str, ...]:
    return resource.name, resource.spec.uri, _labels(resource.labels)


def _database_row(resource: Database) -> tuple[str, ...]:
    return resource.name, resource.spec.protocol, resource.spec.uri, _labels(resource.labels)


WORKLOAD_IDENTITY: ResourceKind[WorkloadIdentity] = ResourceKind(
    kind=workload_identities.KIND_WORKLOAD_IDENTITY,
    plural="workload_identities",
    api_path="workload_identities",
    title="workload identity",
    parse_yaml=workload_identities.parse_workload_identity_yaml,
    from_data=workload_identities.workload_identity_from_data,
    store=lambda storage: storage.workload_identities,
    columns=("NAME", "SPIFFE ID PATH", "LABELS"),
    row=_workload_identity_row,
)

JOIN_TOKEN: ResourceKind[JoinToken] = ResourceKind(
    kind=join_tokens.KIND_TOKEN,
    plural="tokens",
    api_path="join_tokens",
    title="join token",
    parse_yaml=join_tokens.parse_join_token_yaml,
    from_data=join_tokens.join_token_from_data,
    store=lambda storage: storage.join_tokens,
    columns=("NAME", "JOIN METHOD", "BOT", "EXPIRES"),
    row=_join_token_row,
)

APP: ResourceKind[App] = ResourceKind(
    kind=apps.KIND_APP,
    plural="apps",
    api_path="apps",
    title="app",
    parse_yaml=apps.parse_app_yaml,
    from_data=apps.app_from_data,
    store=lambda storage: storage.apps,
    columns=("NAME", "URI", "LABELS"),
    row=_app_row,
)

DATABASE: ResourceKind[Database] = ResourceKind(
    kind=apps.KIND_DB,
    plural="dbs",
    api_path="dbs",
    title="database",
    parse_yaml=apps.parse_database_yaml,
    from_data=apps.database_from_data,
    store=lambda storage: storage.databases,
    columns=("NAME", "PROTOCOL", "URI", "LABELS"),
    row=_database_row,
)

ALL_KINDS: tuple[ResourceKind[Any], ...] = (WORKLOAD_IDENTITY, JOIN_TOKEN, APP, DATABASE)
#: Every listed kind, by ``kind`` and by plural.
KINDS: dict[str, ResourceKind[Any]] = {
    name: kind for kind in ALL_KINDS for name in (kind.kind, kind.plural)
}
