"""OIDC joins (github, gitlab, kubernetes, generic_oidc) as real processes on 127.0.0.1.

One local OIDC issuer (its own CA, keys, discovery and JWKS over HTTPS) and one auth
service that trusts it through ``SSL_CERT_FILE`` serve the whole module. Token
resources are created with ``tbot-py auth create -f``; each bot is the real CLI with
the environment its CI or platform would give it. Every refusal is one ERROR line that
names the failed check, never quotes the JWT, and leaves the destination untouched.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tbot_py.identity.tlsid import TLSIdentity
from tests.integration.conftest import (
    TBOT,
    AuthService,
    clean_env,
    error_lines,
    run_tbot,
    snapshot,
    start_auth_service,
    start_identity_args,
)
from tests.integration.oidc_issuer import GITHUB_TOKEN_PATH, LocalOIDCIssuer
from tests.integration.test_daemon import wait_for
from tests.integration.test_oneshot_identity import bot_tls_identity

pytestmark = pytest.mark.usefixtures("need_tools")  # openssl verifies every identity

#: How often the auth service may refetch one issuer's keys (JWKSCache.min_refresh).
JWKS_MIN_REFRESH = 30.0

# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOIDCIssuer]:
    with LocalOIDCIssuer(tmp_path_factory.mktemp("issuer")) as running:
        yield running


@dataclass(frozen=True)
class OIDCCluster:
    """The module's auth service and the OIDC issuer it trusts (via ``SSL_CERT_FILE``)."""

    auth: AuthService
    issuer: LocalOIDCIssuer


@pytest.fixture(scope="module")
def oidc(
    issuer: LocalOIDCIssuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OIDCCluster]:
    service = start_auth_service(
        tmp_path_factory.mktemp("auth") / "data", env={"SSL_CERT_FILE": str(issuer.ca_path)}
    )
    yield OIDCCluster(service, issuer)
    service.stop()


