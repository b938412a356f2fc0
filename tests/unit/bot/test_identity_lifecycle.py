"""obtain_bot_identity against a real auth service: join, renew, rejoin, and refusals.

Storage is a real MemoryDestination or DirectoryDestination; the daemon's clock is
injected where expiry matters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from tbot_py.authservice import admin, ca
from tbot_py.authservice.server import RunningAuthService
from tbot_py.bot.identity import (
    Clock,
    JoinParams,
    fresh_public_keys,
    load_stored_identity,
    obtain_bot_identity,
    save_identity,
)
from tbot_py.destinations import Destination, DirectoryDestination, MemoryDestination
from tbot_py.errors import AccessDenied, ConfigError, ConnectionProblem
from tbot_py.identity import keys
from tbot_py.identity.model import (
    ARTIFACT_KEY,
    ARTIFACT_SSH_CERT,
    ARTIFACT_TLS_CAS,
    ARTIFACT_TLS_CERT,
    ARTIFACT_TOKEN_HASH,
    BOT_ARTIFACTS,
    Identity,
)
from tests.unit.conftest import BOT, utc_now

TTL = timedelta(hours=1)


@pytest.fixture(params=["memory", "directory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Destination:
    destination: Destination
    if request.param == "memory":
        destination = MemoryDestination()
    else:
        destination = DirectoryDestination(tmp_path / "storage")
    destination.init()
    return destination


def _obtain(
    service: RunningAuthService,
    storage: Destination,
    token: str | None,
    *,
    clock: Clock = utc_now,
    addr: str | None = None,
) -> Identity:
    params = JoinParams(addr=addr or service.addr, token=token, ca_pins=(service.ca_pin,))
    return asyncio.run(obtain_bot_identity(params, storage, TTL, clock))


def _snapshot(storage: Destination) -> dict[str, bytes | None]:
    return {name: storage.read(name) for name in BOT_ARTIFACTS}


def _stored(storage: Destination) -> tuple[Identity, str]:
    stored = load_stored_identity(storage)
    assert stored is not None, "storage holds no identity"
    return stored


def _after_expiry(identity: Identity) -> Clock:
    fixed = identity.not_after + timedelta(minutes=1)
    return lambda: fixed


# -- join and renew ---------------------------------------------------------------------


def test_first_run_joins_and_saves_generation_one(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    identity = _obtain(service, storage, token)
    tid = identity.tls_identity
    assert tid.generation == 1
    assert tid.renewable
    assert tid.bot_name == BOT
    assert identity.roles == ("access", "dev")
    assert identity.cluster_name == service.cluster_name
    assert _stored(storage) == (identity, keys.token_hash(token))
    instance = service.cluster.storage.instances.get(BOT, tid.bot_instance_id)
    assert instance is not None and instance.generation == 1


def test_second_run_renews_with_a_fresh_key_and_the_same_instance(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    first = _obtain(service, storage, token)
    second = _obtain(service, storage, token)
    assert second.tls_identity.generation == 2
    assert second.tls_identity.bot_instance_id == first.tls_identity.bot_instance_id
    assert second.private_key_pem != first.private_key_pem
    assert _stored(storage) == (second, keys.token_hash(token))
    instance = service.cluster.storage.instances.get(BOT, first.tls_identity.bot_instance_id)
    assert instance is not None and instance.generation == 2


def test_renewal_without_a_configured_token_keeps_the_stored_token_hash(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    _obtain(service, storage, token)
    renewed = _obtain(service, storage, None)
    assert renewed.tls_identity.generation == 2
    assert _stored(storage) == (renewed, keys.token_hash(token))


def test_renewal_asks_for_the_configured_ttl_from_the_injected_clock(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    _obtain(service, storage, token)
    now = utc_now().replace(microsecond=0)
    renewed = _obtain(service, storage, token, clock=lambda: now)
    assert renewed.not_after == now + TTL


def test_changed_token_joins_again_as_a_new_instance(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    first = _obtain(service, storage, token)
    new_token = admin.add_token(service.cluster, BOT).token
    rejoined = _obtain(service, storage, new_token)
    assert rejoined.tls_identity.generation == 1
    assert rejoined.tls_identity.bot_instance_id != first.tls_identity.bot_instance_id
    assert _stored(storage) == (rejoined, keys.token_hash(new_token))


# -- expiry -----------------------------------------------------------------------------


def test_expired_identity_joins_again_with_the_configured_token(
    service: RunningAuthService,
    storage: Destination,
    token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = _obtain(service, storage, token)
    # The stored identity belongs to the token now configured, so only expiry forces a join.
    new_token = admin.add_token(service.cluster, BOT).token
    save_identity(storage, first, keys.token_hash(new_token))
    with caplog.at_level(logging.INFO, logger="tbot_py.bot"):
        rejoined = _obtain(service, storage, new_token, clock=_after_expiry(first))
    assert any("expired" in r.getMessage() for r in caplog.records)
    assert not any("token changed" in r.getMessage() for r in caplog.records)
    assert rejoined.tls_identity.generation == 1
    assert rejoined.tls_identity.bot_instance_id != first.tls_identity.bot_instance_id
    assert _stored(storage) == (rejoined, keys.token_hash(new_token))


def test_expired_identity_without_a_token_is_a_config_error_about_onboarding_token(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    first = _obtain(service, storage, token)
    before = _snapshot(storage)
    with pytest.raises(ConfigError) as err:
        _obtain(service, storage, None, clock=_after_expiry(first))
    assert err.value.yaml_path == "onboarding.token"
    assert "onboarding.token" in str(err.value)
    assert storage.describe() in str(err.value)
    assert _snapshot(storage) == before


def test_expired_identity_with_the_spent_token_is_refused_and_storage_is_kept(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    first = _obtain(service, storage, token)
    before = _snapshot(storage)
    with pytest.raises(AccessDenied, match="token is not valid"):
        _obtain(service, storage, token, clock=_after_expiry(first))
    assert _snapshot(storage) == before


def test_identity_not_yet_valid_by_the_local_clock_joins_again(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    first = _obtain(service, storage, token)
    new_token = admin.add_token(service.cluster, BOT).token
    save_identity(storage, first, keys.token_hash(new_token))
    early = first.not_before - timedelta(minutes=1)
    # The request's expiry (early + TTL) must still be in the server's future.
    rejoined = _obtain(service, storage, new_token, clock=lambda: early)
    assert rejoined.tls_identity.bot_instance_id != first.tls_identity.bot_instance_id


def test_nothing_stored_and_no_token_is_a_config_error(
    service: RunningAuthService, storage: Destination
) -> None:
    with pytest.raises(ConfigError) as err:
        _obtain(service, storage, None)
    assert err.value.yaml_path == "onboarding.token"
    assert _snapshot(storage) == dict.fromkeys(BOT_ARTIFACTS)


# -- refusals leave storage untouched ---------------------------------------------------


def test_renewal_refused_for_a_removed_bot_keeps_storage_byte_for_byte(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    _obtain(service, storage, token)
    before = _snapshot(storage)
    admin.remove_bot(service.cluster, BOT)
    with pytest.raises(AccessDenied) as err:
        _obtain(service, storage, token)
    assert err.value.status == 403
    assert f'bot "{BOT}" no longer exists' in err.value.message
    assert "issue a new token" in str(err.value)
    assert token not in str(err.value)
    assert _snapshot(storage) == before


def test_renewal_from_a_stale_copy_is_refused_and_the_copy_is_kept(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    first = _obtain(service, storage, token)
    stale = _snapshot(storage)
    _obtain(service, storage, token)  # generation 2 on the server
    save_identity(storage, first, keys.token_hash(token))  # someone restores an old copy
    with pytest.raises(AccessDenied, match="generation mismatch"):
        _obtain(service, storage, token)
    assert _snapshot(storage) == stale


def test_renewal_keeps_old_identity_when_server_is_down(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    _obtain(service, storage, token)
    before = _snapshot(storage)
    service.stop()
    with pytest.raises(ConnectionProblem):
        _obtain(service, storage, token)
    assert _snapshot(storage) == before


def test_non_renewable_stored_identity_is_a_config_error_not_retried(
    service: RunningAuthService, storage: Destination
) -> None:
    key = keys.generate_private_key()
    now = utc_now()
    certs = ca.issue_impersonated_identity(
        service.cluster.cas,
        ca.BotProfile(name=BOT, roles=("access",)),
        instance_id="00000000-0000-4000-8000-000000000000",
        roles=("access",),
        public_key=key.public_key(),
        expires=now + TTL,
        reissuable=False,
        route_to_cluster="",
        now=now,
    )
    save_identity(storage, Identity.from_certs(key, certs), "")
    before = _snapshot(storage)
    # Retrying cannot fix it (the daemon classifies ConfigError as fatal); a token can.
    with pytest.raises(ConfigError, match="is not renewable"):
        _obtain(service, storage, None)
    assert _snapshot(storage) == before


# -- junk in storage --------------------------------------------------------------------


def test_junk_in_storage_is_ignored_with_a_warning_and_the_bot_joins(
    service: RunningAuthService,
    storage: Destination,
    token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage.write_many(
        {name: b"junk" for name in (ARTIFACT_KEY, ARTIFACT_SSH_CERT, ARTIFACT_TLS_CERT)}
        | {ARTIFACT_TLS_CAS: b"junk", ARTIFACT_TOKEN_HASH: keys.token_hash(token).encode()}
    )
    with caplog.at_level(logging.WARNING, logger="tbot_py.bot"):
        identity = _obtain(service, storage, token)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith(f"ignoring the bot identity in {storage.describe()}")
    assert identity.tls_identity.generation == 1
    assert _stored(storage) == (identity, keys.token_hash(token))


def test_stored_identity_whose_key_was_swapped_is_ignored_and_the_bot_joins(
    service: RunningAuthService,
    storage: Destination,
    token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = _obtain(service, storage, token)
    storage.write(ARTIFACT_KEY, keys.private_key_pem(keys.generate_private_key()))
    new_token = admin.add_token(service.cluster, BOT).token
    with caplog.at_level(logging.WARNING, logger="tbot_py.bot"):
        rejoined = _obtain(service, storage, new_token)
    assert any("does not match" in r.getMessage() for r in caplog.records)
    assert rejoined.tls_identity.bot_instance_id != first.tls_identity.bot_instance_id


def test_junk_token_hash_is_ignored_and_the_bot_joins(
    service: RunningAuthService, storage: Destination, token: str
) -> None:
    first = _obtain(service, storage, token)
    storage.write(ARTIFACT_TOKEN_HASH, b"\xff\xfe junk")
    new_token = admin.add_token(service.cluster, BOT).token
    rejoined = _obtain(service, storage, new_token)
    assert rejoined.tls_identity.bot_instance_id != first.tls_identity.bot_instance_id


def test_fresh_public_keys_carry_one_key_in_both_encodings() -> None:
    key = keys.generate_private_key()
    public = fresh_public_keys(key)
    assert keys.same_public_key(keys.load_public_key_pem(public.tls), key.public_key())
    assert keys.same_public_key(keys.load_ssh_public_key_line(public.ssh), key.public_key())


# -- delegated (OIDC) joins -------------------------------------------------------------


IDTokenSource = Callable[[str], Awaitable[str]]


def _k8s_token_resource(service: RunningAuthService) -> tuple[IDTokenSource, list[str]]:
    """A bot ``kbot``, a kubernetes static_jwks token ``k8s`` and an ID token source.

    The list records the audience of every ID token the source was asked for.
    """
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    from tbot_py.authservice.join_tokens import parse_join_token_yaml

    signer = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signer.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]})
    admin.add_bot(service.cluster, "kbot", roles=("access",))
    resource = {
        "kind": "token",
        "version": "v2",
        "metadata": {"name": "k8s"},
        "spec": {
            "join_method": "kubernetes",
            "bot_name": "kbot",
            "kubernetes": {
                "type": "static_jwks",
                "static_jwks": {"jwks": jwks},
                "allow": [{"service_account": "ci:deployer"}],
            },
        },
    }
    admin.create_resource(service.cluster, parse_join_token_yaml(json.dumps(resource)))
    asked: list[str] = []

    async def id_token(audience: str) -> str:
        asked.append(audience)
        now = int(utc_now().timestamp())
        claims = {
            "iss": "https://kubernetes.default.svc",
            "sub": "system:serviceaccount:ci:deployer",
            "aud": [audience],
            "iat": now,
            "exp": now + 600,
        }
        return jwt.encode(claims, signer, algorithm="ES256", headers={"kid": "k1"})

    return id_token, asked


def _delegated(
    service: RunningAuthService,
    storage: Destination,
    source: IDTokenSource,
    *,
    clock: Clock = utc_now,
) -> Identity:
    params = JoinParams(
        addr=service.addr,
        token="k8s",
        ca_pins=(service.ca_pin,),
        join_method="kubernetes",
        id_token=source,
    )
    return asyncio.run(obtain_bot_identity(params, storage, TTL, clock))


def test_delegated_join_then_every_renewal_rejoins_keeping_the_instance(
    service: RunningAuthService, storage: Destination
) -> None:
    source, asked = _k8s_token_resource(service)
    first = _delegated(service, storage, source)
    tid = first.tls_identity
    assert (tid.bot_name, tid.generation, tid.renewable) == ("kbot", 1, False)
    second = _delegated(service, storage, source)
    assert second.tls_identity.bot_instance_id == tid.bot_instance_id
    assert second.tls_identity.generation == 2
    assert second.tls_cert_pem != first.tls_cert_pem
    assert _stored(storage)[0].tls_cert_pem == second.tls_cert_pem
    # A fresh ID token for every join, for the cluster's name as the audience.
    assert asked == ["tbot-py.local", "tbot-py.local"]


def test_delegated_identity_expired_locally_joins_as_a_new_instance(
    service: RunningAuthService, storage: Destination
) -> None:
    source, _ = _k8s_token_resource(service)
    first = _delegated(service, storage, source)
    late = _delegated(service, storage, source, clock=_after_expiry(first))
    assert late.tls_identity.bot_instance_id != first.tls_identity.bot_instance_id
    assert late.tls_identity.generation == 1
