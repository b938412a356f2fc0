"""Workload identity against a real ``auth start`` process and a bot joined by the real CLI.

The bot's stored identity calls the SVID endpoints with the bot's own HTTP client; the
X.509 SVID is checked with ``openssl verify``, the JWT-SVID with PyJWT using only the
service's discovery document and JWKS, over HTTPS, and the keys survive a restart.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import urllib.request
from pathlib import Path

import jwt
import pytest

from tbot_py.client import tls, wire
from tbot_py.client.http import AuthClient
from tbot_py.identity.model import Identity
from tests.integration.conftest import (
    AuthService,
    clean_env,
    run_tbot,
    start_auth_service,
    start_identity_args,
)

ROLE = """\
kind: role
version: v7
metadata: {name: workloads}
spec:
  allow:
    workload_identity_labels: {team: payments}
"""

RESOURCE = """\
kind: workload_identity
version: v1
metadata: {name: payments, labels: {team: payments}}
spec:
  spiffe: {id: '/svc/{{user.bot_name}}'}
"""


def admin(auth: AuthService, *args: str) -> str:
    done = run_tbot("auth", *args, "--data-dir", str(auth.data_dir))
    assert done.returncode == 0, done.stderr
    return done.stdout


def stored_identity(storage: Path) -> Identity:
    """The bot identity as the daemon reads it (``tlscacerts`` is ``$``-separated)."""
    loaded = Identity.from_bot_artifacts(
        {path.name: path.read_bytes() for path in storage.iterdir() if path.is_file()}
    )
    assert loaded is not None
    return loaded[0]


def bot_context(storage: Path) -> ssl.SSLContext:
    identity = stored_identity(storage)
    return tls.mtls_context(identity.tls_cert_pem, identity.private_key_pem, identity.tls_ca_pems)


def issue(
    addr: str, storage: Path, public_key: bytes
) -> tuple[wire.X509SVIDResponse, wire.JWTSVIDResponse]:
    selector = wire.WorkloadIdentitySelector(name="payments")

    async def calls() -> tuple[wire.X509SVIDResponse, wire.JWTSVIDResponse]:
        async with AuthClient(addr, bot_context(storage), timeout=10.0) as api:
            return (
                await api.issue_x509_svid(wire.X509SVIDRequest(selector, public_key)),
                await api.issue_jwt_svid(wire.JWTSVIDRequest(selector, ("mcp-gateway",))),
            )

    return asyncio.run(calls())


def trust_context(storage: Path) -> ssl.SSLContext:
    cadata = b"".join(stored_identity(storage).tls_ca_pems).decode()
    return ssl.create_default_context(cadata=cadata)


def verify_jwt(addr: str, storage: Path, token: str, audience: str) -> dict[str, object]:
    """PyJWT as a third party: discovery, then the JWKS it names, nothing else."""
    ctx = trust_context(storage)
    with urllib.request.urlopen(
        f"https://{addr}{wire.PATH_OPENID_CONFIGURATION}", context=ctx
    ) as r:
        config = json.load(r)
    client = jwt.PyJWKClient(config["jwks_uri"], ssl_context=ctx, cache_keys=False)
    claims: dict[str, object] = jwt.decode(
        token,
        client.get_signing_key_from_jwt(token),
        algorithms=config["id_token_signing_alg_values_supported"],
        audience=audience,
        issuer=config["issuer"],
    )
    return claims


def test_bot_gets_svids_that_openssl_and_pyjwt_verify_across_a_restart(
    tmp_path: Path, need_tools: None
) -> None:
    data_dir = tmp_path / "auth"
    auth = start_auth_service(data_dir)
    try:
        (tmp_path / "role.yaml").write_text(ROLE)
        (tmp_path / "wi.yaml").write_text(RESOURCE)
        admin(auth, "create", "-f", str(tmp_path / "role.yaml"))
        assert admin(auth, "create", "-f", str(tmp_path / "wi.yaml")) == (
            'workload identity "payments" has been created\n'
        )
        token = auth.add_bot("svc", roles="workloads")
        storage = tmp_path / "storage"
        done = run_tbot(
            *start_identity_args(auth, tmp_path / "out", storage),
            env=clean_env(TELEPORT_BOT_TOKEN=token),
        )
        assert done.returncode == 0, done.stderr

        subprocess.run(
            ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
             "-out", str(tmp_path / "svid_key.pem")],
            check=True, capture_output=True,
        )  # fmt: skip
        public_pem = subprocess.run(
            ["openssl", "ec", "-in", str(tmp_path / "svid_key.pem"), "-pubout"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        x509_svid, jwt_svid = issue(auth.addr, storage, public_pem)
        (tmp_path / "svid.pem").write_bytes(x509_svid.svid)
        (tmp_path / "svid_bundle.pem").write_bytes(x509_svid.bundle)
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", str(tmp_path / "svid_bundle.pem"),
             str(tmp_path / "svid.pem")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stderr
        # The SVID is for the key we generated with openssl.
        public_keys = [
            subprocess.run(argv, check=True, capture_output=True).stdout
            for argv in (
                ["openssl", "x509", "-in", str(tmp_path / "svid.pem"), "-noout", "-pubkey"],
                ["openssl", "ec", "-in", str(tmp_path / "svid_key.pem"), "-pubout"],
            )
        ]
        assert public_keys[0] == public_keys[1]
        assert x509_svid.spiffe_id == "spiffe://tbot-py.local/svc/svc"

        claims = verify_jwt(auth.addr, storage, jwt_svid.jwt, "mcp-gateway")
        assert claims["sub"] == "spiffe://tbot-py.local/svc/svc"
        with pytest.raises(jwt.InvalidAudienceError):
            verify_jwt(auth.addr, storage, jwt_svid.jwt, "another-gateway")
    finally:
        auth.stop()

    # After a restart the JWKS still holds the key that signed it. The issuer names the
    # listen address, which a restart on port 0 changes, so only the signature is checked.
    again = start_auth_service(data_dir)
    try:
        url = f"https://{again.addr}{wire.PATH_JWKS}"
        jwks = jwt.PyJWKClient(url, ssl_context=trust_context(storage), cache_keys=False)
        key = jwks.get_signing_key_from_jwt(jwt_svid.jwt)
        restarted = jwt.decode(jwt_svid.jwt, key, algorithms=["ES256"], audience="mcp-gateway")
        assert restarted["sub"] == claims["sub"]
    finally:
        again.stop()
