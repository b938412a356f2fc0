"""Unauthenticated endpoints over real TLS: find, export, token join, errors."""

from __future__ import annotations

import base64
import logging
import socket
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509

import tbot_py
from tbot_py.authservice import admin
from tbot_py.authservice.app import requested_public_key
from tbot_py.authservice.errors import BadParameter
from tbot_py.authservice.server import RunningAuthService
from tbot_py.client import wire
from tbot_py.identity import keys, tlsid
from tests.unit.conftest import create_login_roles

from .conftest import AuthClient, public_keys


@pytest.mark.parametrize("path", [wire.PATH_FIND, wire.PATH_FIND_V1])
def test_find_reports_cluster_version_and_address(client: AuthClient, path: str) -> None:
    resp = client.request("GET", path)
    assert resp.status_code == 200
    ping = wire.PingResponse.from_json(resp.json())
    assert ping.cluster_name == "tbot-py.local"
    assert ping.server_version == tbot_py.__version__
    assert ping.proxy_public_addr == client.service.addr
    assert ping.signature_algorithm_suite == "balanced-v1"


def test_find_reports_the_public_addr_when_one_is_given(tmp_path: Path) -> None:
    from tbot_py.authservice.server import start_in_thread

    with start_in_thread(tmp_path / "d", public_addrs=["auth.example.test:443"]) as svc:
        resp = AuthClient(svc, tmp_path).request("GET", wire.PATH_FIND)
    assert wire.PingResponse.from_json(resp.json()).proxy_public_addr == "auth.example.test:443"


def test_exported_tls_host_ca_matches_the_pin(client: AuthClient) -> None:
    resp = client.request("GET", wire.PATH_EXPORT, params={"type": "tls-host"})
    assert resp.status_code == 200
    cert = x509.load_pem_x509_certificate(resp.content)
    assert keys.ca_pin(cert) == client.service.ca_pin == client.cluster.ca_pin


def test_export_errors_are_plain_text(client: AuthClient) -> None:
    resp = client.request("GET", "/v1" + wire.PATH_EXPORT, params={"type": "bogus"})
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("text/plain")
    assert "unsupported export type" in resp.text


def test_server_certificate_verifies_for_teleport_internal_names(client: AuthClient) -> None:
    host, port = client.service.addr.rsplit(":", 1)
    server_name = "746274.teleport.cluster.local"  # hex(cluster) form tbot uses
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        client.context().wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        chain_leaf = tls.getpeercert()
    assert chain_leaf


def test_join_issues_a_renewable_bot_identity(client: AuthClient, bot_token: str) -> None:
    issued = client.join(bot_token)
    ident = issued.identity
    assert ident.username == "bot-ci"
    assert ident.groups == ("access", "dev")
    assert ident.principals == ("root", tlsid.INTERNAL_JOIN_PRINCIPAL)
    assert ident.renewable and ident.generation == 1
    assert ident.bot_name == "ci" and ident.bot_instance_id
    assert ident.teleport_cluster == ident.route_to_cluster == "tbot-py.local"
    assert tlsid.cluster_name_of(issued.cert) == "tbot-py.local"
    assert keys.same_public_key(issued.cert.public_key(), issued.key.public_key())  # type: ignore[arg-type]
    assert issued.certs.tls_ca_certs == client.cluster.cas.tls_ca_certs
    assert issued.certs.ssh_ca_certs == client.cluster.cas.ssh_ca_keys
    instance = client.cluster.storage.instances.get("ci", ident.bot_instance_id)
    assert instance is not None and instance.generation == 1


def test_join_ssh_certificate_reads_back_with_ssh_keygen(
    client: AuthClient, bot_token: str, tmp_path: Path
) -> None:
    issued = client.join(bot_token)
    cert_file = tmp_path / "bot-cert.pub"
    cert_file.write_bytes(issued.certs.ssh)
    out = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(cert_file)], capture_output=True, text=True, check=True
    ).stdout
    assert "user certificate" in out
    assert 'Key ID: "bot-ci"' in out
    assert "root" in out and "-teleport-internal-join" in out
    valid_to = issued.cert.not_valid_after_utc.astimezone().strftime("%Y-%m-%dT%H:%M:%S")
    assert f"to {valid_to}" in out
    for ext in ("permit-pty", "renewable", "generation", "bot-name@goteleport.com"):
        assert ext in out


