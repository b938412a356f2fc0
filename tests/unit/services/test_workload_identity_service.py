"""The workload identity outputs: one generation against a real auth service over real TLS."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tbot_py.authservice import admin
from tbot_py.authservice.roles import RoleConditions, new_role
from tbot_py.authservice.server import RunningAuthService
from tbot_py.authservice.workload_identities import parse_workload_identity_yaml
from tbot_py.bot.identity import JoinParams, obtain_bot_identity
from tbot_py.client import tls, wire
from tbot_py.client.http import AuthClient
from tbot_py.destinations import DirectoryDestination, MemoryDestination
from tbot_py.errors import AccessDenied, IdentityError
from tbot_py.identity import keys
from tbot_py.services.base import BotContext, GenerateResult, OutputService
from tbot_py.services.workload_identity import (
    JWTSVIDOutputSettings,
    WorkloadIdentityJWTService,
    WorkloadIdentityX509Service,
    X509SVIDOutputSettings,
    check_jwt_svid,
    check_x509_svid,
)
from tests.unit.conftest import utc_now

RESOURCE = """\
kind: workload_identity
version: v1
metadata: {name: payments, labels: {team: payments}}
spec:
  spiffe: {id: '/svc/{{user.bot_name}}'}
"""
BY_NAME = wire.WorkloadIdentitySelector(name="payments")
BY_LABELS = wire.WorkloadIdentitySelector(labels={"team": "payments"})
X509_ARTIFACTS = {"svid.pem", "svid_key.pem", "svid_bundle.pem"}


def _token(service: RunningAuthService, *, allowed: bool) -> str:
    cluster = service.cluster
    admin.create_resource(cluster, parse_workload_identity_yaml(RESOURCE))
    labels = {"team": "payments"} if allowed else {"team": "other"}
    admin.create_role(
        cluster, new_role("wi", allow=RoleConditions(workload_identity_labels=labels))
    )
    return admin.add_bot(cluster, "svc", roles=("wi",)).token.token


def _generate(
    service: RunningAuthService, token: str, outputs: list[OutputService]
) -> list[GenerateResult]:
    async def main() -> list[GenerateResult]:
        params = JoinParams(addr=service.addr, token=token, ca_pins=(service.ca_pin,))
        bot_identity = await obtain_bot_identity(
            params, MemoryDestination(), timedelta(hours=1), utc_now
        )
        ctx = tls.mtls_context(
            bot_identity.tls_cert_pem, bot_identity.private_key_pem, bot_identity.tls_ca_pems
        )
        async with AuthClient(service.addr, ctx, timeout=5.0) as client:
            bot = BotContext(
                client=client,
                bot_identity=bot_identity,
                ping=await client.ping(),
                cert_authorities=tuple(await client.cert_authorities()),
                clock=utc_now,
            )
            results = []
            for output in outputs:
                output.init()
                results.append(await output.generate(bot))
            return results

    return asyncio.run(main())


def _openssl(*argv: str) -> str:
    done = subprocess.run(["openssl", *argv], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_x509_writes_an_svid_openssl_verifies_for_the_written_key(
    service: RunningAuthService, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    settings = X509SVIDOutputSettings(name="x509", selector=BY_NAME, ttl=timedelta(minutes=30))
    output = WorkloadIdentityX509Service(settings, DirectoryDestination(out))
    (result,) = _generate(service, _token(service, allowed=True), [output])
    assert set(result.files) == X509_ARTIFACTS
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} >= X509_ARTIFACTS
    verified = _openssl("verify", "-CAfile", str(out / "svid_bundle.pem"), str(out / "svid.pem"))
    assert verified.strip().endswith(": OK")
    assert (out / "svid_key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert _openssl("pkey", "-in", str(out / "svid_key.pem"), "-pubout") == _openssl(
        "x509", "-in", str(out / "svid.pem"), "-noout", "-pubkey"
    )
    cert = x509.load_pem_x509_certificate((out / "svid.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    expected = f"spiffe://{service.cluster.name}/svc/svc"
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [expected]
    # The daemon schedules from the SVID's own validity.
    assert result.identity.not_after == cert.not_valid_after_utc
    assert result.identity.not_after - result.identity.not_before <= timedelta(minutes=31)


def test_x509_uses_a_fresh_key_each_generation(service: RunningAuthService) -> None:
    destination = MemoryDestination()
    settings = X509SVIDOutputSettings(name="x509", selector=BY_LABELS, ttl=timedelta(minutes=5))
    output = WorkloadIdentityX509Service(settings, destination)
    first, second = _generate(service, _token(service, allowed=True), [output, output])
    assert first.written["svid_key.pem"] != second.written["svid_key.pem"]
    assert second.changed


def test_jwt_writes_a_jwt_svid_for_the_audiences(service: RunningAuthService) -> None:
    destination = MemoryDestination()
    settings = JWTSVIDOutputSettings(
        name="jwt", selector=BY_NAME, audiences=("a", "b"), ttl=timedelta(minutes=10)
    )
    output = WorkloadIdentityJWTService(settings, destination)
    (result,) = _generate(service, _token(service, allowed=True), [output])
    assert result.files == ("jwt_svid",)
    token = destination.read("jwt_svid")
    assert token is not None and token.count(b".") == 2
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == f"spiffe://{service.cluster.name}/svc/svc"
    assert sorted(claims["aud"]) == ["a", "b"]
    assert int(result.identity.not_after.timestamp()) == claims["exp"]


def test_a_bot_whose_roles_do_not_allow_the_resource_writes_nothing(
    service: RunningAuthService,
) -> None:
    destination = MemoryDestination()
    settings = X509SVIDOutputSettings(name="x509", selector=BY_NAME, ttl=timedelta(minutes=5))
    with pytest.raises(AccessDenied):
        _generate(
            service,
            _token(service, allowed=False),
            [WorkloadIdentityX509Service(settings, destination)],
        )
    assert all(destination.read(name) is None for name in X509_ARTIFACTS)


# --- answers that must not be written -----------------------------------------------------------


def _self_signed(key: keys.PrivateKey, uri: str) -> bytes:
    name = x509.Name([])
    now = utc_now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(minutes=5))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_x509_answers_for_another_key_or_id_are_refused() -> None:
    ours, theirs = keys.generate_private_key(), keys.generate_private_key()
    spiffe_id = "spiffe://example/svc"
    good = _self_signed(ours, spiffe_id)
    check_x509_svid(wire.X509SVIDResponse(spiffe_id, good, good), ours)
    other_key = _self_signed(theirs, spiffe_id)
    with pytest.raises(IdentityError, match="for another key"):
        check_x509_svid(wire.X509SVIDResponse(spiffe_id, other_key, good), ours)
    with pytest.raises(IdentityError, match="does not name its SPIFFE ID"):
        check_x509_svid(wire.X509SVIDResponse("spiffe://example/x", good, good), ours)
    with pytest.raises(IdentityError, match="does not parse"):
        check_x509_svid(wire.X509SVIDResponse(spiffe_id, b"junk", good), ours)


def test_jwt_answers_that_are_not_our_jwt_svid_are_refused() -> None:
    key = b"k" * 32
    now = int(utc_now().timestamp())
    claims = {"sub": "spiffe://example/svc", "aud": ["a"], "iat": now, "exp": now + 60}
    good = jwt.encode(claims, key, algorithm="HS256")
    assert check_jwt_svid(wire.JWTSVIDResponse("spiffe://example/svc", good), ("a",))
    with pytest.raises(IdentityError, match="not a compact JWT"):
        check_jwt_svid(wire.JWTSVIDResponse("spiffe://example/svc", "a.b"), ("a",))
    with pytest.raises(IdentityError, match="other audiences"):
        check_jwt_svid(wire.JWTSVIDResponse("spiffe://example/svc", good), ("b",))
    with pytest.raises(IdentityError, match="SPIFFE ID"):
        check_jwt_svid(wire.JWTSVIDResponse("spiffe://example/other", good), ("a",))