def create_resource(
    auth: AuthService, path: Path, doc: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return run_tbot("auth", "create", "-f", str(path), "--data-dir", str(auth.data_dir))


def token_doc(name: str, method: str, bot: str, section: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "token",
        "version": "v2",
        "metadata": {"name": name},
        "spec": {"roles": ["Bot"], "join_method": method, "bot_name": bot, method: section},
    }


def add_oidc_token(
    auth: AuthService, directory: Path, name: str, method: str, section: dict[str, Any]
) -> None:
    """A bot named ``name`` and a token resource ``name`` for it (the name is not a secret)."""
    auth.add_bot(name)
    done = create_resource(auth, directory / f"{name}.yaml", token_doc(name, method, name, section))
    assert done.returncode == 0, done.stderr


def oneshot(
    auth: AuthService, out: Path, method: str, token: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``start identity --oneshot`` with memory storage and the method's environment."""
    args = start_identity_args(auth, out, "memory://", "--join-method", method, "--token", token)
    return run_tbot(*args, env=clean_env(**env))


def oneshot_config(
    auth: AuthService, directory: Path, method: str, token: str, section: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """``start -c`` with a config file, for methods that need an ``onboarding`` section."""
    config = directory / "tbot.yaml"
    doc = {
        "version": "v2",
        "proxy_server": auth.addr,
        "onboarding": {
            "join_method": method,
            "token": token,
            "ca_pins": [auth.ca_pin],
            method: section,
        },
        "storage": {"type": "memory"},
        "oneshot": True,
        "services": [
            {
                "type": "identity",
                "destination": {"type": "directory", "path": str(directory / "out")},
            }
        ],
    }
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return run_tbot("start", "-c", str(config))


def assert_joined(
    done: subprocess.CompletedProcess[str], issuer: LocalOIDCIssuer, out: Path, bot: str
) -> TLSIdentity:
    """A clean, non-renewable identity for ``bot`` that openssl verifies; no JWT in the output."""
    assert done.returncode == 0, done.stderr
    assert_no_secrets(done, issuer)
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "teleport-user-ca.crt"), str(out / "tlscert")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    identity = bot_tls_identity(out)  # reads out/tlscert
    assert identity.bot_name == bot
    assert identity.bot_instance_id
    assert not identity.renewable  # delegated: re-joins with a fresh ID token, never renews
    return identity


def assert_refused(
    done: subprocess.CompletedProcess[str], issuer: LocalOIDCIssuer, out: Path, *words: str
) -> str:
    """Exit != 0, exactly one ERROR line holding each of ``words``, nothing written."""
    assert done.returncode != 0
    [line] = error_lines(done.stderr)
    for word in words:
        assert word.lower() in line.lower(), line
    assert "Traceback" not in done.stderr
    assert_no_secrets(done, issuer)
    assert snapshot(out) == {}
    return line


def assert_no_secrets(done: subprocess.CompletedProcess[str], issuer: LocalOIDCIssuer) -> None:
    output = done.stdout + done.stderr
    assert issuer.runtime_token not in output
    for token in issuer.minted:
        assert token not in output
        assert token.split(".")[2] not in output  # not even the signature part


def github_env(issuer: LocalOIDCIssuer, runtime_token: str | None = None) -> dict[str, str]:
    """What a GitHub Actions runner with ``id-token: write`` gives a job."""
    return {
        "GITHUB_ACTIONS": "true",
        "ACTIONS_ID_TOKEN_REQUEST_URL": f"{issuer.base}{GITHUB_TOKEN_PATH}?api-version=2.0",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": runtime_token or issuer.runtime_token,
        "SSL_CERT_FILE": str(issuer.ca_path),
    }


def github_claims(repository: str, ref: str) -> dict[str, Any]:
    owner = repository.split("/", maxsplit=1)[0]
    return {
        "sub": f"repo:{repository}:ref:{ref}",
        "repository": repository,
        "repository_owner": owner,
        "ref": ref,
        "ref_type": "branch",
        "workflow": "deploy",
        "actor": "octocat",
        "event_name": "push",
        "job_workflow_ref": f"{repository}/.github/workflows/deploy.yml@{ref}",
        "run_id": "4242",
    }


def gitlab_claims(project_path: str = "acme/infra", ref: str = "release-1.4") -> dict[str, Any]:
    return {
        "sub": f"project_path:{project_path}:ref_type:branch:ref:{ref}",
        "project_path": project_path,
        "namespace_path": project_path.rsplit("/", 1)[0],
        "pipeline_source": "push",
        "user_login": "dev",
        "user_id": "42",
        "user_email": "dev@example.com",
        "ref": ref,
        "ref_type": "branch",
        "ref_protected": "true",
    }


def k8s_claims(namespace: str, name: str, pod: str = "") -> dict[str, Any]:
    """A projected, pod-bound service account token's claims."""
    return {
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": pod or f"{name}-7d9f", "uid": "0b6a1c52-4b61-4c67-9d4c-8f1d7e0f2a11"},
            "serviceaccount": {"name": name, "uid": "5a1f2d3c-8e7b-4a6d-9c0e-1f2a3b4c5d6e"},
        },
    }


# -- github ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def github_token(oidc: OIDCCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    section = {
        "enterprise_server_host": oidc.issuer.host,  # issuer https://HOST/_services/token
        "allow": [{"repository": "acme/deploy", "ref": "refs/heads/main"}],
    }
    add_oidc_token(oidc.auth, tmp_path_factory.mktemp("gh"), "gha-deploy", "github", section)
    return "gha-deploy"


def test_github_actions_job_joins_with_its_id_token(
    oidc: OIDCCluster, github_token: str, tmp_path: Path
) -> None:
    oidc.issuer.github_claims = github_claims("acme/deploy", "refs/heads/main")
    out = tmp_path / "out"
    done = oneshot(oidc.auth, out, "github", github_token, **github_env(oidc.issuer))
    assert_joined(done, oidc.issuer, out, github_token)
    # The auth service found the keys under the GHES issuer it derived from the host.
    assert oidc.issuer.fetches("/_services/token")[1] >= 1


