"""``token`` resources: OIDC join tokens (github, gitlab, kubernetes, generic_oidc), as in Teleport.

A bot joins with such a token by naming it (``onboarding.token``, not a secret) and
presenting an ID token (JWT) from its platform; the auth service checks the JWT's
signature, issuer, audience and times (:mod:`.idtoken`) and then the ``allow`` rules::

    kind: token
    version: v2
    metadata:
      name: gha-deploy
      expires: 2027-01-01T00:00:00Z    # optional
    spec:
      roles: [Bot]
      join_method: github
      bot_name: deploy
      github:
        allow:
          - {repository: owner/repo, ref: refs/heads/main}

These tokens are reusable and not secret, so they are stored as written. Secret
``token``-method join tokens are a different thing (``tbot-py auth tokens add``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tbot_py.authservice import _sql
from tbot_py.authservice.resource_table import NamedMetadata, ResourceTable, StoredResource
from tbot_py.authservice.roles import NAME_RE, _Strict
from tbot_py.config._checks import KNOWN_JOIN_METHODS, config_problem
from tbot_py.config.loader import _parse_yaml, config_error_from_validation

KIND_TOKEN = "token"  # noqa: S105 - a resource kind, not a secret
VERSION = "v2"
#: The join methods a ``token`` resource may name.
OIDC_JOIN_METHODS = ("github", "gitlab", "kubernetes", "generic_oidc")
#: The only role a join token may grant.
BOT_ROLE = "Bot"
#: Signature algorithms accepted on ID tokens (never ``none`` or HMAC).
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384")
_EC_ALGORITHM = {"P-256": "ES256", "P-384": "ES384"}
#: Shortest RSA signing key accepted (NIST SP 800-131A).
MIN_RSA_BITS = 2048
USABLE_KEYS = f"RSA (at least {MIN_RSA_BITS} bits) or EC (P-256, P-384)"
#: Largest ``static_jwks`` text accepted.
MAX_STATIC_JWKS = 64 * 1024

#: SQL of the table holding the resources (a :mod:`.storage` migration).
CREATE_TABLE = """CREATE TABLE join_token_resources (
        name       TEXT PRIMARY KEY,
        definition TEXT NOT NULL,     -- the JoinToken as JSON
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )"""

_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:[0-9]{1,5})?$")
_SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_URL_RE = re.compile(r"^(https?)://([^/?#@\s]+)(/[^?#\s]*)?$")
_CLAIM_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")


# --- JWKS --------------------------------------------------------------------------------------


def parse_jwks(
    text: str, *, what: str = "static_jwks", limit: int = MAX_STATIC_JWKS
) -> jwt.PyJWKSet:
    """The RSA and EC signing keys of JWKS JSON ``text``; ValueError with a short reason.

    Keys for other algorithms or uses are skipped; at least one usable key must remain.
    A key carrying private parameters is refused: a JWKS here is public data.
    """
    if len(text) > limit:
        raise ValueError(f"{what} is larger than {limit // 1024} KiB")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f'{what} is not a JWKS: expected a JSON object with a "keys" list')
    usable: list[dict[str, Any]] = []
    for key in data["keys"]:
        if not isinstance(key, dict):
            continue
        if "d" in key or "p" in key:
            raise ValueError(f"{what} holds a private key; give only the public keys")
        if _key_algorithm_problem(key) is None:
            usable.append(key)
    try:
        key_set: jwt.PyJWKSet | None = jwt.PyJWKSet(usable)  # skips keys it cannot load
    except jwt.PyJWKSetError:
        key_set = None
    if key_set is not None:
        key_set.keys = [key for key in key_set.keys if not _weak(key)]
    if key_set is None or not key_set.keys:
        raise ValueError(f"{what} holds no usable {USABLE_KEYS} signing key")
    return key_set


def _weak(key: jwt.PyJWK) -> bool:
    return isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS


def _key_algorithm_problem(key: Mapping[str, Any]) -> str | None:
    if key.get("use", "sig") != "sig":
        return "not a signing key"
    kty = key.get("kty")
    if kty == "RSA":
        fitting = {a for a in ALLOWED_ALGORITHMS if a[:2] in ("RS", "PS")}
    elif kty == "EC" and key.get("crv") in _EC_ALGORITHM:
        fitting = {_EC_ALGORITHM[str(key["crv"])]}
    else:
        return "unsupported key type"
    if "alg" in key and key["alg"] not in fitting:
        return "unsupported algorithm"
    return None


def key_fits_algorithm(key: jwt.PyJWK, algorithm: str) -> bool:
    """Whether ``key`` may verify a signature made with ``algorithm``."""
    declared = key._jwk_data.get("alg")
    if declared is not None and declared != algorithm:
        return False
    public = key.key
    if algorithm[:2] in ("RS", "PS"):
        return isinstance(public, rsa.RSAPublicKey)
    if isinstance(public, ec.EllipticCurvePublicKey):
        curve = {"ES256": "secp256r1", "ES384": "secp384r1"}.get(algorithm)
        return public.curve.name == curve
    return False


def _check_jwks_text(value: str) -> str:
    if value:
        try:
            parse_jwks(value)
        except ValueError as exc:
            raise config_problem(str(exc)) from None
    return value


# --- value checks ------------------------------------------------------------------------------


def _check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise config_problem(
            f"invalid token name {value!r}: use 1-128 letters, digits and _ . @ : -"
        )
    return value


def _check_bot_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise config_problem(f"invalid bot name {value!r}: use 1-128 letters, digits and _ . @ : -")
    return value


def _check_expires(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise config_problem("expires needs a time zone, e.g. 2027-01-01T00:00:00Z")
    return value


def _check_join_method(value: str) -> str:
    if value in OIDC_JOIN_METHODS:
        return value
    if value == "token":
        raise config_problem(
            "token-method join tokens are secrets: create them with "
            "tbot-py auth tokens add --bot NAME"
        )
    supported = ", ".join(OIDC_JOIN_METHODS)
    if value in KNOWN_JOIN_METHODS:
        raise config_problem(
            f'join method "{value}" is not supported by this auth service (supported: {supported})'
        )
    raise config_problem(f'unknown join method "{value[:64]}" (supported: {supported})')


def _check_roles(value: list[str]) -> list[str]:
    if value != [BOT_ROLE]:
        raise config_problem(f"roles must be [{BOT_ROLE}]: a join token can only join bots")
    return value


def _check_host(value: str) -> str:
    if value and not _HOST_RE.match(value):
        raise config_problem(f"{value[:100]!r} is not a host name (HOST or HOST:PORT, no scheme)")
    return value


def _check_slug(value: str) -> str:
    if value and not _SLUG_RE.match(value):
        raise config_problem(f"{value[:100]!r} is not a GitHub enterprise slug")
    return value


def _check_issuer_url(value: str) -> str:
    found = _URL_RE.match(value)
    if found is None:
        raise config_problem(
            f"{value[:100]!r} is not an issuer URL such as https://idp.example.com"
        )
    return value


def _issuer_scheme_problem(issuer: str, insecure: bool) -> str | None:
    if issuer.startswith("https://") or (insecure and issuer.startswith("http://")):
        return None
    return "the issuer must use https (http only with insecure_allow_http_issuer: true)"


def _check_rule_text(value: str) -> str:
    if not value:
        raise config_problem("must not be empty; remove the key to leave it unchecked")
    return value


def scalar_text(value: Any) -> str:
    """A claim or rule value as text: booleans as true/false, numbers as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_generic_rule(value: Any) -> Any:
    if not isinstance(value, dict):
        return value  # pydantic reports the type
    if not value:
        raise config_problem("an allow rule must name at least one claim")
    checked: dict[Any, str] = {}
    for claim, expected in value.items():
        if not isinstance(claim, str) or not _CLAIM_RE.match(claim):
            raise config_problem(f"invalid claim name {str(claim)[:64]!r}", (str(claim),))
        if isinstance(expected, bool | int | float | str) and scalar_text(expected):
            checked[claim] = scalar_text(expected)
        else:
            raise config_problem(
                "expected a non-empty string, number or boolean claim value", (claim,)
            )
    return checked


