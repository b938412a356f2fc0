"""``app`` and ``db`` resources, as in Teleport, and their tables in ``state.db``.

A certificate routed to an app (``route_to_app``) or a database
(``route_to_db_service``) is only issued for a resource stored here whose labels a
requested role allows (:func:`.rbac.check_app_access`, :func:`.rbac.check_db_access`)::

    kind: app
    version: v3
    metadata: {name: grafana, labels: {env: dev}}
    spec:
      uri: http://127.0.0.1:3000      # http(s)://, tcp://, mcp+stdio://, mcp+http(s)://
      public_addr: grafana.example.com
      rewrite: {headers: ["Authorization: Bearer {{internal.id_token}}"]}
      mcp: {command: python, args: [server.py]}   # only with mcp+stdio://

    kind: db
    version: v3
    metadata: {name: orders, labels: {env: dev}}
    spec: {protocol: postgres, uri: 127.0.0.1:5432}

``rewrite`` and ``mcp`` are kept as data for the services that serve apps; the auth
service only checks their shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationError, model_validator

from tbot_py.authservice import _sql
from tbot_py.authservice.resource_table import NamedMetadata, ResourceTable, StoredResource
from tbot_py.authservice.roles import NAME_RE, _Strict
from tbot_py.authservice.workload_identities import _check_labels
from tbot_py.config._checks import config_problem
from tbot_py.config.loader import _parse_yaml, config_error_from_validation

KIND_APP = "app"
KIND_DB = "db"
VERSION = "v3"
APP_SCHEMES = ("http", "https", "tcp", "mcp+stdio", "mcp+http", "mcp+https")
MCP_STDIO = "mcp+stdio"
DB_PROTOCOLS = ("postgres", "mysql", "mongodb", "cockroachdb", "redis", "sqlserver")

#: SQL of the v7 migration (:mod:`.storage`), one statement per table.
CREATE_APPS_TABLE = """CREATE TABLE apps (
        name       TEXT PRIMARY KEY,
        definition TEXT NOT NULL,     -- the App as JSON
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )"""
CREATE_DATABASES_TABLE = """CREATE TABLE databases (
        name       TEXT PRIMARY KEY,
        definition TEXT NOT NULL,     -- the Database as JSON
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )"""


def _name_check(title: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not NAME_RE.match(value):
            raise config_problem(
                f"invalid {title} name {value!r}: use 1-128 letters, digits and _ . @ : -"
            )
        return value

    return check


def _check_app_uri(value: str) -> str:
    # Messages name the scheme at most: a URI may carry a password, which is refused.
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme not in APP_SCHEMES:
        shown = f"scheme {scheme[:20]!r}" if scheme else "URI without a scheme"
        raise config_problem(
            f"unsupported app {shown}: use one of " + ", ".join(f"{s}://" for s in APP_SCHEMES)
        )
    if scheme != MCP_STDIO:
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            raise config_problem("invalid app URI: bad host or port") from None
        if "@" in parts.netloc:
            raise config_problem("an app URI must not carry a user or password")
        if not parts.hostname:
            raise config_problem("invalid app URI: it needs a host")
        if scheme == "tcp" and port is None:
            raise config_problem("invalid app URI: a tcp:// URI needs a port")
    return value


def _check_host_port(value: str) -> str:
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    valid_port = port.isascii() and port.isdigit() and 0 < int(port) < 65536
    if not colon or not host or not valid_port or any(c in host for c in "/ @?#"):
        # Not echoed: a mistaken DSN may carry a password.
        raise config_problem("invalid database URI: use host:port, without scheme or user")
    return value


def _check_protocol(value: str) -> str:
    if value not in DB_PROTOCOLS:
        raise config_problem(
            f"unsupported database protocol {value[:40]!r}: use one of {', '.join(DB_PROTOCOLS)}"
        )
    return value


def _check_header(value: str) -> str:
    name, colon, _ = value.partition(":")
    if not colon or not name.strip() or name != name.strip():
        # Not echoed: a header may hold a credential.
        raise config_problem("invalid header: use 'Name: value'")
    return value


class _Metadata(NamedMetadata):
    labels: Annotated[dict[str, str], AfterValidator(_check_labels)] = Field(default_factory=dict)
    description: str = ""


class AppMetadata(_Metadata):
    """``metadata`` of an app: its name, the labels roles select on, a description."""

    name: Annotated[str, AfterValidator(_name_check("app"))]


class DatabaseMetadata(_Metadata):
    """``metadata`` of a db: its name, the labels roles select on, a description."""

    name: Annotated[str, AfterValidator(_name_check("database"))]


class AppRewrite(_Strict):
    """``spec.rewrite``: headers the app service sets, kept as written."""

    headers: tuple[Annotated[str, AfterValidator(_check_header)], ...] = ()


class AppMCP(_Strict):
    """``spec.mcp``: how to start an ``mcp+stdio://`` server."""

    command: Annotated[str, Field(min_length=1)]
    args: tuple[str, ...] = ()
    run_as_host_user: str = ""


