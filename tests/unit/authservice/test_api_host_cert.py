"""``POST /v1/bot/hostcert`` over real TLS: the host_cert rule, the certificate, bad input."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import ssh

from tbot_py.authservice import admin
from tbot_py.authservice.roles import (
    ResourceRule,
    RoleConditions,
    new_role,
    parse_role_yaml,
)
from tbot_py.client import wire
from tbot_py.identity import keys

from .conftest import AuthClient, Issued

HOST_CERTS = new_role(
    "host-certs",
    allow=RoleConditions(rules=(ResourceRule(resources=("host_cert",), verbs=("create",)),)),
)
NO_HOST_CERTS = new_role(
    "no-host-certs",
    deny=RoleConditions(rules=(ResourceRule(resources=("*",), verbs=("*",)),)),
)


def _join(client: AuthClient, roles: tuple[str, ...]) -> Issued:
    for role in (HOST_CERTS, NO_HOST_CERTS):
        if client.cluster.storage.roles.get(role.name) is None:
            admin.create_role(client.cluster, role)
    created = admin.add_bot(client.cluster, "hosts", roles=roles, logins=("root",))
    return client.join(created.token.token)


def _ask(
    client: AuthClient,
    identity: Issued,
    principals: tuple[str, ...] = ("node1.example.com", "127.0.0.1"),
    **fields: object,
) -> httpx.Response:
    line = keys.ssh_public_key_line(keys.generate_private_key().public_key())
    req = wire.HostCertRequest(public_ssh_key=line, principals=principals, **fields)  # type: ignore[arg-type]
    return client.request("POST", wire.PATH_HOST_CERT, identity=identity, json=req.to_json())


def test_a_bot_with_the_host_cert_rule_gets_a_host_certificate(
    client: AuthClient, tmp_path: Path
) -> None:
    joined = _join(client, ("host-certs",))
    resp = _ask(client, joined)
    assert resp.status_code == 200, resp.text
    line = wire.HostCertResponse.from_json(resp.json()).ssh_cert
    cert = ssh.load_ssh_public_identity(line)
    assert isinstance(cert, ssh.SSHCertificate)
    assert cert.type == ssh.SSHCertificateType.HOST
    assert cert.valid_principals == [b"node1.example.com", b"127.0.0.1"]
    assert cert.key_id == b"node1.example.com"
    host_ca = client.cluster.cas.host.ssh_public_key_line.split()[:2]
    signer = cert.signature_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert signer.split() == host_ca
    cert.verify_cert_signature()
    # Capped like the other outputs: never past the bot identity (1h by default).
    not_after = datetime.fromtimestamp(cert.valid_before, UTC)
    assert not_after <= joined.cert.not_valid_after_utc
    path = tmp_path / "host-cert.pub"
    path.write_bytes(line)
    shown = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(path)], check=True, capture_output=True, text=True
    ).stdout
    assert "host certificate" in shown
    assert "node1.example.com" in shown


def test_the_host_certificate_is_capped_by_the_roles_max_session_ttl(client: AuthClient) -> None:
    short = new_role(
        "short-host-certs",
        allow=RoleConditions(rules=(ResourceRule(resources=("host_cert",), verbs=("create",)),)),
        max_session_ttl=timedelta(minutes=5),
    )
    admin.create_role(client.cluster, short)
    created = admin.add_bot(client.cluster, "short", roles=("short-host-certs",))
    joined = client.join(created.token.token)
    resp = _ask(client, joined)
    assert resp.status_code == 200, resp.text
    cert = ssh.load_ssh_public_identity(wire.HostCertResponse.from_json(resp.json()).ssh_cert)
    assert isinstance(cert, ssh.SSHCertificate)
    not_after = datetime.fromtimestamp(cert.valid_before, UTC)
    assert not_after <= datetime.now(UTC) + timedelta(minutes=5)
    assert joined.cert.not_valid_after_utc - not_after > timedelta(minutes=50)


def test_without_the_rule_a_bot_is_denied(client: AuthClient) -> None:
    joined = _join(client, ("access",))
    resp = _ask(client, joined)
    assert resp.status_code == 403
    assert wire.error_message(resp.json()) == 'bot "hosts" may not create host certificates'


def test_a_deny_rule_wins_over_an_allow_rule(client: AuthClient) -> None:
    joined = _join(client, ("host-certs", "no-host-certs"))
    assert _ask(client, joined).status_code == 403


def test_an_impersonated_identity_cannot_ask(client: AuthClient) -> None:
    joined = _join(client, ("host-certs",))
    resp, key = client.impersonate(joined)
    assert resp.status_code == 200, resp.text
    output = client.save(key, wire.Certs.from_json(resp.json()))
    assert _ask(client, output).status_code == 403


def test_a_locked_bot_is_refused(client: AuthClient) -> None:
    joined = _join(client, ("host-certs",))
    admin.add_lock(client.cluster, bot="hosts", message="compromised")
    assert _ask(client, joined).status_code == 403


@pytest.mark.parametrize(
    ("principals", "message"),
    [
        (("a b",), "a host principal must be 1-253 printable characters"),
        (("a,b",), "a host principal must be 1-253 printable characters"),
        (tuple(f"h{i}" for i in range(65)), "at most 64 principals"),
    ],
)
def test_bad_principals_are_refused(
    client: AuthClient, principals: tuple[str, ...], message: str
) -> None:
    joined = _join(client, ("host-certs",))
    resp = _ask(client, joined, principals)
    assert resp.status_code == 400
    assert message in (wire.error_message(resp.json()) or "")


def test_malformed_requests_get_one_clear_error(client: AuthClient) -> None:
    joined = _join(client, ("host-certs",))
    for body, message in (
        ({"public_ssh_key": "AAAA", "principals": []}, "principals must be a non-empty list"),
        ({"public_ssh_key": "!!", "principals": ["a"]}, "public_ssh_key is not valid base64"),
        (
            {"public_ssh_key": wire.b64encode(b"ssh-ed25519 nonsense"), "principals": ["a"]},
            "public_ssh_key is not an authorized_keys line",
        ),
    ):
        resp = client.request("POST", wire.PATH_HOST_CERT, identity=joined, json=body)
        assert resp.status_code == 400, resp.text
        assert message in (wire.error_message(resp.json()) or "")


def test_an_expiry_in_the_past_is_refused(client: AuthClient) -> None:
    joined = _join(client, ("host-certs",))
    past = datetime.now(UTC) - timedelta(minutes=5)
    assert _ask(client, joined, expires=past).status_code == 400


def test_rules_round_trip_through_yaml_and_reject_unknown_names() -> None:
    text = HOST_CERTS.to_yaml()
    assert "host_cert" in text
    assert parse_role_yaml(text) == HOST_CERTS
    bad = text.replace("create", "delete")
    with pytest.raises(Exception, match='unknown verb "delete"'):
        parse_role_yaml(bad)
