"""``token`` resources: strict parsing, errors at file:line, round trips, the store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tbot_py.authservice import _sql
from tbot_py.authservice.errors import AlreadyExists, AuthServiceError, NotFound
from tbot_py.authservice.join_tokens import (
    CREATE_TABLE,
    OIDC_JOIN_METHODS,
    JoinToken,
    JoinTokenStore,
    join_token_from_data,
    parse_join_token_yaml,
    parse_jwks,
)
from tbot_py.errors import ConfigError

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk(
    public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, kid: str, **extra: str
) -> dict[str, object]:
    if isinstance(public, rsa.RSAPublicKey):
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, **extra}


JWKS = json.dumps({"keys": [jwk(RSA_KEY.public_key(), "r1"), jwk(EC_KEY.public_key(), "e1")]})

GITHUB = """\
kind: token
version: v2
metadata:
  name: gha-deploy
  expires: 2027-01-01T00:00:00Z
spec:
  roles: [Bot]
  join_method: github
  bot_name: deploy
  github:
    enterprise_slug: acme
    allow:
      - {repository: owner/repo, ref: refs/heads/main}
      - {sub: "repo:owner/other:environment:prod"}
"""

GITLAB = """\
kind: token
version: v2
metadata:
  name: gl
spec:
  join_method: gitlab
  bot_name: ci
  gitlab:
    domain: gitlab.example.com:8443
    allow:
      - {project_path: "group/*", ref: main, ref_protected: true}
"""

KUBERNETES = f"""\
kind: token
version: v2
metadata:
  name: k8s
spec:
  join_method: kubernetes
  bot_name: kube
  kubernetes:
    type: static_jwks
    static_jwks:
      jwks: '{JWKS}'
    allow:
      - {{service_account: "apps:deployer"}}
"""

KUBERNETES_OIDC = """\
kind: token
version: v2
metadata:
  name: k8s-oidc
spec:
  join_method: kubernetes
  bot_name: kube
  kubernetes:
    type: oidc
    oidc: {issuer: "https://oidc.eks.example.com/id/ABC"}
    allow:
      - {service_account: "apps:deployer"}
"""

GENERIC = """\
kind: token
version: v2
metadata:
  name: idp
spec:
  join_method: generic_oidc
  bot_name: svc
  generic_oidc:
    issuer: https://idp.example.com
    audience: tbot
    allow:
      - {sub: "repo:x", groups: deployers, admin: true, level: 3}