@pytest.mark.parametrize(
    "mismatch",
    [{"repository": "acme/other"}, {"ref": "refs/heads/feature"}],
    ids=["repository", "ref"],
)
def test_github_job_outside_the_allow_rule_is_refused(
    oidc: OIDCCluster, github_token: str, tmp_path: Path, mismatch: dict[str, str]
) -> None:
    claims = {"repository": "acme/deploy", "ref": "refs/heads/main", **mismatch}
    oidc.issuer.github_claims = github_claims(**claims)
    out = tmp_path / "out"
    done = oneshot(oidc.auth, out, "github", github_token, **github_env(oidc.issuer))
    [(name, value)] = mismatch.items()
    assert_refused(done, oidc.issuer, out, "HTTP 403", "match no allow rule", f'{name}="{value}"')


def test_github_token_request_with_a_wrong_runtime_token_is_one_error(
    oidc: OIDCCluster, github_token: str, tmp_path: Path
) -> None:
    oidc.issuer.github_claims = github_claims("acme/deploy", "refs/heads/main")
    out = tmp_path / "out"
    env = github_env(oidc.issuer, runtime_token="not-the-runtime-token")
    done = oneshot(oidc.auth, out, "github", github_token, **env)
    assert_refused(done, oidc.issuer, out, "HTTP 401", "ID token request was refused")
    assert "not-the-runtime-token" not in done.stderr


# -- gitlab ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gitlab_token(oidc: OIDCCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    section = {
        "domain": oidc.issuer.host,  # issuer https://127.0.0.1:PORT
        "allow": [{"project_path": "acme/infra", "ref": "release-*"}],
    }
    add_oidc_token(oidc.auth, tmp_path_factory.mktemp("gl"), "gitlab-release", "gitlab", section)
    return "gitlab-release"


