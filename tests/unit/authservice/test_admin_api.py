"""The remote admin API (/v1/admin/) and the admin CLI with --auth-server -i."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tbot_py.authservice import admin, ca
from tbot_py.authservice.errors import AccessDenied
from tbot_py.authservice.mtls import check_admin_certificate, check_bot_certificate
from tbot_py.authservice.resource_kinds import KINDS
from tbot_py.authservice.server import RunningAuthService
from tbot_py.client import wire
from tbot_py.identity import keys
from tbot_py.identity.identityfile import parse_identity_file
from tbot_py.identity.tlsid import TLSIdentity

from .conftest import AuthClient, Issued
from .test_audit import audit_events
from .test_cli import assert_one_error_line, run

ROLE_YAML = """kind: role
version: v7
metadata:
  name: deploy
spec:
  allow:
    logins: [deployer]
"""


def admin_identity_bytes(client: AuthClient, user: str = "alice") -> bytes:
    key = keys.generate_private_key()
    return admin.render_admin_identity(client.cluster.cas, user, key, now=datetime.now(UTC))


@pytest.fixture
def admin_id(client: AuthClient) -> Issued:
    parsed = parse_identity_file(admin_identity_bytes(client))
    key = keys.load_private_key_pem(parsed.private_key_pem)
    return client.save(key, wire.Certs(ssh=parsed.ssh_cert, tls=parsed.tls_cert_pem))


@pytest.fixture
def identity_file(client: AuthClient, tmp_path: Path) -> Path:
    path = tmp_path / "admin-identity"
    path.write_bytes(admin_identity_bytes(client))
    return path


def remote_actor(user: str = "admin-alice") -> dict[str, str]:
    return {"admin": "remote", "user": user}


# -- the admin certificate ------------------------------------------------------------------


def test_admin_identity_is_a_12h_non_renewable_non_bot_admin_certificate(
    client: AuthClient,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    parsed = parse_identity_file(
        admin.render_admin_identity(
            client.cluster.cas, "alice", keys.generate_private_key(), now=now
        )
    )
    cert = x509.load_pem_x509_certificate(parsed.tls_cert_pem)
    cert.verify_directly_issued_by(client.cluster.cas.user.cert)
    identity = TLSIdentity.from_subject(cert.subject)
    assert identity.username == "admin-alice"
    assert identity.groups == (ca.ADMIN_GROUP,)
    assert not identity.renewable and not identity.bot_name and not identity.bot_instance_id
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= timedelta(hours=12)
    assert cert.not_valid_after_utc == now + timedelta(hours=12)
    assert parsed.tls_ca_pems == client.cluster.cas.tls_ca_certs
    der = cert.public_bytes(serialization.Encoding.DER)
    assert check_admin_certificate(der, client.cluster.cas, now).username == "admin-alice"
    with pytest.raises(AccessDenied):
        check_bot_certificate(der, client.cluster.cas, now)
    with pytest.raises(AccessDenied, match="expired"):
        check_admin_certificate(der, client.cluster.cas, now + timedelta(hours=12))


# -- who may call it ------------------------------------------------------------------------


def test_admin_api_accepts_the_admin_certificate(client: AuthClient, admin_id: Issued) -> None:
    resp = client.request("GET", "/v1/admin/bots", identity=admin_id)
    assert resp.status_code == 200, resp.text
    assert resp.json() == []


def test_admin_api_refuses_a_bot_certificate(client: AuthClient, joined: Issued) -> None:
    resp = client.request("GET", "/v1/admin/bots", identity=joined)
    assert resp.status_code == 403
    assert "bot certificates can not call the admin API" in wire.error_message(resp.json())
    resp = client.request("POST", "/v1/admin/tokens", identity=joined, json={"bot": "ci"})
    assert resp.status_code == 403


def test_admin_api_refuses_a_request_without_a_certificate(client: AuthClient) -> None:
    for method, path in [("GET", "bots"), ("DELETE", "bots/ci"), ("GET", "locks")]:
        resp = client.request(method, f"/v1/admin/{path}")
        assert resp.status_code == 403, path
        assert wire.error_message(resp.json()) == "client certificate required"


# -- each endpoint does its job, audited as the remote admin ----------------------------------


def call(client: AuthClient, ident: Issued, method: str, path: str, body: Any = None) -> Any:
    resp = client.request(method, f"/v1/admin/{path}", identity=ident, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_admin_api_bots_tokens_locks_and_roles_are_audited_as_remote(
    client: AuthClient, admin_id: Issued
) -> None:
    data_dir = client.cluster.data_dir
    created = call(client, admin_id, "POST", "bots", {"name": "ci", "roles": ["access"]})
    assert created["bot_name"] == "ci" and len(created["token"]) == 32
    assert [b["bot_name"] for b in call(client, admin_id, "GET", "bots")] == ["ci"]
    token = call(client, admin_id, "POST", "tokens", {"bot": "ci", "ttl": "30m"})
    assert token["bot_name"] == "ci"
    tokens = call(client, admin_id, "GET", "tokens")
    assert len(tokens) == 2
    removed = call(client, admin_id, "DELETE", f"tokens/{tokens[0]['id']}")
    assert removed == {"id": tokens[0]["id"], "bot_name": "ci"}
    assert len(call(client, admin_id, "GET", "tokens")) == 1
    client.join(created["token"])  # tokens[0], expiring first, was the 30m one
    instances = call(client, admin_id, "GET", "bots/ci/instances")
    assert [(i["bot_name"], i["generation"]) for i in instances] == [("ci", 1)]
    updated = call(client, admin_id, "PATCH", "bots/ci", {"add_roles": ["editor"]})
    assert updated == {"bot_name": "ci", "roles": ["access", "editor"], "logins": []}
    updated = call(client, admin_id, "PATCH", "bots/ci", {"remove_roles": ["editor"]})
    assert updated["roles"] == ["access"]
    lock = call(client, admin_id, "POST", "locks", {"bot": "ci", "message": "stop"})
    assert lock["created_by"] == "admin-alice" and lock["target"] == "ci"
    assert [d["id"] for d in call(client, admin_id, "GET", "locks")] == [lock["id"]]
    assert call(client, admin_id, "DELETE", f"locks/{lock['id']}")["id"] == lock["id"]
    assert call(client, admin_id, "POST", "roles", {"yaml": ROLE_YAML}) == {
        "name": "deploy",
        "replaced": False,
    }
    got = call(client, admin_id, "GET", "roles/deploy")
    assert got["role"]["metadata"]["name"] == "deploy" and "deployer" in got["yaml"]
    listed = call(client, admin_id, "GET", "roles")
    assert [r["metadata"]["name"] for r in listed] == ["access", "auditor", "deploy", "editor"]
    call(client, admin_id, "DELETE", "roles/deploy")
    call(client, admin_id, "DELETE", "bots/ci")
    assert call(client, admin_id, "GET", "bots") == []

    expected = [
        "admin.bot.add",
        "admin.token.add",
        "admin.token.add",
        "admin.token.rm",
        "admin.bot.update",
        "admin.bot.update",
        "admin.lock.add",
        "admin.lock.rm",
        "admin.role.create",
        "admin.role.rm",
        "admin.bot.rm",
    ]
    changes = [e for e in audit_events(data_dir) if e["event"].startswith("admin.")]
    assert [e["event"] for e in changes] == expected
    assert all(e["actor"] == remote_actor() for e in changes)


def test_admin_api_errors_have_the_usual_shape_and_status(
    client: AuthClient, admin_id: Issued
) -> None:
    cases: list[tuple[str, str, Any, int]] = [
        ("DELETE", "bots/nope", None, 404),
        ("POST", "bots", {"name": "ci"}, 400),
        ("POST", "bots", {"name": "Bad Name", "roles": ["access"]}, 400),
        ("POST", "tokens", {"bot": "nope"}, 404),
        ("DELETE", "locks/not-a-uuid", None, 400),
        ("POST", "roles", {"yaml": "kind: [unclosed"}, 400),
        ("GET", "roles/nope", None, 404),
        ("PATCH", "bots/nope", {"add_roles": ["access"]}, 404),
        ("PATCH", "bots/nope", {"add_roles": "access"}, 400),
        ("GET", "bots/nope/instances", None, 404),
        ("DELETE", "tokens/not-hex", None, 400),
        ("DELETE", "tokens/abcdef", None, 404),
    ]
    for method, path, body, status in cases:
        resp = client.request(method, f"/v1/admin/{path}", identity=admin_id, json=body)
        assert resp.status_code == status, (path, resp.text)
        assert isinstance(wire.error_message(resp.json()), str)
    call(client, admin_id, "POST", "bots", {"name": "ci", "roles": ["access"]})
    resp = client.request(
        "POST", "/v1/admin/bots", identity=admin_id, json={"name": "ci", "roles": ["access"]}
    )
    assert resp.status_code == 409


# -- the CLI with --auth-server -i -----------------------------------------------------------


def remote_args(client: AuthClient, identity_file: Path) -> list[str]:
    return ["--auth-server", client.service.addr, "-i", str(identity_file)]


def out(*args: str | Path) -> str:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_remote_cli_output_matches_local_mode(
    client: AuthClient, identity_file: Path, tmp_path: Path
) -> None:
    remote = remote_args(client, identity_file)
    local = ["--data-dir", str(client.cluster.data_dir)]
    added = json.loads(out("bots", "add", "ci", "--roles", "access", "--format", "json", *remote))
    assert added["bot_name"] == "ci" and added["roles"] == ["access"]
    text = out("bots", "add", "web", "--roles", "access", "--logins", "www", *remote)
    assert f"--ca-pin={client.cluster.ca_pin}" in text
    out("tokens", "add", "--bot", "ci", *remote)
    out("locks", "add", "--bot", "web", "--message", "hold", *remote)
    for listing in (["bots", "ls"], ["tokens", "ls"], ["locks", "ls"]):
        for fmt in ("text", "json"):
            assert out(*listing, "--format", fmt, *remote) == out(*listing, "--format", fmt, *local)

    client.join(added["token"])
    for listing in (["bots", "instances", "ls", "ci"], ["bots", "instances", "ls", "web"]):
        for fmt in ("text", "json"):
            assert out(*listing, "--format", fmt, *remote) == out(*listing, "--format", fmt, *local)

    # The same change, made remotely and then locally, prints the same.
    for fmt in ("text", "json"):
        grant = ("bots", "update", "ci", "--add-roles", "editor", "--format", fmt)
        revoke = ("bots", "update", "ci", "--remove-roles", "editor", "--format", fmt)
        granted = out(*grant, *remote)
        assert "editor" in granted
        revoked = out(*revoke, *remote)
        assert out(*grant, *local) == granted and out(*revoke, *local) == revoked

    tokens = json.loads(out("tokens", "ls", "--format", "json", *local))
    assert len(tokens) == 2  # the join spent ci's first token
    for token, where in zip(tokens, (remote, local), strict=True):
        assert out("tokens", "rm", token["id"][:6].upper(), *where) == (
            f'Token {token["id"]} of bot "{token["bot_name"]}" removed.\n'
        )
    assert json.loads(out("tokens", "ls", "--format", "json", *local)) == []

    lock_id = json.loads(out("locks", "ls", "--format", "json", *local))[0]["id"]
    assert "removed" in out("locks", "rm", lock_id, *remote)
    role_file = tmp_path / "deploy.yaml"
    role_file.write_text(ROLE_YAML)
    assert out("create", "-f", role_file, *remote) == 'role "deploy" has been created\n'
    assert out("get", "role/deploy", *remote) == out("get", "role/deploy", *local)
    assert out("get", "role/deploy", "--format", "json", *remote) == out(
        "get", "role/deploy", "--format", "json", *local
    )
    for fmt in ("text", "yaml", "json"):
        assert out("get", "roles", "--format", fmt, *remote) == out(
            "get", "roles", "--format", fmt, *local
        )
    assert out("rm", "role/deploy", *remote) == 'role "deploy" has been deleted\n'
    assert out("bots", "rm", "web", *remote) == 'Bot "web" removed.\n'
    assert [b["bot_name"] for b in json.loads(out("bots", "ls", "--format", "json", *local))] == [
        "ci"
    ]


TOKEN_YAML = """kind: token
version: v2
metadata: {name: gha-deploy}
spec:
  join_method: github
  bot_name: ci
  github:
    allow: [{repository: acme/web, ref: refs/heads/main}]
