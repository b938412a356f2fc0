"""The ``application`` and ``database`` outputs end to end, against the app and db registry.

A real ``auth start`` process; the role and the ``app`` / ``db`` resources created with
``tbot-py auth create -f``; ``tbot-py start application|database ... --oneshot`` (and
``configure ... -o FILE`` then ``start -c FILE``) writing tbot's artifact names. ``openssl``
verifies the routed certificate against the user CA and pairs it with its key; the subject
carries Teleport's RouteToApp / RouteToDatabase. A route the bot's roles do not allow (labels,
database user or name), or to a resource that does not exist, is one ``ERROR:`` line and
leaves the destination as it was.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tbot_py.config.loader import load_config_text
from tbot_py.identity.tlsid import TLSIdentity
from tests.expected import artifact_names
from tests.integration.conftest import (
    AuthService,
    clean_env,
    error_lines,
    run_tbot,
    snapshot,
)

ROLE = """\
kind: role
version: v7
metadata: {name: appdb-dev}
spec:
  allow:
    app_labels: {env: dev}
    db_labels: {env: dev}
    db_users: [alice]
    db_names: [sales]
"""
RESOURCES = {
    "role.yaml": ROLE,
    "grafana.yaml": """\
kind: app
version: v3
metadata: {name: grafana, labels: {env: dev}, description: "dashboards"}
spec:
  uri: http://127.0.0.1:3000
""",
    "billing.yaml": """\
kind: app
version: v3
metadata: {name: billing, labels: {env: prod}}
spec:
  uri: https://127.0.0.1:8443
""",
    "orders.yaml": """\
kind: db
version: v3
metadata: {name: orders, labels: {env: dev}}
spec:
  protocol: postgres
  uri: 127.0.0.1:5432
""",
    "ledger.yaml": """\
kind: db
version: v3
metadata: {name: ledger, labels: {env: prod}}
spec:
  protocol: mongodb
  uri: 127.0.0.1:27017
""",
}
ROLE_NAME = "appdb-dev"

CA_FILES = {"teleport-host-ca.crt", "teleport-user-ca.crt", "teleport-database-ca.crt"}
#: tbot.md §2.3 / §4: the application output, with specific_tls_extensions.
APP_FILES = {"tlscert", "key", *CA_FILES, "tls.crt", "tls.key", "tls.cas"}
#: tbot.md §2.3: the database output's default artifacts, and what each format adds.
DB_FILES = {"tlscert", "key", "teleport-database-ca.crt"}
DB_FORMAT_FILES = {
    "": DB_FILES,
    "tls": DB_FILES | {"tls.crt", "tls.key", "tls.cas"},
    "mongo": DB_FILES | {"mongo.crt", "mongo.cas"},
}
_BOTS = itertools.count(1)


def _openssl(*argv: str) -> str:
    done = subprocess.run(["openssl", *argv], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"openssl {argv}: {done.stderr}"
    return done.stdout


def _verifies(ca_file: Path, cert: Path) -> bool:
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_file), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode == 0 and done.stdout.strip() == f"{cert}: OK"


def _subject(cert: Path) -> TLSIdentity:
    return TLSIdentity.from_subject(x509.load_pem_x509_certificate(cert.read_bytes()).subject)


def _check_pair(cert: Path, key: Path) -> None:
    """``key`` is the private key of ``cert``."""
    assert _openssl("pkey", "-in", str(key), "-pubout") == _openssl(
        "x509", "-in", str(cert), "-noout", "-pubkey"
    )


@pytest.fixture(scope="module")
def registry(auth: AuthService, tmp_path_factory: pytest.TempPathFactory) -> AuthService:
    """The module's auth service with the role, two apps and two databases."""
    folder = tmp_path_factory.mktemp("registry")
    for name, text in RESOURCES.items():
        (folder / name).write_text(text)
        done = run_tbot(
            "auth", "create", "-f", str(folder / name), "--data-dir", str(auth.data_dir)
        )
        assert done.returncode == 0, f"{name}: {done.stderr}"
    return auth


def _new_bot(auth: AuthService, prefix: str) -> tuple[str, str]:
    bot = f"{prefix}-{next(_BOTS)}"
    return bot, auth.add_bot(bot, roles=ROLE_NAME)


def _start(
    auth: AuthService, kind: str, base: Path, *flags: str, token: str = ""
) -> subprocess.CompletedProcess[str]:
    """``tbot-py start KIND --oneshot`` into ``base/out`` with storage ``base/storage``."""
    env = clean_env(TELEPORT_BOT_TOKEN=token) if token else clean_env()
    done = run_tbot(
        "start", kind,
        "--proxy-server", auth.addr,
        "--ca-pin", auth.ca_pin,
        "--storage", str(base / "storage"),
        "--destination", str(base / "out"),
        "--oneshot",
        *flags,
        env=env,
    )  # fmt: skip
    if token:
        assert token not in done.stdout + done.stderr
    return done


