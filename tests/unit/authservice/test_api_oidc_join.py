"""Delegated (OIDC) joins against a real auth service: join, re-join over mTLS, refusals.

The token resources here carry their issuer's keys inline (``static_jwks``), so nothing is
fetched; fetching and caching are covered by ``test_jwks.py`` and the integration tests.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tbot_py.authservice import admin
from tbot_py.authservice.join_tokens import parse_join_token_yaml
from tbot_py.authservice.ratelimit import Rate
from tbot_py.authservice.server import start_in_thread
from tbot_py.client import wire
from tbot_py.identity import keys

from .conftest import AuthClient, Issued, public_keys

SIGNER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWK = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNER.public_key()))
JWKS = json.dumps({"keys": [{**JWK, "kid": "k1", "alg": "RS256", "use": "sig"}]})
CLUSTER = "tbot-py.local"


def token_yaml(name: str = "k8s", bot: str = "kbot", expires: str | None = None) -> str:
    metadata = {"name": name, **({"expires": expires} if expires else {})}
    return json.dumps(
        {
            "kind": "token",
            "version": "v2",
            "metadata": metadata,
            "spec": {
                "join_method": "kubernetes",
                "bot_name": bot,
                "kubernetes": {
                    "type": "static_jwks",
                    "static_jwks": {"jwks": JWKS},
                    "allow": [{"service_account": "ci:deployer"}],
                },
            },
        }
    )


def sa_token(namespace: str = "ci", account: str = "deployer", **overrides: Any) -> str:
    now = datetime.now(UTC)
    claims: dict[str, Any] = {
        "iss": "https://kubernetes.default.svc",
        "sub": f"system:serviceaccount:{namespace}:{account}",
        "aud": [CLUSTER],
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=10)).timestamp()),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": account}},
    }
    claims.update(overrides)
    return jwt.encode(claims, SIGNER, algorithm="RS256", headers={"kid": "k1"})


def join_request(
    client: AuthClient, name: str, id_token: str, *, identity: Issued | None = None
) -> tuple[httpx.Response, keys.PrivateKey]:
    key = keys.generate_private_key()
    req = wire.RegisterUsingTokenRequest(token=name, keys=public_keys(key), id_token=id_token)
    resp = client.request("POST", wire.PATH_JOIN, identity=identity, json=req.to_json())
    return resp, key


def joined(client: AuthClient, name: str = "k8s", *, identity: Issued | None = None) -> Issued:
    resp, key = join_request(client, name, sa_token(), identity=identity)
    assert resp.status_code == 200, resp.text
    return client.save(key, wire.Certs.from_json(resp.json()))


@pytest.fixture
def k8s(client: AuthClient) -> AuthClient:
    admin.add_bot(client.cluster, "kbot", roles=("access",))
    admin.create_resource(client.cluster, parse_join_token_yaml(token_yaml()))
    return client


def message(resp: httpx.Response) -> str:
    return str(resp.json()["error"]["message"])


def test_a_delegated_join_is_not_renewable_and_renew_says_to_join_again(k8s: AuthClient) -> None:
    first = joined(k8s)
    ident = first.identity
    assert (ident.bot_name, ident.generation, ident.renewable) == ("kbot", 1, False)
    resp, _ = k8s.renew(first)
    assert resp.status_code == 403
    assert "not renewable" in message(resp) and "joins again" in message(resp)
    # The bot's own non-renewable certificate still gets outputs.
    out, _ = k8s.impersonate(first)
    assert out.status_code == 200, out.text


def test_a_rejoin_over_mtls_keeps_the_instance_and_a_new_join_makes_another(
    k8s: AuthClient,
) -> None:
    first = joined(k8s)
    again = joined(k8s, identity=first)
    assert again.identity.bot_instance_id == first.identity.bot_instance_id
    assert again.identity.generation == 2
    fresh = joined(k8s)
    assert fresh.identity.bot_instance_id != first.identity.bot_instance_id
    ids = {i.id for i in admin.list_instances(k8s.cluster, "kbot")}
    assert ids == {first.identity.bot_instance_id, fresh.identity.bot_instance_id}


def test_a_stale_certificate_rejoins_with_a_warning_not_a_lock(
    k8s: AuthClient, caplog: pytest.LogCaptureFixture
) -> None:
    first = joined(k8s)
    joined(k8s, identity=first)
    with caplog.at_level(logging.WARNING, logger="tbot_py.authservice"):
        third = joined(k8s, identity=first)  # generation 1 presented, 2 stored
    assert third.identity.bot_instance_id == first.identity.bot_instance_id
    assert third.identity.generation == 3
    assert "presented generation 1, stored 2" in caplog.text
    assert admin.list_locks(k8s.cluster) == []


def test_a_rejoin_whose_instance_was_removed_starts_a_new_one(k8s: AuthClient) -> None:
    first = joined(k8s)
    admin.remove_bot(k8s.cluster, "kbot")
    admin.add_bot(k8s.cluster, "kbot", roles=("access",))
    again = joined(k8s, identity=first)
    assert again.identity.bot_instance_id != first.identity.bot_instance_id
    assert again.identity.generation == 1


def test_a_certificate_of_another_bot_is_refused(k8s: AuthClient) -> None:
    other = k8s.join(admin.add_bot(k8s.cluster, "other", roles=("access",)).token.token)
    resp, _ = join_request(k8s, "k8s", sa_token(), identity=other)
    assert resp.status_code == 403
    assert message(resp) == (
        'the client certificate is bot "other"\'s, but join token "k8s" is for bot "kbot"'
    )


@pytest.mark.parametrize(
    ("id_token", "reason"),
    [
        ("", 'join token "k8s" uses join method kubernetes: the request carries no id_token'),
        (sa_token(account="intruder"), "match no allow rule"),
        (sa_token(aud=["elsewhere"]), "audience"),
        (sa_token(exp=int(datetime.now(UTC).timestamp()) - 600), "expired"),
    ],
)
def test_refusals_say_what_failed_and_never_quote_the_jwt(
    k8s: AuthClient, id_token: str, reason: str
) -> None:
    resp, _ = join_request(k8s, "k8s", id_token)
    assert resp.status_code == 403
    assert reason in message(resp)
    if id_token:
        assert message(resp).startswith('join token "k8s" (kubernetes): ')
        assert id_token not in resp.text and id_token.split(".")[1] not in resp.text


def test_an_expired_token_resource_and_a_locked_bot_are_refused(k8s: AuthClient) -> None:
    admin.create_resource(
        k8s.cluster, parse_join_token_yaml(token_yaml("old", expires="2020-01-01T00:00:00Z"))
    )
    resp, _ = join_request(k8s, "old", sa_token())
    assert resp.status_code == 403
    assert message(resp) == 'join token "old" expired at 2020-01-01T00:00:00Z'
    admin.add_lock(k8s.cluster, bot="kbot")
    resp, _ = join_request(k8s, "k8s", sa_token())
    assert resp.status_code == 403
    assert "locked" in message(resp)


def test_the_join_is_audited_with_method_token_and_claims_but_no_jwt(k8s: AuthClient) -> None:
    id_token = sa_token()
    resp, _ = join_request(k8s, "k8s", id_token)
    assert resp.status_code == 200
    text = (k8s.cluster.data_dir / "audit.log").read_text()
    assert id_token.split(".")[1] not in text
    event = [json.loads(line) for line in text.splitlines() if '"bot.join"' in line][-1]
    assert event["resource"] == "token/k8s"
    assert event["details"]["join_method"] == "kubernetes"
    assert event["details"]["claim.service_account"] == "ci:deployer"


def test_rejoins_with_the_bot_certificate_are_not_throttled_as_anonymous_joins(
    tmp_path: Path,
) -> None:
    """A delegated bot re-joins at every renewal; only anonymous joins count to the limit."""
    with start_in_thread(tmp_path / "auth", join_rate=Rate(count=2, period_s=3600.0)) as running:
        limited = AuthClient(running, tmp_path)
        admin.add_bot(limited.cluster, "kbot", roles=("access",))
        admin.create_resource(limited.cluster, parse_join_token_yaml(token_yaml()))
        current = joined(limited)  # anonymous join 1 of 2
        for _ in range(4):
            current = joined(limited, identity=current)
        assert current.identity.generation == 5
        joined(limited)  # anonymous join 2 of 2
        resp, _ = join_request(limited, "k8s", sa_token())
        assert resp.status_code == 429
