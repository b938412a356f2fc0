"""Idempotent renewal: a bot that lost the answer to a renewal retries it and gets it again."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

import httpx
import pytest

from tbot_py.authservice import admin
from tbot_py.client import wire
from tbot_py.identity import keys

from .conftest import AuthClient, Issued, ShiftedClock, public_keys, theft_denial


def _renew_with(
    client: AuthClient, identity: Issued, key: keys.PrivateKey, *, expires: datetime | None = None
) -> httpx.Response:
    """Renew with a key we chose, as a daemon that saved its new key before asking does."""
    req = wire.RenewRequest(keys=public_keys(key), expires=expires)
    return client.request("POST", wire.PATH_RENEW, identity=identity, json=req.to_json())


def _stored_generation(client: AuthClient, identity: Issued) -> int:
    instance = client.cluster.storage.instances.get("ci", identity.identity.bot_instance_id)
    assert instance is not None
    return instance.generation


def _assert_theft_lock(resp: httpx.Response, identity: Issued, stored: int, presented: int) -> None:
    assert resp.status_code == 403
    message = wire.error_message(resp.json()) or ""
    instance = identity.identity.bot_instance_id
    assert message == theft_denial(
        message, bot="ci", instance=instance, stored=stored, presented=presented
    )


def test_retry_with_the_same_generation_and_key_gets_the_identical_answer(
    client: AuthClient, joined: Issued, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tbot_py.authservice")
    key = keys.generate_private_key()
    first = _renew_with(client, joined, key)
    assert first.status_code == 200, first.text
    retry = _renew_with(client, joined, key)  # the bot crashed before saving `first`
    assert retry.status_code == 200, retry.text
    assert retry.content == first.content
    assert retry.headers["content-type"] == first.headers["content-type"]
    assert _stored_generation(client, joined) == 2
    renewed = client.save(key, wire.Certs.from_json(retry.json()))
    assert renewed.identity.generation == 2
    assert keys.same_public_key(renewed.cert.public_key(), key.public_key())  # type: ignore[arg-type]
    retries = [r for r in caplog.records if "idempotent retry" in r.getMessage()]
    assert len(retries) == 1 and retries[0].levelno == logging.INFO


def test_the_retried_answer_renews_normally_afterwards(client: AuthClient, joined: Issued) -> None:
    key = keys.generate_private_key()
    assert _renew_with(client, joined, key).status_code == 200
    retry = _renew_with(client, joined, key)
    assert retry.status_code == 200
    renewed = client.save(key, wire.Certs.from_json(retry.json()))
    again = client.renewed(renewed)
    assert again.identity.generation == 3
    assert _stored_generation(client, joined) == 3


def test_same_generation_with_a_different_key_is_refused_as_theft_and_locks_the_instance(
    client: AuthClient, joined: Issued
) -> None:
    key = keys.generate_private_key()
    first = _renew_with(client, joined, key)
    assert first.status_code == 200
    # A second holder of the generation-1 certificate, asking for its own key.
    stolen = _renew_with(client, joined, keys.generate_private_key())
    _assert_theft_lock(stolen, joined, stored=2, presented=1)
    assert _stored_generation(client, joined) == 2
    # Which holder is the thief is unknown: the real one is locked out too, even its retry.
    retry = _renew_with(client, joined, key)
    assert retry.status_code == 403
    assert retry.json() == stolen.json()


def test_concurrent_retries_all_get_the_one_answer(client: AuthClient, joined: Issued) -> None:
    key = keys.generate_private_key()
    bodies: list[bytes] = []
    barrier = threading.Barrier(6)

    def renew() -> None:
        barrier.wait()
        resp = _renew_with(client, joined, key)
        assert resp.status_code == 200, resp.text
        bodies.append(resp.content)

    threads = [threading.Thread(target=renew) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(bodies) == 6 and len(set(bodies)) == 1
    assert _stored_generation(client, joined) == 2


def test_renewals_from_n_are_refused_once_the_bot_is_at_n_plus_2(
    client: AuthClient, joined: Issued
) -> None:
    key = keys.generate_private_key()
    first = _renew_with(client, joined, key)
    renewed = client.save(key, wire.Certs.from_json(first.json()))
    client.renewed(renewed)
    for retry_key in (key, keys.generate_private_key()):
        # The first locks the instance; the second is refused by that lock, same message.
        _assert_theft_lock(_renew_with(client, joined, retry_key), joined, stored=3, presented=1)
    assert _stored_generation(client, joined) == 3


def test_retry_after_the_stored_answer_expired_is_refused(
    clocked_client: AuthClient, clock: ShiftedClock
) -> None:
    client = clocked_client
    created = admin.add_bot(client.cluster, "ci", roles=("access",), logins=("root",))
    joined = client.join(created.token.token)  # valid for the default hour
    key = keys.generate_private_key()
    first = _renew_with(client, joined, key, expires=clock() + timedelta(minutes=10))
    assert first.status_code == 200, first.text

    clock.offset = timedelta(minutes=9)
    assert _renew_with(client, joined, key).content == first.content

    # The generation-1 certificate is still valid; the answer it would get is not.
    clock.offset = timedelta(minutes=11)
    assert joined.cert.not_valid_after_utc > clock()
    _assert_theft_lock(_renew_with(client, joined, key), joined, stored=2, presented=1)
    assert _stored_generation(client, joined) == 2