RuleText = Annotated[str | None, AfterValidator(lambda v: v if v is None else _check_rule_text(v))]
JWKSText = Annotated[str, AfterValidator(_check_jwks_text)]


def _at_least_one_field(rule: _Strict) -> None:
    if all(getattr(rule, name) is None for name in type(rule).model_fields):
        fields = ", ".join(type(rule).model_fields)
        raise config_problem(f"an allow rule must set at least one of: {fields}")


def _non_empty_allow(value: list[Any]) -> list[Any]:
    if not value:
        raise config_problem("allow needs at least one rule")
    return value


# --- models ------------------------------------------------------------------------------------


class JoinTokenMetadata(NamedMetadata):
    """``metadata``: the token's name (what bots put in ``onboarding.token``) and its expiry."""

    name: Annotated[str, AfterValidator(_check_name)]
    expires: Annotated[datetime | None, AfterValidator(_check_expires)] = None
    description: str = ""


class GitHubRule(_Strict):
    """One ``github.allow`` rule: every field set must equal the claim exactly."""

    sub: RuleText = None
    repository: RuleText = None
    repository_owner: RuleText = None
    workflow: RuleText = None
    environment: RuleText = None
    actor: RuleText = None
    ref: RuleText = None
    ref_type: RuleText = None

    @model_validator(mode="after")
    def _check_set(self) -> GitHubRule:
        _at_least_one_field(self)
        return self