def test_gitlab_job_joins_with_tbot_gitlab_jwt(
    oidc: OIDCCluster, gitlab_token: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    jwt_text = oidc.issuer.mint(gitlab_claims(ref="release-1.4"))
    done = oneshot(oidc.auth, out, "gitlab", gitlab_token, TBOT_GITLAB_JWT=jwt_text)
    assert_joined(done, oidc.issuer, out, gitlab_token)


@pytest.mark.parametrize(
    "mismatch",
    [{"project_path": "acme/other"}, {"ref": "main"}],  # main does not match release-*
    ids=["project_path", "ref-glob"],
)
def test_gitlab_job_outside_the_allow_rule_is_refused(
    oidc: OIDCCluster, gitlab_token: str, tmp_path: Path, mismatch: dict[str, str]
) -> None:
    out = tmp_path / "out"
    jwt_text = oidc.issuer.mint(gitlab_claims(**mismatch))
    done = oneshot(oidc.auth, out, "gitlab", gitlab_token, TBOT_GITLAB_JWT=jwt_text)
    [(name, value)] = mismatch.items()
    shown = f'{name}="{value}"'
    assert_refused(done, oidc.issuer, out, "HTTP 403", "match no allow rule", shown)


@pytest.mark.parametrize(
    ("mint_args", "reason"),
    [
        ({"audience": "https://gitlab.com"}, 'does not include "tbot-py.local"'),
        ({"expires_in": -600}, "id token expired at"),  # beyond the 60 s leeway
        ({"not_before": 600}, "id token is not valid until"),
        ({"key": "other"}, "signature does not verify"),  # same kid, an unpublished key
        ({"kid": "rsa-404"}, "is not among the issuer's keys"),
        ({"issuer_path": "/impostor"}, "id token issuer"),
        ({"alg": "HS256"}, 'algorithm "HS256" is not allowed'),  # public key as HMAC secret
    ],
    ids=[
        "wrong-audience",
        "expired",
        "not-yet-valid",
        "wrong-signature",
        "unknown-kid",
        "wrong-issuer",
        "hs256-confusion",
    ],
)
def test_gitlab_id_token_failing_verification_is_refused_with_its_reason(
    oidc: OIDCCluster, gitlab_token: str, tmp_path: Path, mint_args: dict[str, Any], reason: str
) -> None:
    out = tmp_path / "out"
    jwt_text = oidc.issuer.mint(gitlab_claims(), **mint_args)
    done = oneshot(oidc.auth, out, "gitlab", gitlab_token, TBOT_GITLAB_JWT=jwt_text)
    assert_refused(done, oidc.issuer, out, "HTTP 403", reason)


def test_a_name_that_is_no_token_is_not_valid(oidc: OIDCCluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    jwt_text = oidc.issuer.mint(gitlab_claims())
    done = oneshot(oidc.auth, out, "gitlab", "no-such-token", TBOT_GITLAB_JWT=jwt_text)
    assert_refused(done, oidc.issuer, out, "HTTP 403", "token is not valid")


# -- JWKS cache ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_idp(oidc: OIDCCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    section = {"issuer": oidc.issuer.issuer("/cached"), "allow": [{"sub": "svc:cached"}]}
    add_oidc_token(
        oidc.auth, tmp_path_factory.mktemp("cached"), "idp-cached", "generic_oidc", section
    )
    return "idp-cached"


def cached_join(oidc: OIDCCluster, directory: Path) -> subprocess.CompletedProcess[str]:
    """A generic_oidc join of ``idp-cached`` with an ID token read from a file."""
    directory.mkdir()
    id_token = directory / "id-token"
    id_token.write_text(oidc.issuer.mint({"sub": "svc:cached"}, issuer_path="/cached"))
    return oneshot_config(
        oidc.auth, directory, "generic_oidc", "idp-cached", {"path": str(id_token)}
    )


def test_jwks_is_fetched_once_for_many_joins(
    oidc: OIDCCluster, cached_idp: str, tmp_path: Path
) -> None:
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        assert_joined(cached_join(oidc, run), oidc.issuer, run / "out", cached_idp)
    assert oidc.issuer.fetches("/cached") == (1, 1)


# -- kubernetes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_static_token(oidc: OIDCCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    section = {
        "type": "static_jwks",
        "static_jwks": {"jwks": oidc.issuer.jwks_json()},
        "allow": [{"service_account": "apps:deployer"}],
    }
    add_oidc_token(oidc.auth, tmp_path_factory.mktemp("k8s"), "k8s-static", "kubernetes", section)
    return "k8s-static"


def k8s_join(
    auth: AuthService, tmp_path: Path, token: str, jwt_text: str
) -> subprocess.CompletedProcess[str]:
    sa_token = tmp_path / "sa-token"
    sa_token.write_text(jwt_text)
    return oneshot_config(auth, tmp_path, "kubernetes", token, {"token_path": str(sa_token)})


def test_kubernetes_static_jwks_joins_without_fetching_anything(
    oidc: OIDCCluster, k8s_static_token: str, tmp_path: Path
) -> None:
    jwt_text = oidc.issuer.mint(k8s_claims("apps", "deployer"), issuer_path="/air-gapped")
    done = k8s_join(oidc.auth, tmp_path, k8s_static_token, jwt_text)
    assert_joined(done, oidc.issuer, tmp_path / "out", k8s_static_token)
    assert oidc.issuer.hits_under("/air-gapped") == 0


def test_kubernetes_other_service_account_is_refused(
    oidc: OIDCCluster, k8s_static_token: str, tmp_path: Path
) -> None:
    jwt_text = oidc.issuer.mint(k8s_claims("apps", "intruder"), issuer_path="/air-gapped")
    done = k8s_join(oidc.auth, tmp_path, k8s_static_token, jwt_text)
    line = assert_refused(done, oidc.issuer, tmp_path / "out", "HTTP 403", "match no allow rule")
    assert 'service_account="apps:intruder"' in line
    assert oidc.issuer.hits_under("/air-gapped") == 0


def test_kubernetes_oidc_issuer_on_a_path_joins(oidc: OIDCCluster, tmp_path: Path) -> None:
    section = {
        "type": "oidc",
        "oidc": {"issuer": oidc.issuer.issuer("/clusters/prod")},
        "allow": [{"service_account": "apps:deployer"}],
    }
    add_oidc_token(oidc.auth, tmp_path, "k8s-oidc", "kubernetes", section)
    jwt_text = oidc.issuer.mint(k8s_claims("apps", "deployer"), issuer_path="/clusters/prod")
    done = k8s_join(oidc.auth, tmp_path, "k8s-oidc", jwt_text)
    assert_joined(done, oidc.issuer, tmp_path / "out", "k8s-oidc")
    assert oidc.issuer.fetches("/clusters/prod") == (1, 1)


# -- generic_oidc ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generic_token(oidc: OIDCCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    section = {
        "issuer": oidc.issuer.issuer("/idp"),
        "allow": [{"sub": "svc:builder", "groups": "deployers"}],
    }
    add_oidc_token(
        oidc.auth, tmp_path_factory.mktemp("idp"), "idp-builders", "generic_oidc", section
    )
    return "idp-builders"