"""

WORKLOAD_IDENTITY_YAML = """kind: workload_identity
version: v1
metadata: {name: payments, labels: {team: payments}}
spec:
  spiffe: {id: /svc/payments}
"""

APP_YAML = """kind: app
version: v3
metadata: {name: grafana, labels: {env: dev}}
spec: {uri: 'http://127.0.0.1:3000'}
"""

DB_YAML = """kind: db
version: v3
metadata: {name: orders, labels: {env: dev}}
spec: {protocol: postgres, uri: '127.0.0.1:5432'}
"""


@pytest.mark.parametrize(
    "case",
    [
        (TOKEN_YAML, "token", "tokens", "gha-deploy", "join token", "github"),
        (
            WORKLOAD_IDENTITY_YAML,
            "workload_identity",
            "workload_identities",
            "payments",
            "workload identity",
            "team=payments",
        ),
        (APP_YAML, "app", "apps", "grafana", "app", "http://127.0.0.1:3000"),
        (DB_YAML, "db", "dbs", "orders", "database", "postgres"),
    ],
)
def test_stored_kinds_are_created_shown_and_removed_alike_locally_and_remotely(
    client: AuthClient,
    identity_file: Path,
    tmp_path: Path,
    case: tuple[str, str, str, str, str, str],
) -> None:
    text, kind, plural, name, title, row = case
    remote = remote_args(client, identity_file)
    local = ["--data-dir", str(client.cluster.data_dir)]
    path = tmp_path / "resource.yaml"
    path.write_text(text)
    assert out("create", "-f", path, *remote) == f'{title} "{name}" has been created\n'
    assert out("create", "-f", path, "--force", *local) == f'{title} "{name}" has been updated\n'
    for fmt in ("text", "yaml", "json"):
        shown = out("get", f"{kind}/{name}", "--format", fmt, *remote)
        assert shown == out("get", f"{kind}/{name}", "--format", fmt, *local)
        listed = out("get", plural, "--format", fmt, *remote)
        assert listed == out("get", plural, "--format", fmt, *local)
    assert name in listed and row in out("get", plural, *local)
    parse = KINDS[kind].parse_yaml
    assert parse(out("get", f"{kind}/{name}", *local), "<shown>") == parse(text, "<file>")
    assert out("rm", f"{kind}/{name}", *remote) == f'{title} "{name}" has been deleted\n'
    assert json.loads(out("get", plural, "--format", "json", *local)) == []
    events = [
        e for e in audit_events(client.cluster.data_dir) if e["event"].startswith(f"admin.{kind}.")
    ]
    assert [(e["event"], e["resource"]) for e in events] == [
        (f"admin.{kind}.create", f"{kind}/{name}"),
        (f"admin.{kind}.update", f"{kind}/{name}"),
        (f"admin.{kind}.rm", f"{kind}/{name}"),
    ]


def test_tokens_ls_names_the_oidc_token_resources_in_text_only(
    client: AuthClient, identity_file: Path, tmp_path: Path
) -> None:
    remote = remote_args(client, identity_file)
    local = ["--data-dir", str(client.cluster.data_dir)]
    assert out("tokens", "ls", *local) == "No join tokens.\n"
    path = tmp_path / "token.yaml"
    path.write_text(TOKEN_YAML)
    out("create", "-f", path, *local)
    expected = "No join tokens.\nOIDC join token resources (tbot-py auth get tokens): gha-deploy\n"
    assert out("tokens", "ls", *local) == out("tokens", "ls", *remote) == expected
    for where in (local, remote):
        assert json.loads(out("tokens", "ls", "--format", "json", *where)) == []


def test_remote_cli_errors_are_one_line(
    client: AuthClient, identity_file: Path, tmp_path: Path
) -> None:
    remote = remote_args(client, identity_file)
    assert_one_error_line(run("bots", "rm", "nope", *remote), "not found")
    assert_one_error_line(run("bots", "update", "nope", "--add-roles", "x", *remote), "not found")
    assert_one_error_line(run("bots", "update", "Bad Name", *remote), "invalid bot name")
    assert_one_error_line(run("bots", "instances", "ls", "nope", *remote), "not found")
    assert_one_error_line(run("tokens", "rm", "zz/..", *remote), "invalid token id")
    assert_one_error_line(run("tokens", "rm", "abcdef", *remote), "no join token")
    assert_one_error_line(run("audit", *remote), "not supported with --auth-server")
    assert_one_error_line(run("audit", "--follow", *remote), "not supported with --auth-server")
    assert_one_error_line(run("bots", "ls", *remote, "--data-dir", tmp_path), "mutually exclusive")
    assert_one_error_line(run("bots", "ls", "--auth-server", client.service.addr), "go together")
    assert_one_error_line(run("bots", "ls"), "give --data-dir")
    assert_one_error_line(
        run("bots", "ls", "--auth-server", client.service.addr, "-i", tmp_path / "missing"),
        "cannot read identity file",
    )


def test_admin_api_refuses_a_bot_before_reading_a_bad_body(
    client: AuthClient, joined: Issued
) -> None:
    resp = client.request("POST", "/v1/admin/bots", identity=joined, content=b"not json")
    assert resp.status_code == 403


def test_refused_admin_api_calls_are_audited(
    client: AuthClient, joined: Issued, service: RunningAuthService
) -> None:
    client.request("GET", "/v1/admin/bots", identity=joined)
    client.request("DELETE", "/v1/admin/bots/ci")
    denials = [e for e in audit_events(service.data_dir) if e["event"] == "admin.api"]
    assert [(d["resource"], d["code"], d["success"]) for d in denials] == [
        ("GET /v1/admin/bots", 403, False),
        ("DELETE /v1/admin/bots/ci", 403, False),
    ]
    assert "bot certificates can not call the admin API" in denials[0]["message"]
    assert denials[1]["message"] == "client certificate required"
    assert all(d["remote_addr"] == "127.0.0.1" for d in denials)
