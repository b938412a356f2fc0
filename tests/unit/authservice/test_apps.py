"""App and db resources: files, storage, the CLI, and RBAC on certificates routed to them."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509 import ObjectIdentifier

from tbot_py.authservice import admin, audit
from tbot_py.authservice.apps import app_from_data, parse_app_yaml, parse_database_yaml
from tbot_py.authservice.errors import AlreadyExists, AuthServiceError, NotFound
from tbot_py.authservice.roles import RoleConditions, new_role
from tbot_py.authservice.storage import Storage
from tbot_py.client import wire
from tbot_py.errors import ConfigError

from .conftest import AuthClient, Issued
from .test_cli import assert_one_error_line, run

GRAFANA_YAML = """\
kind: app
version: v3
metadata:
  name: grafana
  labels: {env: dev}
  description: Dashboards
spec:
  uri: http://127.0.0.1:3000
  public_addr: grafana.example.com
  rewrite:
    headers: ['Authorization: Bearer {{internal.id_token}}']
"""

MCP_YAML = """\
kind: app
version: v3
metadata: {name: files-mcp, labels: {env: dev}}
spec:
  uri: mcp+stdio://
  mcp: {command: python, args: [server.py], run_as_host_user: nobody}
"""

ORDERS_YAML = """\
kind: db
version: v3
metadata:
  name: orders
  labels: {env: dev}
spec:
  protocol: postgres
  uri: 127.0.0.1:5432
