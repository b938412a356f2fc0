"""ID token verification: real RSA and EC keys, tokens signed with PyJWT, every check's message."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tbot_py.authservice.idtoken import (
    GITHUB_ISSUER,
    IDTokenRejected,
    JoinAttributes,
    UnknownSigningKey,
    expected_audience,
    expected_issuer,
    verify_id_token,
)
from tbot_py.authservice.join_tokens import JoinToken, join_token_from_data, parse_jwks

CLUSTER = "tbot-py.local"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    """The public JWK of ``key``."""
    if isinstance(key, rsa.RSAPrivateKey):
        data = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        data = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**data, "kid": kid}


def jwks_text(*pairs: tuple[PrivateKey, str]) -> str:
    return json.dumps({"keys": [jwk(key, kid) for key, kid in pairs]})


KEYS = parse_jwks(jwks_text((RSA_KEY, "rsa-1"), (EC_KEY, "ec-1")))


def sign(
    claims: dict[str, Any],
    key: PrivateKey = RSA_KEY,
    *,
    kid: str | None = "rsa-1",
    algorithm: str = "RS256",
) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def times(**delta: float) -> dict[str, int]:
    """``iat``/``exp`` around NOW; keyword seconds override (e.g. ``exp=-120``)."""
    base = {"iat": -30.0, "exp": 300.0, **delta}
    return {name: int((NOW + timedelta(seconds=value)).timestamp()) for name, value in base.items()}


def token_resource(method: str, section: dict[str, Any], name: str = "t1") -> JoinToken:
    return join_token_from_data(
        {
            "kind": "token",
            "version": "v2",
            "metadata": {"name": name},
            "spec": {"join_method": method, "bot_name": "bot1", method: section},
        }
    )


GITHUB = token_resource(
    "github",
    {"allow": [{"repository": "acme/app", "ref": "refs/heads/main"}, {"actor": "alice"}]},
)

GITHUB_CLAIMS: dict[str, Any] = {
    "iss": GITHUB_ISSUER,
    "aud": CLUSTER,
    "sub": "repo:acme/app:ref:refs/heads/main",
    "repository": "acme/app",
    "repository_owner": "acme",
    "workflow": "deploy",
    "actor": "bob",
    "ref": "refs/heads/main",
    "ref_type": "branch",
    "event_name": "push",
    "sha": "0" * 40,
    "run_id": "42",
    "job_workflow_ref": "not recorded",
    **times(),
}


def verify(
    resource: JoinToken, id_token: str, keys: jwt.PyJWKSet = KEYS, now: datetime = NOW
) -> JoinAttributes:
    return verify_id_token(resource, id_token, keys, cluster_name=CLUSTER, now=now)


def rejected(resource: JoinToken, id_token: str, keys: jwt.PyJWKSet = KEYS) -> str:
    with pytest.raises(IDTokenRejected) as caught:
        verify(resource, id_token, keys)
    assert caught.value.status == 403
    message = caught.value.message
    assert "\n" not in message
    if id_token:
        assert id_token not in message
    parts = id_token.split(".")
    if len(parts) == 3 and len(parts[2]) >= 20:
        assert parts[2][:20] not in message
    return message


# --- github ------------------------------------------------------------------------------------


def test_github_accepts_and_records_identifying_claims() -> None:
    attributes = verify(GITHUB, sign(GITHUB_CLAIMS))
    assert attributes.join_method == "github"
    assert attributes.token_name == "t1"
    assert attributes.claims == {
        "sub": "repo:acme/app:ref:refs/heads/main",
        "repository": "acme/app",
        "repository_owner": "acme",
        "workflow": "deploy",
        "actor": "bob",
        "ref": "refs/heads/main",
        "ref_type": "branch",
        "event_name": "push",
        "sha": "0" * 40,
        "run_id": "42",
    }


def test_github_second_rule_admits() -> None:
    claims = {**GITHUB_CLAIMS, "ref": "refs/heads/dev", "actor": "alice"}
    assert verify(GITHUB, sign(claims)).claims["ref"] == "refs/heads/dev"


def test_github_no_matching_rule_lists_the_claims_looked_at() -> None:
    claims = {**GITHUB_CLAIMS, "ref": "refs/heads/" + "x" * 100}
    assert rejected(GITHUB, sign(claims)) == (
        'id token claims match no allow rule of token "t1" (repository="acme/app", '
        f'ref="refs/heads/{"x" * 53}...", actor="bob")'
    )


def test_github_missing_claim_does_not_match() -> None:
    claims = {k: v for k, v in GITHUB_CLAIMS.items() if k not in ("ref", "actor")}
    assert rejected(GITHUB, sign(claims)) == (
        'id token claims match no allow rule of token "t1" '
        '(repository="acme/app", ref=(none), actor=(none))'
    )


def test_github_enterprise_issuers() -> None:
    slug = token_resource("github", {"enterprise_slug": "acme", "allow": [{"actor": "bob"}]})
    server = token_resource(
        "github", {"enterprise_server_host": "ghe.example.com", "allow": [{"actor": "bob"}]}
    )
    assert expected_issuer(GITHUB) == "https://token.actions.githubusercontent.com"
    assert expected_issuer(slug) == "https://token.actions.githubusercontent.com/acme"
    assert expected_issuer(server) == "https://ghe.example.com/_services/token"
    assert verify(slug, sign({**GITHUB_CLAIMS, "iss": f"{GITHUB_ISSUER}/acme"})).claims
    assert rejected(server, sign(GITHUB_CLAIMS)) == (
        f'id token issuer "{GITHUB_ISSUER}" is not "https://ghe.example.com/_services/token"'
    )


# --- signature and registered claims -----------------------------------------------------------


def test_ec_key_and_pss_are_accepted() -> None:
    assert verify(GITHUB, sign(GITHUB_CLAIMS, EC_KEY, kid="ec-1", algorithm="ES256")).claims
    assert verify(GITHUB, sign(GITHUB_CLAIMS, kid="rsa-1", algorithm="PS256")).claims
    assert verify(GITHUB, sign(GITHUB_CLAIMS, kid="rsa-1", algorithm="RS512")).claims


def test_no_kid_with_one_fitting_key_uses_it() -> None:
    assert verify(GITHUB, sign(GITHUB_CLAIMS, kid=None)).claims  # the one RSA key
    two = parse_jwks(jwks_text((RSA_KEY, "a"), (OTHER_RSA_KEY, "b")))
    assert rejected(GITHUB, sign(GITHUB_CLAIMS, kid=None), two) == (
        "id token names no signing key (kid) and the issuer has 2 RS256 keys"
    )


def test_unknown_kid_is_its_own_error() -> None:
    with pytest.raises(UnknownSigningKey, match='signing key "rotated" is not among'):
        verify(GITHUB, sign(GITHUB_CLAIMS, OTHER_RSA_KEY, kid="rotated"))


def test_wrong_signature_same_kid() -> None:
    forged = sign(GITHUB_CLAIMS, OTHER_RSA_KEY, kid="rsa-1")
    assert rejected(GITHUB, forged) == "id token signature does not verify with the issuer's keys"


def test_key_of_the_wrong_type_for_the_algorithm() -> None:
    confused = sign(GITHUB_CLAIMS, EC_KEY, kid="rsa-1", algorithm="ES256")
    assert rejected(GITHUB, confused) == (
        "id token signature does not verify with the issuer's keys"
    )


def test_tampered_payload_fails_the_signature() -> None:
    header, _, signature = sign(GITHUB_CLAIMS).split(".")
    payload = base64.urlsafe_b64encode(
        json.dumps({**GITHUB_CLAIMS, "repository": "evil/app"}).encode()
    )
    tampered = f"{header}.{payload.decode().rstrip('=')}.{signature}"
    assert rejected(GITHUB, tampered) == (
        "id token signature does not verify with the issuer's keys"
    )


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


@pytest.mark.parametrize("algorithm", ["none", "HS256"])
def test_none_and_hmac_are_refused(algorithm: str) -> None:
    if algorithm == "none":
        token = f"{b64({'alg': 'none', 'kid': 'rsa-1'})}.{b64(GITHUB_CLAIMS)}."
    else:  # an HMAC token: the key-confusion attack on RSA keys
        token = jwt.encode(
            GITHUB_CLAIMS, b"public-key-bytes" * 4, algorithm="HS256", headers={"kid": "rsa-1"}
        )
    assert rejected(GITHUB, token) == f'id token algorithm "{algorithm}" is not allowed'


@pytest.mark.parametrize("text", ["", "abc", "a.b.c", "....", "x" * 70000])
def test_malformed(text: str) -> None:
    assert rejected(GITHUB, text) == "id token is not a well-formed JWT"


def test_payload_that_is_not_an_object_is_malformed() -> None:
    token = jwt.api_jws.encode(b"[1, 2]", RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"})
    assert rejected(GITHUB, token) == "id token is not a well-formed JWT"


def test_wrong_audience() -> None:
    claims = {**GITHUB_CLAIMS, "aud": ["sts.amazonaws.com", "other"]}
    assert rejected(GITHUB, sign(claims)) == (
        'id token audience ["sts.amazonaws.com", "other"] does not include "tbot-py.local"'
    )
    assert verify(GITHUB, sign({**claims, "aud": ["x", CLUSTER]})).claims
    no_aud = {k: v for k, v in GITHUB_CLAIMS.items() if k != "aud"}
    assert rejected(GITHUB, sign(no_aud)) == (
        'id token audience [] does not include "tbot-py.local"'
    )


def test_expiry_rules() -> None:
    no_exp = {k: v for k, v in GITHUB_CLAIMS.items() if k != "exp"}
    assert rejected(GITHUB, sign(no_exp)) == "id token has no expiry (exp)"
    assert rejected(GITHUB, sign({**GITHUB_CLAIMS, **times(exp=-61)})) == (
        "id token expired at 2026-06-01T11:58:59Z"
    )
    assert verify(GITHUB, sign({**GITHUB_CLAIMS, **times(exp=-59)})).claims  # leeway
    assert rejected(GITHUB, sign({**GITHUB_CLAIMS, "exp": "soon"})) == (
        'id token claim "exp" is not a number'
    )


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid(claim: str) -> None:
    assert rejected(GITHUB, sign({**GITHUB_CLAIMS, **times(**{claim: 120})})) == (
        "id token is not valid until 2026-06-01T12:02:00Z"
    )
    assert verify(GITHUB, sign({**GITHUB_CLAIMS, **times(**{claim: 50})})).claims


def test_time_checks_use_the_given_now_not_the_wall_clock() -> None:
    token = sign(GITHUB_CLAIMS)
    assert verify(GITHUB, token, now=NOW).claims
    with pytest.raises(IDTokenRejected, match="expired at"):
        verify(GITHUB, token, now=NOW + timedelta(minutes=10))


def test_issuer_mismatch() -> None:
    claims = {**GITHUB_CLAIMS, "iss": "https://evil.example.com"}
    assert rejected(GITHUB, sign(claims)) == (
        f'id token issuer "https://evil.example.com" is not "{GITHUB_ISSUER}"'
    )
    no_iss = {k: v for k, v in GITHUB_CLAIMS.items() if k != "iss"}
    assert rejected(GITHUB, sign(no_iss)) == f'id token issuer (none) is not "{GITHUB_ISSUER}"'


# --- gitlab ------------------------------------------------------------------------------------

GITLAB = token_resource(
    "gitlab",
    {
        "domain": "gitlab.example.com",
        "allow": [{"project_path": "group/*", "ref": "rel-?", "ref_protected": True}],
    },
)
GITLAB_CLAIMS: dict[str, Any] = {
    "iss": "https://gitlab.example.com",
    "aud": CLUSTER,
    "sub": "project_path:group/app:ref_type:branch:ref:rel-1",
    "project_path": "group/app",
    "namespace_path": "group",
    "ref": "rel-1",
    "ref_type": "branch",
    "ref_protected": "true",
    "pipeline_id": "1234",
    **times(),
}


def test_gitlab_globs_and_booleans() -> None:
    attributes = verify(GITLAB, sign(GITLAB_CLAIMS))
    assert attributes.claims == {
        "sub": "project_path:group/app:ref_type:branch:ref:rel-1",
        "project_path": "group/app",
        "ref": "rel-1",
        "ref_protected": "true",
        "pipeline_id": "1234",
    }
    assert verify(GITLAB, sign({**GITLAB_CLAIMS, "ref_protected": True})).claims
    for change in (
        {"ref_protected": "false"},
        {"ref_protected": False},
        {"ref": "rel-10"},
        {"project_path": "other/app"},
        {"project_path": "group"},
    ):
        message = rejected(GITLAB, sign({**GITLAB_CLAIMS, **change}))
        assert message.startswith('id token claims match no allow rule of token "t1" (')
        assert "project_path=" in message
        assert "ref_protected=" in message


def test_gitlab_issuer_is_the_domain() -> None:
    assert expected_issuer(GITLAB) == "https://gitlab.example.com"
    assert rejected(GITLAB, sign({**GITLAB_CLAIMS, "iss": "https://gitlab.com"})) == (
        'id token issuer "https://gitlab.com" is not "https://gitlab.example.com"'
    )


# --- kubernetes --------------------------------------------------------------------------------

KUBE_JWKS = jwks_text((EC_KEY, "k8s"))
KUBE = token_resource(
    "kubernetes",
    {
        "type": "static_jwks",
        "static_jwks": {"jwks": KUBE_JWKS},
        "allow": [{"service_account": "apps:deployer"}],
    },
)
KUBE_KEYS = parse_jwks(KUBE_JWKS)


def kube_claims(namespace: str = "apps", name: str = "deployer", **extra: Any) -> dict[str, Any]:
    return {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "aud": [CLUSTER],
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": "u-1"},
            "pod": {"name": "deployer-7f9", "uid": "p-1"},
        },
        **times(),
        **extra,
    }


def kube_sign(claims: dict[str, Any]) -> str:
    return sign(claims, EC_KEY, kid="k8s", algorithm="ES256")


def test_kubernetes_static_jwks_has_no_issuer_check() -> None:
    assert expected_issuer(KUBE) is None
    attributes = verify(KUBE, kube_sign(kube_claims(iss="https://anything")), KUBE_KEYS)
    assert attributes.claims == {"service_account": "apps:deployer", "pod": "deployer-7f9"}


def test_kubernetes_service_account_from_either_claim_form() -> None:
    only_sub = {k: v for k, v in kube_claims().items() if k != "kubernetes.io"}
    assert verify(KUBE, kube_sign(only_sub), KUBE_KEYS).claims == {
        "service_account": "apps:deployer"
    }
    only_block = {k: v for k, v in kube_claims().items() if k != "sub"}
    assert verify(KUBE, kube_sign(only_block), KUBE_KEYS).claims["service_account"] == (
        "apps:deployer"
    )


def test_kubernetes_claim_forms_must_agree() -> None:
    claims = {**kube_claims(), "sub": "system:serviceaccount:apps:admin"}
    assert rejected(KUBE, kube_sign(claims), KUBE_KEYS) == (
        'id token service account claims disagree ("kubernetes.io" says "apps:deployer", '
        'sub says "apps:admin")'
    )


def test_kubernetes_other_account_and_no_account() -> None:
    assert rejected(KUBE, kube_sign(kube_claims(name="admin")), KUBE_KEYS) == (
        'id token claims match no allow rule of token "t1" (service_account="apps:admin")'
    )
    bare = {k: v for k, v in kube_claims().items() if k not in ("sub", "kubernetes.io")}
    assert rejected(KUBE, kube_sign(bare), KUBE_KEYS) == (
        "id token names no Kubernetes service account"
    )


def test_kubernetes_oidc_checks_its_issuer() -> None:
    resource = token_resource(
        "kubernetes",
        {
            "type": "oidc",
            "oidc": {"issuer": "https://oidc.example.com/id/X/"},
            "allow": [{"service_account": "apps:deployer"}],
        },
    )
    assert expected_issuer(resource) == "https://oidc.example.com/id/X"
    good = kube_claims(iss="https://oidc.example.com/id/X")
    assert verify(resource, kube_sign(good), KUBE_KEYS).claims
    assert rejected(resource, kube_sign(kube_claims()), KUBE_KEYS).startswith(
        'id token issuer "https://kubernetes.default.svc.cluster.local" is not'
    )


# --- generic_oidc ------------------------------------------------------------------------------

GENERIC = token_resource(
    "generic_oidc",
    {
        "issuer": "https://idp.example.com",
        "audience": "tbot",
        "allow": [{"sub": "svc-1", "groups": "deployers", "admin": True}, {"level": 3}],
    },
)
GENERIC_CLAIMS: dict[str, Any] = {
    "iss": "https://idp.example.com",
    "aud": "tbot",
    "sub": "svc-1",
    "groups": ["readers", "deployers"],
    "admin": True,
    "email": "not recorded",
    **times(),
}


def test_generic_oidc_audience_lists_and_scalars() -> None:
    assert expected_audience(GENERIC, CLUSTER) == "tbot"
    assert expected_audience(GITHUB, CLUSTER) == CLUSTER
    attributes = verify(GENERIC, sign(GENERIC_CLAIMS))
    assert attributes.claims == {"sub": "svc-1", "groups": "readers,deployers", "admin": "true"}
    assert verify(GENERIC, sign({**GENERIC_CLAIMS, "admin": False, "level": 3})).claims
    assert verify(GENERIC, sign({**GENERIC_CLAIMS, "groups": "deployers"})).claims


def test_generic_oidc_refusals() -> None:
    assert rejected(GENERIC, sign({**GENERIC_CLAIMS, "groups": ["readers"]})) == (
        'id token claims match no allow rule of token "t1" '
        '(sub="svc-1", groups="readers", admin="true", level=(none))'
    )
    assert rejected(GENERIC, sign({**GENERIC_CLAIMS, "aud": CLUSTER})) == (
        'id token audience ["tbot-py.local"] does not include "tbot"'
    )


def test_attribute_values_are_capped() -> None:
    long_actor = "a" * 1000
    claims = {**GITHUB_CLAIMS, "actor": long_actor, "workflow": {"nested": "dropped"}}
    attributes = verify(GITHUB, sign(claims))
    assert attributes.claims["actor"] == "a" * 256
    assert "workflow" not in attributes.claims