def test_reused_token_is_refused_with_403_and_never_echoed(
    client: AuthClient, bot_token: str
) -> None:
    client.join(bot_token)
    key = keys.generate_private_key()
    req = wire.RegisterUsingTokenRequest(token=bot_token, keys=public_keys(key))
    resp = client.request("POST", wire.PATH_JOIN, json=req.to_json())
    assert resp.status_code == 403
    assert wire.error_message(resp.json()) == (
        'can not join the cluster with role "Bot", the token is not valid'
    )
    assert bot_token not in resp.text


def test_expired_token_is_refused_with_403(client: AuthClient, bot_token: str) -> None:
    past = datetime.now(UTC) - timedelta(hours=2)
    token = admin.add_token(client.cluster, "ci", ttl=timedelta(hours=1), now=past).token
    req = wire.RegisterUsingTokenRequest(token=token, keys=public_keys(keys.generate_private_key()))
    resp = client.request("POST", wire.PATH_JOIN, json=req.to_json())
    assert resp.status_code == 403


def test_unknown_token_is_refused_with_403(client: AuthClient, bot_token: str) -> None:
    req = wire.RegisterUsingTokenRequest(
        token="not-a-token", keys=public_keys(keys.generate_private_key())
    )
    resp = client.request("POST", wire.PATH_JOIN, json=req.to_json())
    assert resp.status_code == 403
    assert "not-a-token" not in resp.text


def test_join_with_a_non_bot_role_is_a_bad_parameter(client: AuthClient, bot_token: str) -> None:
    req = wire.RegisterUsingTokenRequest(
        token=bot_token, keys=public_keys(keys.generate_private_key()), role="Node"
    )
    resp = client.request("POST", wire.PATH_JOIN, json=req.to_json())
    assert resp.status_code == 400
    assert wire.error_message(resp.json()) == 'the token does not allow "Node" role'
    # A refused request does not spend the token.
    client.join(bot_token)


def test_join_with_different_tls_and_ssh_keys_is_a_bad_parameter(
    client: AuthClient, bot_token: str
) -> None:
    a, b = keys.generate_private_key(), keys.generate_private_key()
    mixed = wire.PublicKeys(
        tls=keys.public_key_pem(a.public_key()), ssh=keys.ssh_public_key_line(b.public_key())
    )
    resp = client.request(
        "POST", wire.PATH_JOIN, json=wire.RegisterUsingTokenRequest(bot_token, mixed).to_json()
    )
    assert resp.status_code == 400
    assert "not the same key" in resp.text


def test_join_with_an_unparsable_key_is_a_bad_parameter(client: AuthClient, bot_token: str) -> None:
    junk = wire.PublicKeys(tls=b"-----BEGIN PUBLIC KEY-----\nAAAA\n", ssh=b"ssh-ed25519 AAAA")
    resp = client.request(
        "POST", wire.PATH_JOIN, json=wire.RegisterUsingTokenRequest(bot_token, junk).to_json()
    )
    assert resp.status_code == 400
    assert "public_tls_key" in resp.text


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"role": "Bot"}', b'{"token": 5, "role": "Bot"}'],
)
def test_malformed_join_body_is_a_bad_parameter(client: AuthClient, body: bytes) -> None:
    resp = client.request("POST", wire.PATH_JOIN, content=body)
    assert resp.status_code == 400
    assert wire.error_message(resp.json())


def test_oversized_body_is_refused(client: AuthClient) -> None:
    resp = client.request("POST", wire.PATH_JOIN, content=b" " * (65 * 1024))
    assert resp.status_code == 400
    assert "larger than" in resp.text


def test_join_expiry_is_capped_at_24_hours(client: AuthClient, bot_token: str) -> None:
    before = datetime.now(UTC)
    issued = client.join(bot_token, expires=before + timedelta(days=7))
    not_after = issued.cert.not_valid_after_utc
    assert (
        before + timedelta(hours=23, minutes=59)
        < not_after
        <= before + timedelta(hours=24, seconds=5)
    )


def test_join_expiry_in_the_past_is_a_bad_parameter(client: AuthClient, bot_token: str) -> None:
    req = wire.RegisterUsingTokenRequest(
        token=bot_token,
        keys=public_keys(keys.generate_private_key()),
        expires=datetime.now(UTC) - timedelta(minutes=1),
    )
    resp = client.request("POST", wire.PATH_JOIN, json=req.to_json())
    assert resp.status_code == 400
    assert "not in the future" in resp.text