def _issue_events(auth: AuthService, bot: str) -> list[dict[str, object]]:
    shown = run_tbot("auth", "audit", "--data-dir", str(auth.data_dir), "--format", "json")
    assert shown.returncode == 0, shown.stderr
    events = [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
    return [
        e
        for e in events
        if e["event"] == "bot.issue"
        and isinstance(e["actor"], dict)
        and e["actor"].get("bot") == bot
    ]


def _check_app_output(out: Path, bot: str) -> None:
    assert artifact_names(out) == APP_FILES
    assert _verifies(out / "teleport-user-ca.crt", out / "tlscert")
    assert not _verifies(out / "teleport-host-ca.crt", out / "tlscert")
    identity = _subject(out / "tlscert")
    assert identity.username == f"bot-{bot}"
    assert identity.groups == (ROLE_NAME,)
    assert identity.route_to_app == "grafana"
    assert (identity.db_service, identity.db_user, identity.db_name) == ("", "", "")
    _check_pair(out / "tlscert", out / "key")
    assert (out / "tls.crt").read_bytes() == (out / "tlscert").read_bytes()
    assert (out / "tls.key").read_bytes() == (out / "key").read_bytes()
    _check_pair(out / "tls.crt", out / "tls.key")
    assert (out / "tls.cas").read_bytes() == (out / "teleport-host-ca.crt").read_bytes()


def _check_db_output(out: Path, storage: Path, bot: str, fmt: str) -> None:
    assert artifact_names(out) == DB_FORMAT_FILES[fmt]
    # The routed certificate is a user certificate: the bot's stored TLS CAs (user, host)
    # verify it, the database CA does not (that one is for the database's own side).
    assert _verifies(storage / "tlscacerts", out / "tlscert")
    assert not _verifies(out / "teleport-database-ca.crt", out / "tlscert")
    identity = _subject(out / "tlscert")
    assert identity.username == f"bot-{bot}"
    assert identity.groups == (ROLE_NAME,)
    assert (identity.db_service, identity.db_user, identity.db_name) == ("orders", "alice", "sales")
    assert identity.route_to_app == ""
    _check_pair(out / "tlscert", out / "key")
    cert, key = (out / "tlscert").read_bytes(), (out / "key").read_bytes()
    if fmt == "tls":
        assert (out / "tls.crt").read_bytes() == cert
        assert (out / "tls.key").read_bytes() == key
        assert not _verifies(out / "tls.cas", out / "tlscert")  # the host CA, for the proxy
    if fmt == "mongo":
        assert (out / "mongo.crt").read_bytes() == cert + key
        _check_pair(out / "mongo.crt", out / "mongo.crt")
        assert (out / "mongo.cas").read_bytes() == (out / "teleport-database-ca.crt").read_bytes()


def test_registry_lists_the_apps_and_databases(registry: AuthService) -> None:
    data_dir = str(registry.data_dir)
    for listing, names in (("apps", ("grafana", "billing")), ("dbs", ("orders", "ledger"))):
        done = run_tbot("auth", "get", listing, "--data-dir", data_dir)
        assert done.returncode == 0, done.stderr
        for name in names:
            assert name in done.stdout
    done = run_tbot("auth", "get", "app/grafana", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    assert "http://127.0.0.1:3000" in done.stdout and "env: dev" in done.stdout
    done = run_tbot("auth", "get", "db/orders", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    assert "postgres" in done.stdout and "127.0.0.1:5432" in done.stdout


def test_application_output_with_specific_tls_extensions(
    registry: AuthService, tmp_path: Path, need_tools: None
) -> None:
    bot, token = _new_bot(registry, "app")
    done = _start(
        registry, "application", tmp_path, "--app", "grafana", "--specific-tls-extensions",
        token=token,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert error_lines(done.stderr) == []
    _check_app_output(tmp_path / "out", bot)
    [issued] = [e for e in _issue_events(registry, bot) if e["success"]]
    assert isinstance(issued["details"], dict)
    assert issued["details"].get("route") == "app/grafana"

    # A second run renews the bot identity from storage and writes a fresh key.
    first_key = (tmp_path / "out" / "key").read_bytes()
    again = _start(registry, "application", tmp_path, "--app", "grafana",
                   "--specific-tls-extensions")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "out" / "key").read_bytes() != first_key
    _check_app_output(tmp_path / "out", bot)


@pytest.mark.parametrize("fmt", ["", "tls", "mongo"])
def test_database_output_per_format(
    registry: AuthService, tmp_path: Path, need_tools: None, fmt: str
) -> None:
    bot, token = _new_bot(registry, "db")
    flags = ["--service", "orders", "--username", "alice", "--database", "sales"]
    if fmt:
        flags += ["--format", fmt]
    done = _start(registry, "database", tmp_path, *flags, token=token)
    assert done.returncode == 0, done.stderr
    assert error_lines(done.stderr) == []
    _check_db_output(tmp_path / "out", tmp_path / "storage", bot, fmt)
    [issued] = [e for e in _issue_events(registry, bot) if e["success"]]
    assert isinstance(issued["details"], dict)
    assert issued["details"].get("route") == "db/orders"


REFUSALS = [
    pytest.param("application", ["--app", "nosuch"], 'app "nosuch" not found', id="app-not-found"),
    pytest.param(
        "application",
        ["--app", "billing"],
        'may not access app "billing"',
        id="app-labels-not-allowed",
    ),
    pytest.param(
        "database",
        ["--service", "nosuch", "--username", "alice"],
        '"nosuch" not found',
        id="db-not-found",
    ),
    pytest.param(
        "database",
        ["--service", "ledger", "--username", "alice", "--database", "sales"],
        'may not access database "ledger"',
        id="db-labels-not-allowed",
    ),
    pytest.param(
        "database",
        ["--service", "orders", "--username", "bob", "--database", "sales"],
        'may not access database "orders"',
        id="db-user-not-allowed",
    ),
    pytest.param(
        "database",
        ["--service", "orders", "--username", "alice", "--database", "payroll"],
        'may not access database "orders"',
        id="db-name-not-allowed",
    ),
]


@pytest.mark.parametrize(("kind", "flags", "message"), REFUSALS)
def test_a_route_the_roles_do_not_allow_is_one_error_and_writes_nothing(
    registry: AuthService, tmp_path: Path, kind: str, flags: list[str], message: str
) -> None:
    bot, token = _new_bot(registry, "refused")
    done = _start(registry, kind, tmp_path, *flags, token=token)
    assert done.returncode != 0, done.stderr
    code = 404 if "not found" in message else 403
    [line] = error_lines(done.stderr)
    assert line.startswith(f"ERROR: output {kind}-1: "), line
    assert f"HTTP {code}: " in line and message in line, line
    assert code == 404 or f'bot "{bot}" may not access ' in line, line
    assert "Traceback" not in done.stderr
    assert snapshot(tmp_path / "out") == {}
    [refused] = [e for e in _issue_events(registry, bot) if not e["success"]]
    assert refused["code"] == code
    assert isinstance(refused["details"], dict)
    route = "app/" + flags[1] if kind == "application" else "db/" + flags[1]
    assert refused["details"].get("route") == route


NO_ROOT = """\
kind: role
version: v7
metadata: {name: no-root}
spec:
  deny:
    db_users: [root, "admin*"]
"""


def test_deny_wins_over_the_access_preset(
    registry: AuthService, tmp_path: Path, need_tools: None
) -> None:
    (tmp_path / "no-root.yaml").write_text(NO_ROOT)
    created = run_tbot(
        "auth", "create", "-f", str(tmp_path / "no-root.yaml"),
        "--data-dir", str(registry.data_dir),
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    bot = f"deny-{next(_BOTS)}"
    token = registry.add_bot(bot, roles="access,no-root")
    # The access preset allows every database, user and name ...
    done = _start(
        registry, "database", tmp_path,
        "--service", "ledger", "--username", "alice", "--database", "anything",
        token=token,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    identity = _subject(tmp_path / "out" / "tlscert")
    assert (identity.db_service, identity.db_user, identity.db_name) == (
        "ledger",
        "alice",
        "anything",
    )
    before = snapshot(tmp_path / "out")
    # ... but a deny rule of any requested role wins.
    for user in ("root", "admin2"):
        refused = _start(registry, "database", tmp_path, "--service", "ledger", "--username", user)
        assert refused.returncode != 0
        [line] = error_lines(refused.stderr)
        assert f'HTTP 403: bot "{bot}" may not access database "ledger"' in line, line
        assert snapshot(tmp_path / "out") == before


def test_a_refused_route_leaves_earlier_artifacts_untouched(
    registry: AuthService, tmp_path: Path, need_tools: None
) -> None:
    bot, token = _new_bot(registry, "keep")
    done = _start(registry, "application", tmp_path, "--app", "grafana",
                  "--specific-tls-extensions", token=token)  # fmt: skip
    assert done.returncode == 0, done.stderr
    before = snapshot(tmp_path / "out")
    refused = _start(registry, "application", tmp_path, "--app", "billing",
                     "--specific-tls-extensions")  # fmt: skip
    assert refused.returncode != 0
    [line] = error_lines(refused.stderr)
    assert f'bot "{bot}" may not access app "billing"' in line, line
    assert snapshot(tmp_path / "out") == before
    _check_app_output(tmp_path / "out", bot)


def _configure(auth: AuthService, kind: str, base: Path, *flags: str) -> Path:
    config = base / "tbot.yaml"
    done = run_tbot(
        "configure", kind,
        "--proxy-server", auth.addr,
        "--ca-pin", auth.ca_pin,
        "--storage", str(base / "storage"),
        "--destination", str(base / "out"),
        "--oneshot",
        *flags,
        "-o", str(config),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return config


def test_configure_application_then_start_from_the_file(
    registry: AuthService, tmp_path: Path, need_tools: None
) -> None:
    bot, token = _new_bot(registry, "cfg-app")
    config = _configure(
        registry, "application", tmp_path, "--app", "grafana", "--specific-tls-extensions"
    )
    loaded = load_config_text(config.read_text(), str(config))
    assert loaded.oneshot is True
    [service] = loaded.services
    assert service.type == "application"
    assert service.model_dump(include={"app_name", "specific_tls_extensions"}) == {
        "app_name": "grafana",
        "specific_tls_extensions": True,
    }
    done = run_tbot("start", "-c", str(config), env=clean_env(TELEPORT_BOT_TOKEN=token))
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout + done.stderr
    _check_app_output(tmp_path / "out", bot)


@pytest.mark.parametrize("fmt", ["tls", "mongo"])
def test_configure_database_then_start_from_the_file(
    registry: AuthService, tmp_path: Path, need_tools: None, fmt: str
) -> None:
    bot, token = _new_bot(registry, "cfg-db")
    config = _configure(
        registry, "database", tmp_path,
        "--service", "orders", "--username", "alice", "--database", "sales", "--format", fmt,
    )  # fmt: skip
    loaded = load_config_text(config.read_text(), str(config))
    [service] = loaded.services
    assert service.type == "database"
    assert service.model_dump(include={"service", "username", "database", "format"}) == {
        "service": "orders",
        "username": "alice",
        "database": "sales",
        "format": fmt,
    }
    done = run_tbot("start", "-c", str(config), env=clean_env(TELEPORT_BOT_TOKEN=token))
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout + done.stderr
    _check_db_output(tmp_path / "out", tmp_path / "storage", bot, fmt)


def test_database_output_cockroach_format_writes_a_published_subdirectory(
    registry: AuthService, tmp_path: Path, need_tools: None
) -> None:
    bot, token = _new_bot(registry, "cockroach")
    done = _start(
        registry, "database", tmp_path,
        "--service", "orders", "--username", "alice", "--database", "sales",
        "--format", "cockroach",
        token=token,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert error_lines(done.stderr) == []
    out = tmp_path / "out"
    assert artifact_names(out) == DB_FILES | {"cockroach"}
    # One top-level link into the published version, like every flat name.
    link = out / "cockroach"
    assert link.is_symlink() and str(link.readlink()) == "..data/cockroach"
    version = out / (out / "..data").readlink()
    assert (version / "cockroach").is_dir() and not (version / "cockroach").is_symlink()
    node = out / "cockroach"
    assert {p.name for p in node.iterdir()} == {"node.crt", "node.key", "ca.crt"}
    # node.crt: the routed user certificate, verified by the bot's CAs; node.key pairs with it.
    assert _verifies(tmp_path / "storage" / "tlscacerts", node / "node.crt")
    # Exactly one of the bot's stored CAs (user, host) issued it: the user CA.
    stored = x509.load_pem_x509_certificates((tmp_path / "storage" / "tlscacerts").read_bytes())
    issuers = []
    for index, ca in enumerate(stored):
        single = tmp_path / f"ca-{index}.pem"
        single.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        if _verifies(single, node / "node.crt"):
            issuers.append(single)
    [user_ca] = issuers
    assert user_ca.read_bytes() != (node / "ca.crt").read_bytes()
    assert not _verifies(node / "ca.crt", node / "node.crt")
    assert (node / "node.crt").read_bytes() == (out / "tlscert").read_bytes()
    _check_pair(node / "node.crt", node / "node.key")
    identity = _subject(node / "node.crt")
    assert identity.username == f"bot-{bot}"
    assert (identity.db_service, identity.db_user, identity.db_name) == ("orders", "alice", "sales")
    # ca.crt: the database CA (tbot's writeCockroachDatabaseFiles), not the host CA.
    assert (node / "ca.crt").read_bytes() == (out / "teleport-database-ca.crt").read_bytes()