"""


@pytest.mark.parametrize("text", [GITHUB, GITLAB, KUBERNETES, KUBERNETES_OIDC, GENERIC])
def test_each_method_parses_and_round_trips(text: str) -> None:
    token = parse_join_token_yaml(text, "token.yaml")
    assert token.join_method in OIDC_JOIN_METHODS
    assert parse_join_token_yaml(token.to_yaml()) == token
    assert join_token_from_data(json.loads(json.dumps(token.to_json()))) == token
    assert token.to_json()["spec"]["roles"] == ["Bot"]


def test_properties_and_expiry() -> None:
    token = parse_join_token_yaml(GITHUB)
    assert (token.name, token.join_method, token.bot_name) == ("gha-deploy", "github", "deploy")
    assert token.expires == datetime(2027, 1, 1, tzinfo=UTC)
    assert not token.expired(datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert token.expired(datetime(2027, 1, 1, tzinfo=UTC))
    assert parse_join_token_yaml(GITLAB).expires is None
    assert not parse_join_token_yaml(GITLAB).expired(datetime(2099, 1, 1, tzinfo=UTC))


def test_generic_rule_values_are_kept_as_text() -> None:
    token = parse_join_token_yaml(GENERIC)
    spec = token.spec.generic_oidc
    assert spec is not None
    assert spec.allow == [{"sub": "repo:x", "groups": "deployers", "admin": "true", "level": "3"}]


PRIVATE_JWKS = json.dumps({"keys": [RSAAlgorithm.to_jwk(RSA_KEY, as_dict=True)]})
HMAC_JWKS = json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]})


@pytest.mark.parametrize(
    ("text", "old", "new", "where", "message"),
    [
        (
            GITHUB,
            "join_method: github",
            "join_method: token",
            "8: spec.join_method",
            "token-method join tokens are secrets: create them with "
            "tbot-py auth tokens add --bot NAME",
        ),
        (
            GITHUB,
            "join_method: github",
            "join_method: iam",
            "8: spec.join_method",
            'join method "iam" is not supported by this auth service '
            "(supported: github, gitlab, kubernetes, generic_oidc)",
        ),
        (
            GITHUB,
            "join_method: github",
            "join_method: carrier_pigeon",
            "8: spec.join_method",
            'unknown join method "carrier_pigeon" '
            "(supported: github, gitlab, kubernetes, generic_oidc)",
        ),
        (
            KUBERNETES_OIDC,
            "type: oidc",
            "type: in_cluster",
            "9: spec.kubernetes.type",
            "type in_cluster needs the Kubernetes TokenReview API, which this auth service "
            "does not call; use static_jwks or oidc",
        ),
        (
            KUBERNETES_OIDC,
            "type: oidc",
            "type: static_jwks",
            "8: spec.kubernetes",
            'type static_jwks needs a "static_jwks" section',
        ),
        (
            GITLAB,
            "join_method: gitlab",
            "join_method: github",
            "5: spec",
            'join_method github needs a "github" section',
        ),
        (
            GITLAB,
            "  gitlab:\n",
            "  github: {allow: [{ref: main}]}\n  gitlab:\n",
            "8: spec.github",
            'remove "github": join_method is gitlab',
        ),
        (
            GITHUB,
            "      - {repository: owner/repo, ref: refs/heads/main}\n"
            '      - {sub: "repo:owner/other:environment:prod"}\n',
            "      []\n",
            "12: spec.github.allow",
            "allow needs at least one rule",
        ),
        (
            GITHUB,
            '{sub: "repo:owner/other:environment:prod"}',
            "{}",
            "14: spec.github.allow[1]",
            "an allow rule must set at least one of: sub, repository, repository_owner, "
            "workflow, environment, actor, ref, ref_type",
        ),
        (
            GITHUB,
            "ref: refs/heads/main",
            "branch: main",
            "13: spec.github.allow[0].branch",
            'unknown key "branch" (known keys: sub, repository, repository_owner, workflow, '
            "environment, actor, ref, ref_type)",
        ),
        (
            GITHUB,
            "ref: refs/heads/main",
            'ref: ""',
            "13: spec.github.allow[0].ref",
            "must not be empty; remove the key to leave it unchecked",
        ),
        (
            GITHUB,
            "enterprise_slug: acme",
            "enterprise_slug: acme\n    enterprise_server_host: ghe.example.com",
            "11: spec.github.enterprise_slug",
            "set enterprise_server_host or enterprise_slug, not both",
        ),
        (
            GENERIC,
            "issuer: https://idp.example.com",
            "issuer: http://idp.example.com",
            "9: spec.generic_oidc.issuer",
            "the issuer must use https (http only with insecure_allow_http_issuer: true)",
        ),
        (
            GENERIC,
            "issuer: https://idp.example.com",
            "issuer: idp.example.com",
            "9: spec.generic_oidc.issuer",
            "'idp.example.com' is not an issuer URL such as https://idp.example.com",
        ),
        (
            GENERIC,
            "audience: tbot",
            "static_jwks: '{\"keys\": []}'",
            "10: spec.generic_oidc.static_jwks",
            "static_jwks holds no usable RSA (at least 2048 bits) or EC (P-256, P-384) signing key",
        ),
        (
            GENERIC,
            "audience: tbot",
            f"static_jwks: '{HMAC_JWKS}'",
            "10: spec.generic_oidc.static_jwks",
            "static_jwks holds no usable RSA (at least 2048 bits) or EC (P-256, P-384) signing key",
        ),
        (
            GENERIC,
            "audience: tbot",
            f"static_jwks: '{PRIVATE_JWKS}'",
            "10: spec.generic_oidc.static_jwks",
            "static_jwks holds a private key; give only the public keys",
        ),
        (
            GENERIC,
            "audience: tbot",
            "static_jwks: 'not json'",
            "10: spec.generic_oidc.static_jwks",
            'static_jwks is not a JWKS: expected a JSON object with a "keys" list',
        ),
        (
            GENERIC,
            "groups: deployers",
            "groups: [a, b]",
            "12: spec.generic_oidc.allow[0].groups",
            "expected a non-empty string, number or boolean claim value",
        ),
        (
            KUBERNETES_OIDC,
            '"apps:deployer"',
            '"deployer"',
            "12: spec.kubernetes.allow[0].service_account",
            "'deployer' is not \"namespace:name\"",
        ),
        (
            GITHUB,
            "roles: [Bot]",
            "roles: [Node]",
            "7: spec.roles",
            "roles must be [Bot]: a join token can only join bots",
        ),
        (
            GITHUB,
            "bot_name: deploy",
            "bot_name: 'de ploy'",
            "9: spec.bot_name",
            "invalid bot name 'de ploy': use 1-128 letters, digits and _ . @ : -",
        ),
        (
            GITHUB,
            "expires: 2027-01-01T00:00:00Z",
            "expires: '2027-01-01T00:00:00'",
            "5: metadata.expires",
            "expires needs a time zone, e.g. 2027-01-01T00:00:00Z",
        ),
        (
            GITHUB,
            "version: v2",
            "version: v1",
            "2: version",
            'unsupported version "v1"; use "v2"',
        ),
    ],
)
def test_refusals_name_the_line_and_key(
    text: str, old: str, new: str, where: str, message: str
) -> None:
    assert old in text
    with pytest.raises(ConfigError) as caught:
        parse_join_token_yaml(text.replace(old, new, 1), "token.yaml")
    assert str(caught.value) == f"token.yaml:{where}: {message}"


def test_parse_jwks_keeps_usable_keys_only() -> None:
    mixed = {
        "keys": [
            jwk(RSA_KEY.public_key(), "r1"),
            jwk(
                rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(), "weak"
            ),
            jwk(ec.generate_private_key(ec.SECP521R1()).public_key(), "p521"),
            jwk(RSA_KEY.public_key(), "enc", use="enc"),
            jwk(RSA_KEY.public_key(), "hs", alg="HS256"),
            {"kty": "oct", "k": "c2VjcmV0"},
        ]
    }
    assert [key.key_id for key in parse_jwks(json.dumps(mixed)).keys] == ["r1"]


# --- store -------------------------------------------------------------------------------------


@pytest.fixture
def store() -> Iterator[JoinTokenStore]:
    raw = sqlite3.connect(":memory:", isolation_level=None)
    raw.execute(CREATE_TABLE)

    @contextmanager
    def transaction(*, write: bool = False) -> Iterator[_sql.Connection]:
        raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield _sql.Connection(raw, postgres=False, integrity_errors=(sqlite3.IntegrityError,))
        except BaseException:
            raw.execute("ROLLBACK")
            raise
        raw.execute("COMMIT")

    yield JoinTokenStore(transaction)
    raw.close()


NOW = datetime(2026, 6, 1, tzinfo=UTC)


def test_store_put_get_list_delete(store: JoinTokenStore) -> None:
    tokens = [parse_join_token_yaml(text) for text in (GITLAB, GITHUB, KUBERNETES)]
    for token in tokens:
        assert store.put(token, NOW) is False
    assert store.get("gha-deploy") == tokens[1]
    assert store.get("missing") is None
    assert [t.name for t in store.list_all()] == ["gha-deploy", "gl", "k8s"]
    with pytest.raises(AlreadyExists, match='join token "gl" already exists'):
        store.put(tokens[0], NOW)
    changed = parse_join_token_yaml(GITLAB.replace("bot_name: ci", "bot_name: ci2"))
    assert store.put(changed, NOW, overwrite=True) is True
    assert store.get("gl") == changed
    store.delete("gl")
    assert store.get("gl") is None
    with pytest.raises(NotFound, match='join token "gl" not found'):
        store.delete("gl")


def test_store_damaged_row_is_one_clear_error(store: JoinTokenStore) -> None:
    store.put(parse_join_token_yaml(GITHUB), NOW)
    with store._transaction(write=True) as conn:
        conn.execute(
            "UPDATE join_token_resources SET definition = ? WHERE name = ?",
            ('{"kind": "token", "secret-ish": "xyz"}', "gha-deploy"),
        )
    with pytest.raises(AuthServiceError) as caught:
        store.get("gha-deploy")
    assert caught.value.message == (
        'stored join token "gha-deploy" is damaged; replace it with '
        "tbot-py auth create -f token.yaml --force"
    )
    assert "xyz" not in str(caught.value)
    assert caught.value.__cause__ is None


def test_a_token_is_a_frozen_model() -> None:
    token = parse_join_token_yaml(GITHUB)
    assert isinstance(token, JoinToken)
    with pytest.raises(ValueError, match="frozen"):
        token.metadata.name = "other"
