"""Verify an OIDC ID token (JWT) against a ``token`` resource (:mod:`.join_tokens`).

Pure apart from the signing keys it is given (:mod:`.jwks` fetches and caches them).
The checks run in a fixed order and the first failure ends with one line saying
what failed; no message ever quotes the JWT itself:

1. the JWT is well formed and its algorithm is on the allow-list (RSA, RSA-PSS, ECDSA);
2. the key named by ``kid`` is in the set (else :class:`UnknownSigningKey`, which the
   caller answers by refetching the keys once) and the signature verifies with it;
3. ``iss`` (except kubernetes ``static_jwks``), ``aud``, ``exp``, ``nbf``/``iat``
   with :data:`LEEWAY`;
4. the method's ``allow`` rules: any rule whose every field matches admits.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from jwt.api_jws import PyJWS

from tbot_py.authservice.errors import AccessDenied
from tbot_py.authservice.join_tokens import (
    ALLOWED_ALGORITHMS,
    GenericOIDCSpec,
    GitHubSpec,
    GitLabSpec,
    JoinToken,
    KubernetesSpec,
    key_fits_algorithm,
    scalar_text,
)

#: Clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
LEEWAY = timedelta(seconds=60)
#: GitHub's ID token issuer (github.com and GitHub Enterprise Cloud without a slug).
GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
#: Longest JWT accepted; real ID tokens are a few KiB.
MAX_ID_TOKEN_LENGTH = 64 * 1024
#: Longest value kept in :attr:`JoinAttributes.claims`.
MAX_ATTRIBUTE_LENGTH = 256
_SHOWN_VALUE_LENGTH = 64

#: The claims a GitHub join records.
GITHUB_ATTRIBUTE_CLAIMS = (
    "sub",
    "repository",
    "repository_owner",
    "workflow",
    "environment",
    "actor",
    "ref",
    "ref_type",
    "event_name",
    "sha",
    "run_id",
)
_GITLAB_BOOL_FIELDS = frozenset({"ref_protected", "environment_protected"})


class IDTokenRejected(AccessDenied):
    """The ID token does not admit a join with this token resource (HTTP 403)."""


class UnknownSigningKey(IDTokenRejected):
    """The JWT names a key (``kid``) the key set does not hold: refetch the keys and retry."""


@dataclass(frozen=True)
class JoinAttributes:
    """What a verified ID token says about the joining workload, for audit and bot instances.

    ``claims`` holds the method's identifying claims as strings of at most
    :data:`MAX_ATTRIBUTE_LENGTH` characters; claims the token lacks are left out.
    """

    join_method: str
    token_name: str
    claims: dict[str, str]


def expected_issuer(token: JoinToken) -> str | None:
    """The ``iss`` the token resource expects; None for kubernetes ``static_jwks`` (no issuer)."""
    spec = _method_spec(token)
    if isinstance(spec, GitHubSpec):
        if spec.enterprise_server_host:
            return f"https://{spec.enterprise_server_host}/_services/token"
        if spec.enterprise_slug:
            return f"{GITHUB_ISSUER}/{spec.enterprise_slug}"
        return GITHUB_ISSUER
    if isinstance(spec, GitLabSpec):
        return f"https://{spec.domain}"
    if isinstance(spec, KubernetesSpec):
        return None if spec.oidc is None else spec.oidc.issuer.rstrip("/")
    return spec.issuer.rstrip("/")


def issuer_allows_http(token: JoinToken) -> bool:
    """Whether the token resource lets its issuer be fetched over plain http."""
    spec = _method_spec(token)
    if isinstance(spec, GenericOIDCSpec):
        return spec.insecure_allow_http_issuer
    if isinstance(spec, KubernetesSpec) and spec.oidc is not None:
        return spec.oidc.insecure_allow_http_issuer
    return False


def static_jwks_text(token: JoinToken) -> str:
    """The JWKS JSON the token resource carries, or "" when its keys are fetched."""
    spec = _method_spec(token)
    if isinstance(spec, KubernetesSpec):
        return "" if spec.static_jwks is None else spec.static_jwks.jwks
    return spec.static_jwks


def expected_audience(token: JoinToken, cluster_name: str) -> str:
    """The ``aud`` value the ID token must carry: the cluster name unless generic_oidc sets one."""
    spec = _method_spec(token)
    if isinstance(spec, GenericOIDCSpec) and spec.audience:
        return spec.audience
    return cluster_name


def verify_id_token(
    token: JoinToken, id_token: str, keys: jwt.PyJWKSet, *, cluster_name: str, now: datetime
) -> JoinAttributes:
    """Check ``id_token`` against ``token`` with signing ``keys``; IDTokenRejected if it fails."""
    header = _header(id_token)
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in ALLOWED_ALGORITHMS:
        raise IDTokenRejected(f"id token algorithm {_show(algorithm)} is not allowed")
    claims = _verified_claims(id_token, _signing_key(header, algorithm, keys), algorithm)

    issuer = expected_issuer(token)
    if issuer is not None and claims.get("iss") != issuer:
        raise IDTokenRejected(f"id token issuer {_show(claims.get('iss'))} is not {_show(issuer)}")
    _check_audience(claims.get("aud"), expected_audience(token, cluster_name))
    _check_times(claims, now)

    spec = _method_spec(token)
    if isinstance(spec, GitHubSpec):
        return _check_github(token, spec, claims)
    if isinstance(spec, GitLabSpec):
        return _check_gitlab(token, spec, claims)
    if isinstance(spec, KubernetesSpec):
        return _check_kubernetes(token, spec, claims)
    return _check_generic(token, spec, claims)


# --- signature ---------------------------------------------------------------------------------


def _malformed() -> IDTokenRejected:
    return IDTokenRejected("id token is not a well-formed JWT")


def _header(id_token: str) -> dict[str, Any]:
    if not isinstance(id_token, str) or not 0 < len(id_token) <= MAX_ID_TOKEN_LENGTH:
        raise _malformed()
    try:
        header = jwt.get_unverified_header(id_token)
    except jwt.PyJWTError:
        header = None
    if not isinstance(header, dict):
        raise _malformed()
    return header


def _signing_key(header: Mapping[str, Any], algorithm: str, keys: jwt.PyJWKSet) -> jwt.PyJWK:
    kid = header.get("kid")
    if kid is not None:
        named = [key for key in keys.keys if key.key_id == kid]
        if not named:
            raise UnknownSigningKey(
                f"id token signing key {_show(kid)} is not among the issuer's keys"
            )
        fitting = [key for key in named if key_fits_algorithm(key, algorithm)]
        if not fitting:
            raise _bad_signature()
        return fitting[0]
    fitting = [key for key in keys.keys if key_fits_algorithm(key, algorithm)]
    if not fitting:
        raise UnknownSigningKey(f"the issuer has no {algorithm} key for this id token")
    if len(fitting) > 1:
        raise IDTokenRejected(
            f"id token names no signing key (kid) and the issuer has {len(fitting)} "
            f"{algorithm} keys"
        )
    return fitting[0]


def _bad_signature() -> IDTokenRejected:
    return IDTokenRejected("id token signature does not verify with the issuer's keys")


def _verified_claims(id_token: str, key: jwt.PyJWK, algorithm: str) -> dict[str, Any]:
    try:
        decoded = PyJWS().decode_complete(id_token, key.key, algorithms=[algorithm])
    except jwt.InvalidSignatureError:
        decoded = None
        failure = _bad_signature()
    except jwt.PyJWTError:
        decoded = None
        failure = _malformed()
    if decoded is None:
        raise failure  # outside ``except``: PyJWT's errors may carry token parts
    try:
        claims = json.loads(decoded["payload"])
    except ValueError:
        claims = None
    if not isinstance(claims, dict):
        raise _malformed()
    return claims


# --- registered claims -------------------------------------------------------------------------


def _check_audience(aud: Any, expected: str) -> None:
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if expected not in audiences:
        shown = ", ".join(_show(value) for value in audiences[:5])
        if len(audiences) > 5:
            shown += ", ..."
        raise IDTokenRejected(f"id token audience [{shown}] does not include {_show(expected)}")


def _numeric_date(claims: Mapping[str, Any], name: str) -> datetime | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise IDTokenRejected(f'id token claim "{name}" is not a number')
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise IDTokenRejected(f'id token claim "{name}" is out of range') from None


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_times(claims: Mapping[str, Any], now: datetime) -> None:
    expires = _numeric_date(claims, "exp")
    if expires is None:
        raise IDTokenRejected("id token has no expiry (exp)")
    if now >= expires + LEEWAY:
        raise IDTokenRejected(f"id token expired at {_rfc3339(expires)}")
    for name in ("nbf", "iat"):
        start = _numeric_date(claims, name)
        if start is not None and start > now + LEEWAY:
            raise IDTokenRejected(f"id token is not valid until {_rfc3339(start)}")


# --- allow rules -------------------------------------------------------------------------------


def _show(value: Any, limit: int = _SHOWN_VALUE_LENGTH) -> str:
    """``value`` quoted for a one-line message, cut to ``limit`` characters."""
    if value is None:
        return "(none)"
    text = value if isinstance(value, str) else scalar_text(value)
    cut = text[:limit] + ("..." if len(text) > limit else "")
    return json.dumps(cut, ensure_ascii=False)


def _claim_text(value: Any) -> str | None:
    if value is None or isinstance(value, dict):
        return None
    if isinstance(value, list):
        return ",".join(scalar_text(item) for item in value if not isinstance(item, dict | list))
    return scalar_text(value)


def _attributes(
    token: JoinToken, claims: Mapping[str, Any], names: Iterable[str]
) -> JoinAttributes:
    kept: dict[str, str] = {}
    for name in names:
        text = _claim_text(claims.get(name))
        if text is not None and name not in kept:
            kept[name] = text[:MAX_ATTRIBUTE_LENGTH]
    return JoinAttributes(join_method=token.join_method, token_name=token.name, claims=kept)


def _no_rule_matches(
    token: JoinToken, claims: Mapping[str, Any], looked_at: Iterable[str]
) -> IDTokenRejected:
    seen: list[str] = []
    for name in looked_at:
        if name not in seen:
            seen.append(name)
    shown = ", ".join(f"{name}={_show(_claim_text(claims.get(name)))}" for name in seen[:12])
    return IDTokenRejected(f'id token claims match no allow rule of token "{token.name}" ({shown})')


def _rule_fields(rule: Any) -> dict[str, Any]:
    return {name: value for name, value in rule if value is not None}


def _check_github(token: JoinToken, spec: GitHubSpec, claims: Mapping[str, Any]) -> JoinAttributes:
    rules = [_rule_fields(rule) for rule in spec.allow]
    for rule in rules:
        if all(claims.get(name) == expected for name, expected in rule.items()):
            return _attributes(token, claims, GITHUB_ATTRIBUTE_CLAIMS)
    raise _no_rule_matches(token, claims, (name for rule in rules for name in rule))


def _gitlab_field_matches(name: str, expected: Any, actual: Any) -> bool:
    if name in _GITLAB_BOOL_FIELDS:
        if isinstance(actual, str):
            actual = {"true": True, "false": False}.get(actual)
        return isinstance(actual, bool) and actual == expected
    if actual is None or isinstance(actual, dict | list):
        return False
    return fnmatch.fnmatchcase(scalar_text(actual), str(expected))


def _check_gitlab(token: JoinToken, spec: GitLabSpec, claims: Mapping[str, Any]) -> JoinAttributes:
    rules = [_rule_fields(rule) for rule in spec.allow]
    looked_at = [name for rule in rules for name in rule]
    for rule in rules:
        if all(_gitlab_field_matches(n, want, claims.get(n)) for n, want in rule.items()):
            return _attributes(token, claims, ["sub", *looked_at, "pipeline_id"])
    raise _no_rule_matches(token, claims, looked_at)


def _service_account(claims: Mapping[str, Any]) -> str:
    from_kubernetes = None
    block = claims.get("kubernetes.io")
    if isinstance(block, dict):
        namespace = block.get("namespace")
        account = block.get("serviceaccount")
        name = account.get("name") if isinstance(account, dict) else None
        if isinstance(namespace, str) and isinstance(name, str) and namespace and name:
            from_kubernetes = f"{namespace}:{name}"
    from_sub = None
    sub = claims.get("sub")
    if isinstance(sub, str) and sub.startswith("system:serviceaccount:"):
        namespace, sep, name = sub.removeprefix("system:serviceaccount:").partition(":")
        if sep and namespace and name:
            from_sub = f"{namespace}:{name}"
    if from_kubernetes and from_sub and from_kubernetes != from_sub:
        raise IDTokenRejected(
            f'id token service account claims disagree ("kubernetes.io" says '
            f"{_show(from_kubernetes)}, sub says {_show(from_sub)})"
        )
    found = from_kubernetes or from_sub
    if found is None:
        raise IDTokenRejected("id token names no Kubernetes service account")
    return found


def _check_kubernetes(
    token: JoinToken, spec: KubernetesSpec, claims: Mapping[str, Any]
) -> JoinAttributes:
    account = _service_account(claims)
    if not any(rule.service_account == account for rule in spec.allow):
        raise IDTokenRejected(
            f'id token claims match no allow rule of token "{token.name}" '
            f"(service_account={_show(account)})"
        )
    kept = {"service_account": account[:MAX_ATTRIBUTE_LENGTH]}
    block = claims.get("kubernetes.io")
    pod = block.get("pod") if isinstance(block, dict) else None
    if isinstance(pod, dict) and isinstance(pod.get("name"), str):
        kept["pod"] = pod["name"][:MAX_ATTRIBUTE_LENGTH]
    return JoinAttributes(join_method=token.join_method, token_name=token.name, claims=kept)


def _generic_field_matches(expected: str, actual: Any) -> bool:
    if isinstance(actual, list):
        return any(
            not isinstance(item, dict | list) and scalar_text(item) == expected for item in actual
        )
    if actual is None or isinstance(actual, dict):
        return False
    return scalar_text(actual) == expected


def _check_generic(
    token: JoinToken, spec: GenericOIDCSpec, claims: Mapping[str, Any]
) -> JoinAttributes:
    looked_at = [name for rule in spec.allow for name in rule]
    for rule in spec.allow:
        if all(_generic_field_matches(want, claims.get(n)) for n, want in rule.items()):
            return _attributes(token, claims, ["sub", *looked_at])
    raise _no_rule_matches(token, claims, looked_at)


def _method_spec(token: JoinToken) -> GitHubSpec | GitLabSpec | KubernetesSpec | GenericOIDCSpec:
    spec = getattr(token.spec, token.join_method)
    if not isinstance(spec, GitHubSpec | GitLabSpec | KubernetesSpec | GenericOIDCSpec):
        raise IDTokenRejected(f'join token "{token.name}" has no {token.join_method} section')
    return spec