def generic_join(
    auth: AuthService, tmp_path: Path, token: str, jwt_text: str
) -> subprocess.CompletedProcess[str]:
    id_token = tmp_path / "id-token"
    id_token.write_text(jwt_text)
    section = {"command": ["sh", "-c", f"cat {id_token}"]}
    return oneshot_config(auth, tmp_path, "generic_oidc", token, section)


def test_generic_oidc_token_from_a_command_joins(
    oidc: OIDCCluster, generic_token: str, tmp_path: Path
) -> None:
    claims = {"sub": "svc:builder", "groups": ["readers", "deployers"]}
    jwt_text = oidc.issuer.mint(claims, issuer_path="/idp")
    done = generic_join(oidc.auth, tmp_path, generic_token, jwt_text)
    assert_joined(done, oidc.issuer, tmp_path / "out", generic_token)


def test_generic_oidc_claim_outside_the_allow_rule_is_refused(
    oidc: OIDCCluster, generic_token: str, tmp_path: Path
) -> None:
    claims = {"sub": "svc:builder", "groups": ["readers"]}
    jwt_text = oidc.issuer.mint(claims, issuer_path="/idp")
    done = generic_join(oidc.auth, tmp_path, generic_token, jwt_text)
    assert_refused(done, oidc.issuer, tmp_path / "out", "HTTP 403", "match no allow rule")


def test_an_issuer_whose_certificate_is_not_trusted_is_unavailable(
    oidc: OIDCCluster, tmp_path: Path
) -> None:
    """A second issuer with its own CA, which the auth service's trust store lacks."""
    with LocalOIDCIssuer(tmp_path / "stranger") as stranger:
        section = {"issuer": stranger.issuer("/idp"), "allow": [{"sub": "svc:builder"}]}
        add_oidc_token(oidc.auth, tmp_path, "idp-stranger", "generic_oidc", section)
        jwt_text = stranger.mint({"sub": "svc:builder"}, issuer_path="/idp")
        done = generic_join(oidc.auth, tmp_path, "idp-stranger", jwt_text)
        assert_refused(
            done,
            stranger,
            tmp_path / "out",
            "HTTP 503",
            f'could not fetch the signing keys of issuer "{stranger.issuer("/idp")}": '
            "TLS certificate verification failed",
        )
        assert stranger.hits == {}  # the handshake failed: not one request was sent


# -- token resources ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (
            "carrier_pigeon",
            'spec.join_method: unknown join method "carrier_pigeon" '
            "(supported: github, gitlab, kubernetes, generic_oidc)",
        ),
        ("token", "spec.join_method: token-method join tokens are secrets: create them with "
         "tbot-py auth tokens add --bot NAME"),
    ],
)  # fmt: skip
def test_token_resource_with_an_unsupported_method_is_refused_by_create(
    oidc: OIDCCluster, tmp_path: Path, method: str, expected: str
) -> None:
    # A valid github section, so only the method can be what is refused.
    doc = token_doc("odd-method", "github", "nobody", {"allow": [{"repository": "acme/x"}]})
    doc["spec"]["join_method"] = method
    path = tmp_path / "token.yaml"
    done = create_resource(oidc.auth, path, doc)
    assert done.returncode != 0
    line = path.read_text().splitlines().index(f"  join_method: {method}") + 1
    assert error_lines(done.stderr) == [f"ERROR: {path}:{line}: {expected}"]
    assert "Traceback" not in done.stderr


# -- delegated renewal ----------------------------------------------------------------------