class GitHubSpec(_Strict):
    """``spec.github``."""

    enterprise_server_host: Annotated[str, AfterValidator(_check_host)] = ""
    enterprise_slug: Annotated[str, AfterValidator(_check_slug)] = ""
    static_jwks: JWKSText = ""
    allow: Annotated[list[GitHubRule], AfterValidator(_non_empty_allow)]

    @model_validator(mode="after")
    def _check_enterprise(self) -> GitHubSpec:
        if self.enterprise_server_host and self.enterprise_slug:
            raise config_problem(
                "set enterprise_server_host or enterprise_slug, not both", ("enterprise_slug",)
            )
        return self


class GitLabRule(_Strict):
    """One ``gitlab.allow`` rule: string fields match as globs (* ?), booleans exactly."""

    sub: RuleText = None
    project_path: RuleText = None
    namespace_path: RuleText = None
    pipeline_source: RuleText = None
    environment: RuleText = None
    user_login: RuleText = None
    user_id: RuleText = None
    user_email: RuleText = None
    ref: RuleText = None
    ref_type: RuleText = None
    ref_protected: bool | None = None
    environment_protected: bool | None = None
    ci_config_sha: RuleText = None
    ci_config_ref_uri: RuleText = None
    deployment_tier: RuleText = None
    project_visibility: RuleText = None

    @model_validator(mode="after")
    def _check_set(self) -> GitLabRule:
        _at_least_one_field(self)
        return self


class GitLabSpec(_Strict):
    """``spec.gitlab``."""

    domain: Annotated[str, AfterValidator(_check_host)] = "gitlab.com"
    static_jwks: JWKSText = ""
    allow: Annotated[list[GitLabRule], AfterValidator(_non_empty_allow)]

    @field_validator("domain")
    @classmethod
    def _domain_set(cls, value: str) -> str:
        if not value:
            raise config_problem("domain must not be empty (default gitlab.com)")
        return value


class KubernetesRule(_Strict):
    """One ``kubernetes.allow`` rule: the service account as ``namespace:name``."""

    service_account: str

    @field_validator("service_account")
    @classmethod
    def _check_service_account(cls, value: str) -> str:
        namespace, sep, name = value.partition(":")
        if not sep or not namespace or not name or ":" in name:
            raise config_problem(f'{value[:100]!r} is not "namespace:name"')
        return value


class KubernetesStaticJWKS(_Strict):
    """``spec.kubernetes.static_jwks``: the cluster's service account signing keys."""

    jwks: Annotated[str, AfterValidator(_check_jwks_text)]

    @field_validator("jwks")
    @classmethod
    def _jwks_set(cls, value: str) -> str:
        if not value:
            raise config_problem(
                "jwks must hold the cluster's JWKS (kubectl get --raw /openid/v1/jwks)"
            )
        return value


class KubernetesOIDC(_Strict):
    """``spec.kubernetes.oidc``: the cluster's service account issuer, found by discovery."""

    issuer: Annotated[str, AfterValidator(_check_issuer_url)]
    insecure_allow_http_issuer: bool = False

    @model_validator(mode="after")
    def _check_scheme(self) -> KubernetesOIDC:
        problem = _issuer_scheme_problem(self.issuer, self.insecure_allow_http_issuer)
        if problem:
            raise config_problem(problem, ("issuer",))
        return self


class KubernetesSpec(_Strict):
    """``spec.kubernetes``."""

    type: str = ""
    static_jwks: KubernetesStaticJWKS | None = None
    oidc: KubernetesOIDC | None = None
    allow: Annotated[list[KubernetesRule], AfterValidator(_non_empty_allow)]

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: str) -> str:
        if value == "in_cluster":
            raise config_problem(
                "type in_cluster needs the Kubernetes TokenReview API, which this auth "
                "service does not call; use static_jwks or oidc"
            )
        if value not in ("static_jwks", "oidc"):
            raise config_problem(f'type must be static_jwks or oidc, not "{value[:64]}"')
        return value

    @model_validator(mode="after")
    def _check_sections(self) -> KubernetesSpec:
        chosen: Literal["static_jwks", "oidc"] = "oidc" if self.type == "oidc" else "static_jwks"
        other = "static_jwks" if chosen == "oidc" else "oidc"
        if getattr(self, chosen) is None:
            raise config_problem(f'type {chosen} needs a "{chosen}" section')
        if getattr(self, other) is not None:
            raise config_problem(f'remove "{other}": type is {chosen}', (other,))
        return self