"""


# -- files ---------------------------------------------------------------------------------------


def test_an_app_file_is_read_and_its_yaml_reads_back_unchanged() -> None:
    app = parse_app_yaml(GRAFANA_YAML, "app.yaml")
    assert (app.name, dict(app.labels), app.spec.uri) == (
        "grafana",
        {"env": "dev"},
        "http://127.0.0.1:3000",
    )
    assert app.spec.rewrite is not None
    assert app.spec.rewrite.headers == ("Authorization: Bearer {{internal.id_token}}",)
    assert app.spec.mcp is None
    assert parse_app_yaml(app.to_yaml()) == app
    assert app_from_data(app.to_json()) == app
    assert "mcp" not in app.to_json()["spec"]


def test_an_mcp_stdio_app_keeps_its_command() -> None:
    app = parse_app_yaml(MCP_YAML)
    assert app.spec.mcp is not None
    assert (app.spec.mcp.command, app.spec.mcp.args) == ("python", ("server.py",))
    assert parse_app_yaml(app.to_yaml()) == app


@pytest.mark.parametrize(
    "uri",
    ["https://grafana.internal", "tcp://10.0.0.1:22", "mcp+http://h:8080/mcp", "mcp+https://h"],
)
def test_every_supported_app_scheme_is_accepted(uri: str) -> None:
    assert parse_app_yaml(GRAFANA_YAML.replace("http://127.0.0.1:3000", uri)).spec.uri == uri


def test_a_db_file_is_read_and_its_yaml_reads_back_unchanged() -> None:
    db = parse_database_yaml(ORDERS_YAML, "db.yaml")
    assert (db.name, dict(db.labels), db.spec.protocol, db.spec.uri) == (
        "orders",
        {"env": "dev"},
        "postgres",
        "127.0.0.1:5432",
    )
    assert parse_database_yaml(db.to_yaml()) == db
    ipv6 = parse_database_yaml(ORDERS_YAML.replace("127.0.0.1:5432", "'[::1]:5432'"))
    assert ipv6.spec.uri == "[::1]:5432"


def _app(old: str, new: str) -> str:
    assert GRAFANA_YAML.count(old) == 1, old
    return GRAFANA_YAML.replace(old, new)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (_app("http://127.0.0.1:3000", "ftp://host"),
         "app.yaml:8: spec.uri: unsupported app scheme 'ftp': use one of http://, https://, "
         "tcp://, mcp+stdio://, mcp+http://, mcp+https://"),
        (_app("http://127.0.0.1:3000", "127.0.0.1:3000"),
         "app.yaml:8: spec.uri: unsupported app URI without a scheme: use one of http://"),
        (_app("http://127.0.0.1:3000", "http://"),
         "app.yaml:8: spec.uri: invalid app URI: it needs a host"),
        (_app("http://127.0.0.1:3000", "https://admin:s3cret@grafana"),
         "app.yaml:8: spec.uri: an app URI must not carry a user or password"),
        (_app("http://127.0.0.1:3000", "http://h:99999"),
         "app.yaml:8: spec.uri: invalid app URI: bad host or port"),
        (_app("http://127.0.0.1:3000", "tcp://host"),
         "app.yaml:8: spec.uri: invalid app URI: a tcp:// URI needs a port"),
        (_app("http://127.0.0.1:3000", "mcp+stdio://"),
         "app.yaml:7: spec: an mcp+stdio:// app needs mcp.command"),
        (_app("  public_addr", "  mcp: {command: python}\n  public_addr"),
         "app.yaml:9: spec.mcp: mcp is only for mcp+stdio:// apps"),
        (_app("  public_addr", "  mcp: {args: [x]}\n  public_addr").replace(
            "http://127.0.0.1:3000", "mcp+stdio://"),
         'app.yaml:9: spec.mcp: missing required key "command"'),
        (_app("'Authorization: Bearer {{internal.id_token}}'", "'Authorization s3cret'"),
         "app.yaml:11: spec.rewrite.headers[0]: invalid header: use 'Name: value'"),
        (_app("name: grafana", "name: 'two words'"),
         "app.yaml:4: metadata.name: invalid app name 'two words': "
         "use 1-128 letters, digits and _ . @ : -"),
        (_app("{env: dev}", "{'bad key!': dev}"),
         "app.yaml:5: metadata.labels: invalid label name 'bad key!'"),
        (_app("kind: app", "kind: db"),
         'app.yaml:1: kind: unsupported kind "db"; expected "app"'),
        (_app("version: v3", "version: v2"),
         'app.yaml:2: version: unsupported version "v2"; use "v3"'),
        (_app("  uri:", "  url:"),
         'app.yaml:8: spec.url: unknown key "url"; did you mean "uri"?'),
    ],
)  # fmt: skip
def test_app_errors_name_file_line_and_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_app_yaml(text, "app.yaml")
    assert str(err.value).startswith(error), str(err.value)
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("protocol: postgres", "protocol: oracle",
         "db.yaml:7: spec.protocol: unsupported database protocol 'oracle': use one of "
         "postgres, mysql, mongodb, cockroachdb, redis, sqlserver"),
        ("127.0.0.1:5432", "postgres://u:s3cret@127.0.0.1:5432",
         "db.yaml:8: spec.uri: invalid database URI: use host:port, without scheme or user"),
        ("127.0.0.1:5432", "127.0.0.1", "db.yaml:8: spec.uri: invalid database URI"),
        ("127.0.0.1:5432", "h:0", "db.yaml:8: spec.uri: invalid database URI"),
        ("  protocol: postgres\n", "", 'db.yaml:6: spec: missing required key "protocol"'),
        ("name: orders", "name: 'a/b'", "db.yaml:4: metadata.name: invalid database name 'a/b'"),
    ],
)  # fmt: skip
def test_db_errors_name_file_line_and_key(old: str, new: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_database_yaml(ORDERS_YAML.replace(old, new), "db.yaml")
    assert str(err.value).startswith(error), str(err.value)
    assert "s3cret" not in str(err.value)


# -- storage -------------------------------------------------------------------------------------


def test_apps_and_dbs_are_stored_listed_replaced_only_with_overwrite_and_deleted(
    tmp_path: Path,
) -> None:
    storage = Storage.open(tmp_path / "state.db")
    grafana, orders = parse_app_yaml(GRAFANA_YAML), parse_database_yaml(ORDERS_YAML)
    now = datetime.now(UTC)
    assert storage.apps.put(grafana, now) is False
    assert storage.databases.put(orders, now) is False
    with pytest.raises(AlreadyExists, match='app "grafana" already exists'):
        storage.apps.put(grafana, now)
    assert storage.apps.put(parse_app_yaml(MCP_YAML), now) is False
    assert [a.name for a in storage.apps.list_all()] == ["files-mcp", "grafana"]
    assert storage.apps.get("grafana") == grafana
    assert storage.databases.get("orders") == orders
    assert storage.apps.get("orders") is None  # apps and dbs are separate
    assert storage.databases.put(orders, now, overwrite=True) is True
    storage.databases.delete("orders")
    with pytest.raises(NotFound, match='database "orders" not found'):
        storage.databases.delete("orders")
    assert storage.databases.list_all() == []


def test_a_damaged_stored_app_is_one_clear_error_that_does_not_quote_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    storage = Storage.open(path)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO apps VALUES ('x', '{\"secret\": 1}', '', '')")
    conn.close()
    with pytest.raises(AuthServiceError) as err:
        storage.apps.get("x")
    assert str(err.value) == (
        'stored app "x" is damaged; replace it with tbot-py auth create -f app.yaml --force'
    )


# -- CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names", "table"),
    [
        (GRAFANA_YAML, ("app", "apps", "app"),
         ("NAME URI LABELS", "grafana http://127.0.0.1:3000 env=dev")),
        (ORDERS_YAML, ("db", "dbs", "database"),
         ("NAME PROTOCOL URI LABELS", "orders postgres 127.0.0.1:5432 env=dev")),
    ],
)  # fmt: skip
def test_cli_creates_gets_and_removes_apps_and_dbs(
    tmp_path: Path, text: str, names: tuple[str, str, str], table: tuple[str, str]
) -> None:
    kind, plural, title = names
    data_dir, path = tmp_path / "auth", tmp_path / f"{kind}.yaml"
    path.write_text(text)
    name = table[1].split()[0]
    created = run("create", "-f", path, "--data-dir", data_dir)
    assert created.stdout == f'{title} "{name}" has been created\n', created.output
    assert_one_error_line(
        run("create", "-f", path, "--data-dir", data_dir), "already exists; use --force"
    )
    shown = run("get", f"{kind}/{name}", "--data-dir", data_dir).stdout
    parse = parse_app_yaml if kind == "app" else parse_database_yaml
    assert parse(shown) == parse(text)
    listed = run("get", plural, "--data-dir", data_dir).stdout.splitlines()
    assert [line.split() for line in listed] == [line.split() for line in table]
    assert run("rm", f"{kind}/{name}", "--data-dir", data_dir).exit_code == 0
    assert_one_error_line(
        run("get", f"{kind}/{name}", "--data-dir", data_dir), f'{title} "{name}" not found'
    )


def test_cli_create_with_a_bad_app_file_is_one_located_line(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(_app("http://127.0.0.1:3000", "ftp://host"))
    assert_one_error_line(
        run("create", "-f", path, "--data-dir", tmp_path / "auth"),
        f"{path}:8: spec.uri: unsupported app scheme 'ftp'",
    )


# -- certificates routed to apps and databases --------------------------------------------------


def _resources(client: AuthClient) -> None:
    cluster = client.cluster
    for text in (GRAFANA_YAML, _app("{env: dev}", "{env: prod}").replace("grafana", "billing")):
        admin.create_resource(cluster, parse_app_yaml(text))
    for text in (ORDERS_YAML, ORDERS_YAML.replace("dev", "prod").replace("orders", "ledger")):
        admin.create_resource(cluster, parse_database_yaml(text))


ROUTES = new_role(
    "routes",
    allow=RoleConditions.model_validate(
        {
            "app_labels": {"env": "dev"},
            "db_labels": {"env": "dev"},
            "db_users": ["reader", "app_*"],
            "db_names": ["orders", "^test_[a-z]+$"],
        }
    ),
    deny=RoleConditions(db_users=("app_admin",)),
)


@pytest.fixture
def router(client: AuthClient) -> Issued:
    """Bot "router" with roles routes and auditor (which allows nothing), joined."""
    _resources(client)
    admin.create_role(client.cluster, ROUTES)
    created = admin.add_bot(client.cluster, "router", roles=("routes", "auditor"), logins=())
    return client.join(created.token.token)


def _issue(client: AuthClient, bot: Issued, **fields: Any) -> tuple[int, Any]:
    resp, key = client.impersonate(bot, **fields)
    if resp.status_code != 200:
        return resp.status_code, wire.error_message(resp.json())
    return 200, client.save(key, wire.Certs.from_json(resp.json()))


def _last_issue_event(client: AuthClient) -> dict[str, Any]:
    lines = audit.audit_log_path(client.cluster.data_dir).read_text().splitlines()
    events = [json.loads(line) for line in lines]
    issued: dict[str, Any] = [e for e in events if e["event"] == "bot.issue"][-1]
    return issued


def test_a_cert_routed_to_an_allowed_app_carries_the_route_and_is_audited(
    client: AuthClient, router: Issued
) -> None:
    status, issued = _issue(client, router, route_to_app="grafana")
    assert status == 200, issued
    assert issued.identity.route_to_app == "grafana"
    (app_name,) = issued.cert.subject.get_attributes_for_oid(ObjectIdentifier("1.3.9999.1.10"))
    assert app_name.value == "grafana"
    event = _last_issue_event(client)
    assert (event["success"], event["details"]["route"]) == (True, "app/grafana")


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"route_to_app": "ghost"}, 404,
         'app "ghost" not found; create it with tbot-py auth create -f app.yaml'),
        ({"route_to_app": "billing"}, 403,
         'bot "router" may not access app "billing": no role allows app "billing"'),
        # Only the requested roles count: auditor allows nothing.
        ({"route_to_app": "grafana", "role_requests": ("auditor",)}, 403,
         'bot "router" may not access app "grafana": no role allows app "grafana"'),
        ({"route_to_db_service": "ghost"}, 404,
         'database "ghost" not found; create it with tbot-py auth create -f db.yaml'),
        ({"route_to_db_service": "ledger", "route_to_db_user": "reader"}, 403,
         'bot "router" may not access database "ledger": no role allows database "ledger"'),
        ({"route_to_db_service": "orders", "route_to_db_user": "writer"}, 403,
         'bot "router" may not access database "orders": '
         'no role allows db_user "writer" on database "orders"'),
        ({"route_to_db_service": "orders", "route_to_db_user": "reader",
          "route_to_db_name": "test_1"}, 403,
         'bot "router" may not access database "orders": '
         'no role allows db_user "reader" and db_name "test_1" on database "orders"'),
        # Deny wins over the allowing glob app_*.
        ({"route_to_db_service": "orders", "route_to_db_user": "app_admin"}, 403,
         'bot "router" may not access database "orders": '
         'denied by role "routes": db_users app_admin'),
    ],
)  # fmt: skip
def test_a_routed_cert_is_refused_for_a_missing_or_unallowed_target(
    client: AuthClient, router: Issued, fields: dict[str, Any], status: int, message: str
) -> None:
    assert _issue(client, router, **fields) == (status, message)
    event = _last_issue_event(client)
    target = fields.get("route_to_app") or fields["route_to_db_service"]
    kind = "app" if "route_to_app" in fields else "db"
    assert (event["success"], event["code"], event["message"]) == (False, status, message)
    assert event["details"]["route"] == f"{kind}/{target}"


@pytest.mark.parametrize(
    ("user", "name"),
    [("reader", "orders"), ("app_web", "test_abc"), ("reader", ""), ("", "orders"), ("", "")],
)
def test_a_cert_routed_to_an_allowed_database_carries_service_user_and_name(
    client: AuthClient, router: Issued, user: str, name: str
) -> None:
    status, issued = _issue(
        client,
        router,
        route_to_db_service="orders",
        route_to_db_user=user,
        route_to_db_name=name,
    )
    assert status == 200, issued
    identity = issued.identity
    assert (identity.db_service, identity.db_user, identity.db_name) == ("orders", user, name)
    assert identity.route_to_app == ""
    assert _last_issue_event(client)["details"]["route"] == "db/orders"


def test_an_unrouted_cert_has_no_route_in_the_audit_line(
    client: AuthClient, router: Issued
) -> None:
    status, issued = _issue(client, router, role_requests=("auditor",))
    assert status == 200, issued
    assert "route" not in _last_issue_event(client)["details"]


def test_the_preset_access_role_reaches_every_app_and_database(client: AuthClient) -> None:
    _resources(client)
    created = admin.add_bot(client.cluster, "everything", roles=("access",), logins=())
    bot = client.join(created.token.token)
    assert _issue(client, bot, route_to_app="billing")[0] == 200
    routed = {"route_to_db_service": "ledger", "route_to_db_user": "root"}
    assert _issue(client, bot, **routed, route_to_db_name="x")[0] == 200