class AppSpec(_Strict):
    """``spec`` of an app."""

    uri: Annotated[str, AfterValidator(_check_app_uri)]
    public_addr: str = ""
    rewrite: AppRewrite | None = None
    mcp: AppMCP | None = None

    @model_validator(mode="after")
    def _mcp_goes_with_stdio(self) -> AppSpec:
        stdio = self.uri.lower().startswith(MCP_STDIO + "://")
        if stdio and self.mcp is None:
            raise config_problem(f"an {MCP_STDIO}:// app needs mcp.command")
        if not stdio and self.mcp is not None:
            raise config_problem(f"mcp is only for {MCP_STDIO}:// apps", ("mcp",))
        return self


class DatabaseSpec(_Strict):
    """``spec`` of a db."""

    protocol: Annotated[str, AfterValidator(_check_protocol)]
    uri: Annotated[str, AfterValidator(_check_host_port)]


class _Resource(StoredResource):
    """What apps and dbs share besides :class:`StoredResource`: labels."""

    VERSION: ClassVar[str] = VERSION
    version: str = VERSION
    metadata: _Metadata

    @property
    def labels(self) -> Mapping[str, str]:
        """``metadata.labels``."""
        return self.metadata.labels


class App(_Resource):
    """An app resource."""

    KIND: ClassVar[str] = KIND_APP
    kind: str = KIND_APP
    metadata: AppMetadata
    spec: AppSpec


class Database(_Resource):
    """A db resource."""

    KIND: ClassVar[str] = KIND_DB
    kind: str = KIND_DB
    metadata: DatabaseMetadata
    spec: DatabaseSpec


M = TypeVar("M", App, Database)


def _from_data(model: type[M], data: Any, source: str | None, lines: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        failure = config_error_from_validation(exc, data, source=source, lines=lines)
    raise failure  # outside ``except``: pydantic's error holds the input


def app_from_data(
    data: Any, *, source: str | None = None, lines: Mapping[Any, int] | None = None
) -> App:
    """Validate plain data into an App, or raise one ConfigError."""
    return _from_data(App, data, source, lines)


def database_from_data(
    data: Any, *, source: str | None = None, lines: Mapping[Any, int] | None = None
) -> Database:
    """Validate plain data into a Database, or raise one ConfigError."""
    return _from_data(Database, data, source, lines)


def parse_app_yaml(text: str, source: str = "<app>") -> App:
    """Read one app document; ``source`` names it in errors. Raises ConfigError."""
    data, lines = _parse_yaml(text, source)
    return app_from_data(data, source=source, lines=lines)


def parse_database_yaml(text: str, source: str = "<db>") -> Database:
    """Read one db document; ``source`` names it in errors. Raises ConfigError."""
    data, lines = _parse_yaml(text, source)
    return database_from_data(data, source=source, lines=lines)


def app_not_found(name: str) -> str:
    """The error for a route to an app that is not stored."""
    return f'app "{name}" not found; create it with tbot-py auth create -f app.yaml'


def database_not_found(name: str) -> str:
    """The error for a route to a database that is not stored."""
    return f'database "{name}" not found; create it with tbot-py auth create -f db.yaml'


class AppStore(ResourceTable[App]):
    """The apps table, used through ``Storage.apps``."""

    TABLE = "apps"
    TITLE = "app"
    HINT = "app.yaml"

    @classmethod
    def validate(cls, data: Any) -> App:
        return app_from_data(data)


class DatabaseStore(ResourceTable[Database]):
    """The databases table, used through ``Storage.databases``."""

    TABLE = "databases"
    TITLE = "database"
    HINT = "db.yaml"

    @classmethod
    def validate(cls, data: Any) -> Database:
        return database_from_data(data)


def get_app(conn: _sql.Connection, name: str) -> App | None:
    """The app called ``name``, or None, in a Storage transaction."""
    return AppStore.read(conn, name)


def get_database(conn: _sql.Connection, name: str) -> Database | None:
    """The database called ``name``, or None, in a Storage transaction."""
    return DatabaseStore.read(conn, name)
