"""Workload identity on the auth service: SPIFFE CA, JWT key, discovery, SVIDs, RBAC.

SVIDs are checked with real tools: ``openssl verify`` against the returned bundle,
and PyJWT with only the JWKS the running service publishes over HTTPS.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509

from tbot_py.authservice import admin, audit, workload
from tbot_py.authservice.ca_store import WORKLOAD_META_KEYS
from tbot_py.authservice.cluster import (
    JWT_KEY,
    DataDirError,
    ca_cert_path,
    ca_key_path,
    open_cluster,
)
from tbot_py.authservice.roles import RoleConditions, new_role
from tbot_py.authservice.workload_identities import parse_workload_identity_yaml
from tbot_py.client import tls, wire
from tbot_py.client.http import AuthClient as BotClient
from tbot_py.errors import AccessDenied as ClientAccessDenied
from tbot_py.errors import ConfigError
from tbot_py.identity import keys

from .conftest import AuthClient, Issued
from .test_cli import assert_one_error_line, run

PAYMENTS_YAML = """\
kind: workload_identity
version: v1
metadata:
  name: payments
  labels: {team: payments, env: prod}
spec:
  spiffe:
    id: /svc/payments/{{user.bot_name}}
"""

BILLING_YAML = PAYMENTS_YAML.replace("payments", "billing")

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def setup_bot(
    client: AuthClient, allow: dict[str, Any], deny: dict[str, Any] | None = None
) -> Issued:
    """Store both resources, a role "wi" with these label rules, and join bot "svc" with it."""
    cluster = client.cluster
    for text in (PAYMENTS_YAML, BILLING_YAML):
        admin.create_resource(cluster, parse_workload_identity_yaml(text))
    role = new_role(
        "wi",
        allow=RoleConditions(workload_identity_labels=allow),
        deny=RoleConditions(workload_identity_labels=deny or {}),
    )
    admin.create_role(cluster, role)
    created = admin.add_bot(cluster, "svc", roles=("wi",), logins=())
    return client.join(created.token.token)


def x509_request(
    key: keys.PrivateKey, *, name: str = "", labels: dict[str, str] | None = None
) -> dict[str, Any]:
    selector = wire.WorkloadIdentitySelector(name=name, labels=labels or {})
    return wire.X509SVIDRequest(selector, keys.public_key_pem(key.public_key())).to_json()


def jwt_request(name: str, *audiences: str) -> dict[str, Any]:
    selector = wire.WorkloadIdentitySelector(name=name)
    return wire.JWTSVIDRequest(selector, audiences=audiences).to_json()


def error(resp: httpx.Response) -> str:
    message = wire.error_message(resp.json())
    assert message is not None, resp.text
    return message


# -- keys -------------------------------------------------------------------------------------


def test_workload_keys_are_created_once_and_added_to_an_older_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "auth"
    first = open_cluster(data_dir, cluster_name="example.com")
    again = open_cluster(data_dir)
    assert again.workload.signing_kid == first.workload.signing_kid
    assert again.workload.spiffe.cert_pem == first.workload.spiffe.cert_pem
    san = first.workload.spiffe.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.com"]
    # A data directory from before workload identity: the keys appear on the next start.
    for path in (ca_key_path(data_dir, "spiffe"), ca_cert_path(data_dir, "spiffe")):
        path.unlink()
    (data_dir / JWT_KEY).unlink()
    upgraded = open_cluster(data_dir)
    assert upgraded.workload.signing_kid != first.workload.signing_kid
    assert (data_dir / JWT_KEY).stat().st_mode & 0o777 == 0o600
    assert upgraded.cas.host.cert_pem == first.cas.host.cert_pem


def test_a_damaged_jwt_key_is_one_clear_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "auth"
    open_cluster(data_dir)
    (data_dir / JWT_KEY).write_text("not a key")
    with pytest.raises(DataDirError, match="cannot load the SPIFFE CA or JWT key") as caught:
        open_cluster(data_dir)
    assert "not a key" not in str(caught.value)


def test_jwt_signature_is_es256_raw_r_s_and_kid_is_the_rfc7638_thumbprint() -> None:
    key = keys.generate_private_key()
    token = workload.sign_jwt(key, {"sub": "x"})
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": workload.key_id(key.public_key()), "typ": "JWT"}
    public = jwt.PyJWK(workload.public_jwk(key.public_key()))
    assert jwt.decode(token, public, algorithms=["ES256"]) == {"sub": "x"}
    # RFC 7638 §3.1: SHA-256 of the required members, in order, without whitespace.
    jwk = workload.public_jwk(key.public_key())
    canonical = f'{{"crv":"P-256","kty":"EC","x":"{jwk["x"]}","y":"{jwk["y"]}"}}'.encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=")
    assert jwk["kid"] == digest.decode()
    numbers = key.public_key().public_numbers()
    padded = jwk["x"] + "=" * (-len(jwk["x"]) % 4)
    assert int.from_bytes(base64.urlsafe_b64decode(padded), "big") == numbers.x


# -- discovery --------------------------------------------------------------------------------


def test_discovery_and_jwks_are_served_without_a_client_certificate(client: AuthClient) -> None:
    conf = client.request("GET", wire.PATH_OPENID_CONFIGURATION)
    assert conf.status_code == 200, conf.text
    issuer = f"https://{client.service.addr}"
    assert conf.json() == {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "jti"],
    }
    jwks = client.request("GET", wire.PATH_JWKS).json()
    assert [k["kid"] for k in jwks["keys"]] == [client.cluster.workload.signing_kid]
    assert all("d" not in k for k in jwks["keys"])  # public parts only


# -- X.509 SVIDs ------------------------------------------------------------------------------


@needs_openssl
def test_x509_svid_verifies_with_openssl_against_the_bundle(
    client: AuthClient, tmp_path: Path
) -> None:
    bot = setup_bot(client, allow={"team": "payments"})
    key = keys.generate_private_key()
    resp = client.request(
        "POST", wire.PATH_X509_SVID, identity=bot, json=x509_request(key, name="payments")
    )
    assert resp.status_code == 200, resp.text
    answer = wire.X509SVIDResponse.from_json(resp.json())
    assert answer.spiffe_id == "spiffe://tbot-py.local/svc/payments/svc"
    (tmp_path / "svid.pem").write_bytes(answer.svid)
    (tmp_path / "bundle.pem").write_bytes(answer.bundle)
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", tmp_path / "bundle.pem", tmp_path / "svid.pem"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0 and verify.stdout.strip().endswith(": OK"), verify.stderr
    san = subprocess.run(
        ["openssl", "x509", "-in", tmp_path / "svid.pem", "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "URI:spiffe://tbot-py.local/svc/payments/svc" in san
    # The SVID is not trusted by the cluster's user CA, only by the SPIFFE bundle.
    (tmp_path / "user_ca.pem").write_bytes(client.cluster.cas.user.cert_pem)
    wrong = subprocess.run(
        ["openssl", "verify", "-CAfile", tmp_path / "user_ca.pem", tmp_path / "svid.pem"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert wrong.returncode != 0
    svid = x509.load_pem_x509_certificate(answer.svid)
    assert svid.not_valid_after_utc <= bot.cert.not_valid_after_utc
    events = [
        json.loads(line)
        for line in audit.audit_log_path(client.cluster.data_dir).read_text().splitlines()
    ]
    issued = [e for e in events if e["event"] == "bot.workload_identity.x509"]
    assert issued[-1]["success"] is True
    assert issued[-1]["resource"] == "workload_identity/payments"


def test_x509_svid_by_labels_picks_an_allowed_resource(client: AuthClient) -> None:
    bot = setup_bot(client, allow={"team": ["billing"]})
    key = keys.generate_private_key()
    resp = client.request(
        "POST", wire.PATH_X509_SVID, identity=bot, json=x509_request(key, labels={"env": "prod"})
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["spiffe_id"] == "spiffe://tbot-py.local/svc/billing/svc"


@pytest.mark.parametrize(
    ("allow", "deny", "selector", "status", "needle"),
    [
        ({"team": "billing"}, None, {"name": "payments"}, 403,
         'no role allows workload identity "payments"'),
        ({"*": "*"}, {"env": "prod"}, {"name": "payments"}, 403,
         'denied by role "wi": workload_identity_labels env=prod'),
        ({"*": "*"}, None, {"name": "nope"}, 404, 'workload identity "nope" not found'),
        ({"team": "billing"}, None, {"labels": {"team": "payments"}}, 403,
         'no workload identity with labels team=payments is allowed for bot "svc"'),
    ],
)  # fmt: skip
def test_svid_is_denied(
    client: AuthClient,
    *,
    allow: dict[str, Any],
    deny: dict[str, Any] | None,
    selector: dict[str, Any],
    status: int,
    needle: str,
) -> None:
    bot = setup_bot(client, allow=allow, deny=deny)
    key = keys.generate_private_key()
    body = x509_request(key, name="x") | {"selector": selector}
    resp = client.request("POST", wire.PATH_X509_SVID, identity=bot, json=body)
    assert resp.status_code == status
    assert needle in error(resp)
    resp = client.request(
        "POST",
        wire.PATH_JWT_SVID,
        identity=bot,
        json=jwt_request("x", "aud") | {"selector": selector},
    )
    assert resp.status_code == status
    assert needle in error(resp)


def test_svid_endpoints_need_a_bot_certificate(client: AuthClient) -> None:
    key = keys.generate_private_key()
    resp = client.request("POST", wire.PATH_X509_SVID, json=x509_request(key, name="payments"))
    assert resp.status_code == 403


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"public_key": "x"}, "selector must be a JSON object"),
        ({"selector": {"name": "a", "labels": {"b": "c"}}, "public_key": "x"}, "exactly one"),
        ({"selector": {"name": "payments"}, "public_key": "x"}, "public_key is not a PEM"),
    ],
)
def test_bad_x509_svid_requests_get_one_clear_error(
    client: AuthClient, body: dict[str, Any], needle: str
) -> None:
    bot = setup_bot(client, allow={"*": "*"})
    resp = client.request("POST", wire.PATH_X509_SVID, identity=bot, json=body)
    assert resp.status_code == 400
    assert needle in error(resp)


# -- JWT-SVIDs --------------------------------------------------------------------------------


def test_jwt_svid_verifies_with_pyjwt_from_the_published_jwks_alone(client: AuthClient) -> None:
    bot = setup_bot(client, allow={"team": "payments"})
    resp = client.request(
        "POST", wire.PATH_JWT_SVID, identity=bot, json=jwt_request("payments", "mcp-gateway")
    )
    assert resp.status_code == 200, resp.text
    answer = wire.JWTSVIDResponse.from_json(resp.json())
    # A third party: discovery first, then the JWKS it names, over HTTPS trusting the cluster.
    ctx = client.context()
    base = f"https://{client.service.addr}"
    with httpx.Client(verify=ctx) as http:
        discovery = http.get(base + wire.PATH_OPENID_CONFIGURATION).json()
    jwks = jwt.PyJWKClient(discovery["jwks_uri"], ssl_context=ctx, cache_keys=False)
    signing_key = jwks.get_signing_key_from_jwt(answer.jwt)
    claims = jwt.decode(
        answer.jwt,
        signing_key,
        algorithms=discovery["id_token_signing_alg_values_supported"],
        audience="mcp-gateway",
        issuer=discovery["issuer"],
        options={"require": ["exp", "iat", "sub", "jti"]},
    )
    assert claims["sub"] == answer.spiffe_id == "spiffe://tbot-py.local/svc/payments/svc"
    assert claims["aud"] == ["mcp-gateway"]
    assert 0 < claims["exp"] - claims["iat"] <= workload.MAX_SVID_TTL_S + 60
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(answer.jwt, signing_key, algorithms=["ES256"], audience="someone-else")
    # A token signed by any other key is refused with the same JWKS.
    forged = workload.sign_jwt(keys.generate_private_key(), claims)
    with pytest.raises(jwt.PyJWKClientError):
        jwks.get_signing_key_from_jwt(forged)


def test_jwt_svid_needs_audiences(client: AuthClient) -> None:
    bot = setup_bot(client, allow={"*": "*"})
    resp = client.request("POST", wire.PATH_JWT_SVID, identity=bot, json=jwt_request("payments"))
    assert resp.status_code == 400
    assert "audiences must be a non-empty list" in error(resp)


# -- resources --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/svc/{{user.name}}", "only {{user.bot_name}} is supported"),
        ("svc/foo", "must start with '/'"),
        ("/svc/../x", "segments use letters"),
    ],
)
def test_a_bad_spiffe_id_path_is_refused_when_read(path: str, needle: str) -> None:
    text = PAYMENTS_YAML.replace("/svc/payments/{{user.bot_name}}", path)
    with pytest.raises(ConfigError, match=r"spec\.spiffe\.id") as caught:
        parse_workload_identity_yaml(text, source="wi.yaml")
    assert needle in str(caught.value)


def test_cli_creates_gets_and_removes_a_workload_identity(tmp_path: Path) -> None:
    data_dir, path = tmp_path / "auth", tmp_path / "wi.yaml"
    path.write_text(PAYMENTS_YAML)
    created = run("create", "-f", path, "--data-dir", data_dir)
    assert created.stdout == 'workload identity "payments" has been created\n', created.output
    assert_one_error_line(
        run("create", "-f", path, "--data-dir", data_dir), "already exists; use --force"
    )
    shown = run("get", "workload_identity/payments", "--data-dir", data_dir)
    assert parse_workload_identity_yaml(shown.stdout) == parse_workload_identity_yaml(PAYMENTS_YAML)
    listed = run("get", "workload_identities", "--data-dir", data_dir).stdout
    assert "payments" in listed and "team=payments" in listed
    assert run("rm", "workload_identity/payments", "--data-dir", data_dir).exit_code == 0
    assert_one_error_line(
        run("get", "workload_identity/payments", "--data-dir", data_dir),
        'workload identity "payments" not found',
    )


def test_replicas_on_postgres_share_one_spiffe_ca_and_jwt_key(
    postgres_dsn: str, tmp_path: Path
) -> None:
    kids: list[str] = []
    barrier = threading.Barrier(3)

    def start(n: int) -> None:
        barrier.wait()
        kids.append(open_cluster(tmp_path / f"r{n}", storage=postgres_dsn).workload.signing_kid)

    threads = [threading.Thread(target=start, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(kids) == 3 and len(set(kids)) == 1
    assert not list(tmp_path.rglob(JWT_KEY))  # the keys stay in the database
    # A database from before workload identity gains the keys on the next start.
    cluster = open_cluster(tmp_path / "r0", storage=postgres_dsn)
    with cluster.storage._transaction(write=True) as conn:
        conn.execute("DELETE FROM meta WHERE key IN (?, ?, ?)", WORKLOAD_META_KEYS)
    upgraded = open_cluster(tmp_path / "r0", storage=postgres_dsn)
    assert upgraded.workload.signing_kid not in kids
    assert upgraded.ca_pin == cluster.ca_pin


def test_bot_client_issues_both_svids_and_reports_a_denial(client: AuthClient) -> None:
    bot = setup_bot(client, allow={"team": "payments"})
    ctx = tls.mtls_context(bot.certs.tls, keys.private_key_pem(bot.key), bot.certs.tls_ca_certs)
    key = keys.generate_private_key()
    selector = wire.WorkloadIdentitySelector(labels={"team": "payments"})

    async def calls() -> tuple[wire.X509SVIDResponse, wire.JWTSVIDResponse]:
        async with BotClient(client.service.addr, ctx, timeout=5.0) as api:
            x509_svid = await api.issue_x509_svid(
                wire.X509SVIDRequest(selector, keys.public_key_pem(key.public_key()))
            )
            jwt_svid = await api.issue_jwt_svid(wire.JWTSVIDRequest(selector, ("a", "b")))
            with pytest.raises(ClientAccessDenied, match='may not use workload identity "billing"'):
                await api.issue_jwt_svid(
                    wire.JWTSVIDRequest(wire.WorkloadIdentitySelector(name="billing"), ("a",))
                )
            return x509_svid, jwt_svid

    x509_svid, jwt_svid = asyncio.run(calls())
    cert = x509.load_pem_x509_certificate(x509_svid.svid)
    assert keys.same_public_key(cert.public_key(), key.public_key())  # type: ignore[arg-type]
    assert x509_svid.bundle == client.cluster.workload.spiffe.cert_pem
    claims = jwt.decode(
        jwt_svid.jwt,
        jwt.PyJWK(client.cluster.workload.jwks["keys"][0]),
        algorithms=["ES256"],
        audience="b",
    )
    assert claims["sub"] == jwt_svid.spiffe_id == x509_svid.spiffe_id