class GenericOIDCSpec(_Strict):
    """``spec.generic_oidc``."""

    issuer: Annotated[str, AfterValidator(_check_issuer_url)]
    audience: str = ""
    static_jwks: JWKSText = ""
    insecure_allow_http_issuer: bool = False
    allow: Annotated[
        list[Annotated[dict[str, str], BeforeValidator(_check_generic_rule)]],
        AfterValidator(_non_empty_allow),
    ]

    @model_validator(mode="after")
    def _check_scheme(self) -> GenericOIDCSpec:
        problem = _issuer_scheme_problem(self.issuer, self.insecure_allow_http_issuer)
        if problem:
            raise config_problem(problem, ("issuer",))
        return self


class JoinTokenSpec(_Strict):
    """``spec``: the bot it joins, the method and exactly that method's section."""

    roles: Annotated[list[str], AfterValidator(_check_roles)] = Field(
        default_factory=lambda: [BOT_ROLE]
    )
    join_method: Annotated[str, AfterValidator(_check_join_method)]
    bot_name: Annotated[str, AfterValidator(_check_bot_name)]
    github: GitHubSpec | None = None
    gitlab: GitLabSpec | None = None
    kubernetes: KubernetesSpec | None = None
    generic_oidc: GenericOIDCSpec | None = None

    @model_validator(mode="after")
    def _check_sections(self) -> JoinTokenSpec:
        if getattr(self, self.join_method) is None:
            raise config_problem(
                f'join_method {self.join_method} needs a "{self.join_method}" section'
            )
        for method in OIDC_JOIN_METHODS:
            if method != self.join_method and getattr(self, method) is not None:
                raise config_problem(
                    f'remove "{method}": join_method is {self.join_method}', (method,)
                )
        return self


class JoinToken(StoredResource):
    """A ``token`` resource."""

    KIND: ClassVar[str] = KIND_TOKEN
    VERSION: ClassVar[str] = VERSION
    kind: str = KIND_TOKEN
    version: str = VERSION
    metadata: JoinTokenMetadata
    spec: JoinTokenSpec

    @property
    def join_method(self) -> str:
        """``spec.join_method``: one of :data:`OIDC_JOIN_METHODS`."""
        return self.spec.join_method

    @property
    def bot_name(self) -> str:
        """``spec.bot_name``: the bot a join with this token becomes."""
        return self.spec.bot_name

    @property
    def expires(self) -> datetime | None:
        """``metadata.expires``: no joins after it; None for never."""
        return self.metadata.expires

    def expired(self, now: datetime) -> bool:
        """Whether joins with this token are refused at ``now`` because it expired."""
        return self.expires is not None and now >= self.expires

    def to_json(self) -> dict[str, Any]:
        """The resource as plain JSON data, leaving out unset optional keys."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        spec = data["spec"]
        spec.setdefault("roles", [BOT_ROLE])
        return {
            "kind": self.kind,
            "version": self.version,
            "metadata": data["metadata"],
            "spec": {
                "roles": spec.pop("roles"),
                "join_method": spec.pop("join_method"),
                "bot_name": spec.pop("bot_name"),
                **spec,
            },
        }


def parse_join_token_yaml(text: str, source: str = "<token>") -> JoinToken:
    """Read one ``token`` document; ``source`` names it in errors. Raises ConfigError."""
    data, lines = _parse_yaml(text, source)
    return join_token_from_data(data, source=source, lines=lines)


def join_token_from_data(
    data: Any, *, source: str | None = None, lines: Mapping[Any, int] | None = None
) -> JoinToken:
    """Validate plain data into a JoinToken, or raise one ConfigError."""
    try:
        return JoinToken.model_validate(data)
    except ValidationError as exc:
        failure = config_error_from_validation(exc, data, source=source, lines=lines)
    raise failure  # outside ``except``: pydantic's error holds the input


def join_token_not_found(name: str) -> str:
    """The error for a name that is not a stored token resource."""
    return f'join token "{name}" not found; create it with tbot-py auth create -f token.yaml'


class JoinTokenStore(ResourceTable[JoinToken]):
    """The join_token_resources table, used through ``Storage.join_tokens``."""

    TABLE = "join_token_resources"
    TITLE = "join token"
    HINT = "token.yaml"

    @classmethod
    def validate(cls, data: Any) -> JoinToken:
        return join_token_from_data(data)


def get_join_token(conn: _sql.Connection, name: str) -> JoinToken | None:
    """The token resource called ``name``, or None, in a Storage transaction."""
    return JoinTokenStore.read(conn, name)