def test_daemon_rejoins_with_a_fresh_id_token_and_keeps_its_bot_instance(
    oidc: OIDCCluster, tmp_path: Path
) -> None:
    section = {
        "type": "static_jwks",
        "static_jwks": {"jwks": oidc.issuer.jwks_json()},
        "allow": [{"service_account": "batch:renewer"}],
    }
    add_oidc_token(oidc.auth, tmp_path, "k8s-renewer", "kubernetes", section)
    sa_token, storage = tmp_path / "sa-token", tmp_path / "storage"

    pods: list[str] = []

    def refresh() -> None:
        # As the kubelet does: a new projected token, atomically swapped in. Each names
        # another pod, which the audit log shows, so each join proves which file it read.
        pods.append(f"renewer-{len(pods)}")
        claims = k8s_claims("batch", "renewer", pod=pods[-1])
        staged = tmp_path / "sa-token.new"
        staged.write_text(oidc.issuer.mint(claims, issuer_path="/renewer"))
        staged.replace(sa_token)

    refresh()
    config = tmp_path / "tbot.yaml"
    doc = {
        "version": "v2",
        "proxy_server": oidc.auth.addr,
        "onboarding": {
            "join_method": "kubernetes",
            "token": "k8s-renewer",
            "ca_pins": [oidc.auth.ca_pin],
            "kubernetes": {"token_path": str(sa_token)},
        },
        "storage": {"type": "directory", "path": str(storage)},
        "credential_ttl": "30s",
        "renewal_interval": "5s",
        "services": [
            {
                "type": "identity",
                "destination": {"type": "directory", "path": str(tmp_path / "out")},
            }
        ],
    }
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen(
            [TBOT, "start", "-c", str(config)],
            stdout=subprocess.DEVNULL, stderr=log_file, text=True, env=clean_env(),
        )  # fmt: skip
    try:
        certs: list[bytes] = []

        def renewed() -> bool:
            path = storage / "tlscert"
            current = path.read_bytes() if path.exists() else b""
            if current and current not in certs:
                certs.append(current)
                refresh()  # every re-join must read the file again
            return len(certs) >= 4  # the join and three renewals

        wait_for(renewed, 60, f"three renewals (log: {log_path})")
        identities = [
            TLSIdentity.from_subject(x509.load_pem_x509_certificate(c).subject) for c in certs
        ]
        instance = identities[0].bot_instance_id
        assert instance
        assert {i.bot_instance_id for i in identities} == {instance}
        assert not any(i.renewable for i in identities)
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            raise
    assert code == 0
    log = log_path.read_text()
    assert "Traceback" not in log
    for token in oidc.issuer.minted:
        assert token not in log

    shown = run_tbot("auth", "audit", "--data-dir", str(oidc.auth.data_dir), "--format", "json")
    assert shown.returncode == 0, shown.stderr
    joins = [
        event
        for event in map(json.loads, shown.stdout.splitlines())
        if event["event"] == "bot.join" and event.get("actor", {}).get("bot") == "k8s-renewer"
    ]
    assert len(joins) >= 4
    assert all(j["success"] for j in joins)
    assert {j["actor"]["instance"] for j in joins} == {instance}
    # Every re-join read the token file afresh, and came over mTLS as the same instance.
    assert [j["details"]["claim.pod"] for j in joins] == pods[: len(joins)]
    assert [j["details"].get("rejoin", False) for j in joins] == [False] + [True] * (len(joins) - 1)


# -- key rotation (last: from here on every mint uses the new key) ------------------------


def test_a_rotated_in_key_is_fetched_again_and_accepted(
    oidc: OIDCCluster, cached_idp: str, tmp_path: Path
) -> None:
    if oidc.issuer.fetches("/cached")[1] == 0:  # run alone: the keys are not cached yet
        first = tmp_path / "first"
        assert_joined(cached_join(oidc, first), oidc.issuer, first / "out", cached_idp)
    # The auth service refetches an issuer's keys at most every 30 s (forged kids cannot
    # make it hammer the issuer); the rest of the module usually took longer than that.
    time.sleep(max(0.0, JWKS_MIN_REFRESH + 1 - oidc.issuer.seconds_since_jwks_fetch("/cached")))
    discovery, jwks = oidc.issuer.fetches("/cached")
    oidc.issuer.rotate()
    done = cached_join(oidc, tmp_path / "rotated")
    assert_joined(done, oidc.issuer, tmp_path / "rotated" / "out", cached_idp)
    assert oidc.issuer.fetches("/cached") == (discovery + 1, jwks + 1)
    assert len(oidc.issuer.jwks()["keys"]) == 2