def test_join_response_is_go_json_base64(client: AuthClient, bot_token: str) -> None:
    key = keys.generate_private_key()
    req = wire.RegisterUsingTokenRequest(token=bot_token, keys=public_keys(key))
    doc = client.request("POST", wire.PATH_JOIN, json=req.to_json()).json()
    assert base64.b64decode(doc["tls"]).startswith(b"-----BEGIN CERTIFICATE-----")
    assert base64.b64decode(doc["ssh"]).startswith(b"ecdsa-sha2-nistp256-cert-v01@openssh.com ")
    assert len(doc["tls_ca_certs"]) == 2 and len(doc["ssh_ca_certs"]) == 2


def test_unknown_route_is_a_json_404(client: AuthClient) -> None:
    resp = client.request("GET", "/v1/nothing/here")
    assert resp.status_code == 404
    assert resp.json() == {"error": {"message": "route not found"}}


def test_wrong_method_is_a_json_405(client: AuthClient) -> None:
    resp = client.request("GET", wire.PATH_JOIN)
    assert resp.status_code == 405
    assert wire.error_message(resp.json())


def test_service_stops_and_releases_its_port(tmp_path: Path) -> None:
    from tbot_py.authservice.server import start_in_thread

    svc: RunningAuthService = start_in_thread(tmp_path / "d")
    host, port = svc.addr.rsplit(":", 1)
    svc.stop()
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass


def test_client_cert_from_another_cluster_fails_the_handshake(
    client: AuthClient, tmp_path: Path
) -> None:
    from tbot_py.authservice.server import start_in_thread

    with start_in_thread(tmp_path / "other") as other:
        other_client = AuthClient(other, tmp_path)
        create_login_roles(other.cluster, "r")
        token = admin.add_bot(other.cluster, "ci", roles=("r",)).token.token
        foreign = other_client.join(token)
    # TLS 1.3 reports the refused client certificate after the client's handshake ends.
    with pytest.raises(httpx.TransportError):
        client.request("GET", wire.PATH_CAS, identity=foreign)


def test_each_join_is_logged_once_without_the_token(
    client: AuthClient, bot_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tbot_py.authservice"):
        issued = client.join(bot_token)
        req = wire.RegisterUsingTokenRequest(
            token=bot_token, keys=public_keys(keys.generate_private_key())
        )
        client.request("POST", wire.PATH_JOIN, json=req.to_json())
    joins = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bot.join")]
    assert len(joins) == 2
    assert "result=ok" in joins[0] and issued.identity.bot_instance_id in joins[0]
    assert "bot=ci" in joins[0] and "generation=1" in joins[0] and "remote=127.0.0.1" in joins[0]
    assert "result=denied status=403" in joins[1]
    assert all(bot_token not in r.getMessage() for r in caplog.records)


def test_unexpected_failure_is_a_bare_500_with_the_traceback_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tbot_py.authservice.server import start_in_thread

    def broken_clock() -> datetime:
        raise RuntimeError("clock exploded with detail-xyz")

    with (
        caplog.at_level(logging.INFO, logger="tbot_py.authservice"),
        start_in_thread(tmp_path / "d", clock=broken_clock) as svc,
    ):
        create_login_roles(svc.cluster, "r")
        token = admin.add_bot(svc.cluster, "ci", roles=("r",)).token.token
        req = wire.RegisterUsingTokenRequest(
            token=token, keys=public_keys(keys.generate_private_key())
        )
        resp = AuthClient(svc, tmp_path).request("POST", wire.PATH_JOIN, json=req.to_json())
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": "internal server error"}}
    assert "detail-xyz" not in resp.text
    assert any(r.exc_info and "detail-xyz" in str(r.exc_info[1]) for r in caplog.records)


def test_the_requested_key_is_taken_with_a_comment_and_refused_when_the_ssh_line_differs() -> None:
    key = keys.generate_private_key().public_key()
    pem, line = keys.public_key_pem(key), keys.ssh_public_key_line(key)
    for ssh in (line, line.rstrip() + b" bot@host\n", b"  " + line):
        found = requested_public_key(wire.PublicKeys(tls=pem, ssh=ssh))
        assert keys.same_public_key(found, key)
    other = keys.ssh_public_key_line(keys.generate_private_key().public_key())
    with pytest.raises(BadParameter, match="not the same key"):
        requested_public_key(wire.PublicKeys(tls=pem, ssh=other))
    with pytest.raises(BadParameter, match="authorized_keys"):
        requested_public_key(wire.PublicKeys(tls=pem, ssh=line.replace(b" ", b"  ", 1)))
