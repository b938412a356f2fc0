"""The ``workload-identity-x509`` and ``workload-identity-jwt`` outputs end to end.

A real ``auth start`` process, the role and ``workload_identity`` resource created with the
CLI, and ``tbot-py start ... --oneshot`` writing tbot's artifacts: ``openssl`` verifies the
X.509 SVID against the written bundle, and PyJWT verifies the JWT-SVID using only the
service's discovery document and the JWKS it names.
"""

from __future__ import annotations

import itertools
import json
import ssl
import subprocess
import urllib.request
from pathlib import Path

import jwt
import pytest

from tbot_py.client import wire
from tbot_py.identity.model import Identity
from tests.integration.conftest import AuthService, clean_env, run_tbot
from tests.integration.test_workload_identity import RESOURCE, ROLE

X509_ARTIFACTS = {"svid.pem", "svid_key.pem", "svid_bundle.pem"}
_BOTS = itertools.count(1)


def _openssl(*argv: str) -> str:
    done = subprocess.run(["openssl", *argv], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"openssl {argv}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def resources(auth: AuthService, tmp_path_factory: pytest.TempPathFactory) -> AuthService:
    folder = tmp_path_factory.mktemp("resources")
    for name, text in (("role.yaml", ROLE), ("wi.yaml", RESOURCE)):
        (folder / name).write_text(text)
        done = run_tbot(
            "auth", "create", "-f", str(folder / name), "--data-dir", str(auth.data_dir)
        )
        assert done.returncode == 0, done.stderr
    return auth


def _artifacts(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if not p.name.startswith(".")} if out.exists() else set()


def _cluster_trust(storage: Path) -> ssl.SSLContext:
    """Trust the cluster's TLS CA, as the bot stored it (nothing else)."""
    loaded = Identity.from_bot_artifacts(
        {path.name: path.read_bytes() for path in storage.iterdir() if path.is_file()}
    )
    assert loaded is not None
    return ssl.create_default_context(cadata=b"".join(loaded[0].tls_ca_pems).decode())


def _verify_jwt(addr: str, ctx: ssl.SSLContext, token: str, audience: str) -> dict[str, object]:
    with urllib.request.urlopen(
        f"https://{addr}{wire.PATH_OPENID_CONFIGURATION}", context=ctx
    ) as answer:
        discovery = json.load(answer)
    client = jwt.PyJWKClient(discovery["jwks_uri"], ssl_context=ctx, cache_keys=False)
    claims: dict[str, object] = jwt.decode(
        token,
        client.get_signing_key_from_jwt(token),
        algorithms=discovery["id_token_signing_alg_values_supported"],
        audience=audience,
        issuer=discovery["issuer"],
    )
    return claims


def _check_x509(out: Path, spiffe_id: str) -> None:
    assert _artifacts(out) == X509_ARTIFACTS
    verified = _openssl("verify", "-CAfile", str(out / "svid_bundle.pem"), str(out / "svid.pem"))
    assert verified.strip() == f"{out / 'svid.pem'}: OK"
    san = _openssl("x509", "-in", str(out / "svid.pem"), "-noout", "-ext", "subjectAltName")
    assert f"URI:{spiffe_id}" in san.split()
    assert _openssl("pkey", "-in", str(out / "svid_key.pem"), "-pubout") == _openssl(
        "x509", "-in", str(out / "svid.pem"), "-noout", "-pubkey"
    )


def test_one_config_with_both_outputs(
    resources: AuthService, tmp_path: Path, need_tools: None
) -> None:
    auth = resources
    bot = f"pay-{next(_BOTS)}"
    token = auth.add_bot(bot, roles="workloads")
    storage = tmp_path / "storage"
    config = tmp_path / "tbot.yaml"
    config.write_text(
        f"""\
version: v2
proxy_server: {auth.addr}
onboarding: {{ca_pins: ["{auth.ca_pin}"]}}
storage: {{type: directory, path: {storage}}}
oneshot: true
services:
  - type: workload-identity-x509
    destination: {{type: directory, path: {tmp_path / "svid"}}}
    selector: {{name: payments}}
  - type: workload-identity-jwt
    destination: {{type: directory, path: {tmp_path / "jwt"}}}
    selector: {{labels: {{team: [payments]}}}}
    audiences: [mcp-gateway]
"""
    )
    done = run_tbot("start", "-c", str(config), env=clean_env(TELEPORT_BOT_TOKEN=token))
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout + done.stderr
    (cluster,) = {line.split("spiffe://")[1].split("/")[0] for line in done.stderr.splitlines()
                  if "X.509 SVID spiffe://" in line}  # fmt: skip
    spiffe_id = f"spiffe://{cluster}/svc/{bot}"
    _check_x509(tmp_path / "svid", spiffe_id)
    assert _artifacts(tmp_path / "jwt") == {"jwt_svid"}
    token_text = (tmp_path / "jwt" / "jwt_svid").read_text()
    claims = _verify_jwt(auth.addr, _cluster_trust(storage), token_text, "mcp-gateway")
    assert claims["sub"] == spiffe_id
    with pytest.raises(jwt.InvalidAudienceError):
        _verify_jwt(auth.addr, _cluster_trust(storage), token_text, "someone-else")


def test_start_subcommands_with_flags(
    resources: AuthService, tmp_path: Path, need_tools: None
) -> None:
    auth = resources
    bot = f"flags-{next(_BOTS)}"
    token = auth.add_bot(bot, roles="workloads")
    common = [
        "--proxy-server", auth.addr,
        "--ca-pin", auth.ca_pin,
        "--storage", str(tmp_path / "storage"),
        "--oneshot",
    ]  # fmt: skip
    env = clean_env(TELEPORT_BOT_TOKEN=token)
    done = run_tbot(
        "start", "workload-identity-x509", *common,
        "--destination", str(tmp_path / "svid"),
        "--label-selector", "team=payments",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first_key = (tmp_path / "svid" / "svid_key.pem").read_bytes()
    done = run_tbot(
        "start", "workload-identity-jwt", *common,
        "--destination", str(tmp_path / "jwt"),
        "--name-selector", "payments",
        "--audience", "a", "--audience", "b",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    claims = _verify_jwt(
        auth.addr,
        _cluster_trust(tmp_path / "storage"),
        (tmp_path / "jwt" / "jwt_svid").read_text(),
        "b",
    )
    spiffe_id = str(claims["sub"])
    assert spiffe_id.startswith("spiffe://") and spiffe_id.endswith(f"/svc/{bot}")
    _check_x509(tmp_path / "svid", spiffe_id)
    # A second run renews the bot identity and writes a fresh SVID key.
    done = run_tbot(
        "start", "workload-identity-x509", *common,
        "--destination", str(tmp_path / "svid"),
        "--label-selector", "team=payments",
        env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "svid" / "svid_key.pem").read_bytes() != first_key
    _check_x509(tmp_path / "svid", spiffe_id)


def test_a_bot_whose_roles_do_not_allow_the_resource_gets_one_error(
    resources: AuthService, tmp_path: Path
) -> None:
    auth = resources
    token = auth.add_bot(f"denied-{next(_BOTS)}", roles="access")
    done = run_tbot(
        "start", "workload-identity-x509",
        "--proxy-server", auth.addr,
        "--ca-pin", auth.ca_pin,
        "--storage", str(tmp_path / "storage"),
        "--destination", str(tmp_path / "svid"),
        "--name-selector", "payments",
        "--oneshot",
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr
    assert "payments" in errors[0] and "workload-identity-x509" in errors[0]
    assert token not in done.stderr
    assert _artifacts(tmp_path / "svid") == set()
