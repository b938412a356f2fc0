"""Locks over real TLS: theft detection locks one instance, and every call checks locks."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from typing import Any

import httpx
import pytest

from tbot_py.authservice import admin
from tbot_py.authservice.storage import SQLiteBackend
from tbot_py.client import wire
from tbot_py.identity import keys

from .conftest import AuthClient, Issued, ShiftedClock, lock_id_in, theft_denial
from .test_audit import audit_events, bad_join


def _calls(client: AuthClient, identity: Issued) -> dict[str, httpx.Response]:
    """renew, certs and cas as ``identity``: every authenticated call a bot makes."""
    renew, _ = client.renew(identity)
    certs, _ = client.impersonate(identity)
    cas = client.request("GET", wire.PATH_CAS, identity=identity)
    return {"renew": renew, "certs": certs, "cas": cas}


def _refusals(client: AuthClient, identity: Issued) -> dict[str, tuple[int, str | None]]:
    return {
        name: (resp.status_code, wire.error_message(resp.json()))
        for name, resp in _calls(client, identity).items()
    }


def _steal(client: AuthClient, joined: Issued) -> tuple[Issued, str]:
    """Renew ``joined`` once, then renew its stale copy with another key: the theft case.

    Returns the renewed (generation 2) identity and the 403 message the copy got.
    """
    renewed = client.renewed(joined)
    resp, _ = client.renew(joined)
    assert resp.status_code == 403, resp.text
    message = wire.error_message(resp.json()) or ""
    instance = joined.identity.bot_instance_id
    assert message == theft_denial(message, bot="ci", instance=instance, stored=2, presented=1)
    return renewed, message


def _events(client: AuthClient, name: str) -> list[dict[str, Any]]:
    return audit_events(client.cluster.data_dir, name)


def test_a_mismatch_locks_only_that_instance_and_a_sibling_keeps_working(
    client: AuthClient, joined: Issued
) -> None:
    sibling = client.join(admin.add_token(client.cluster, "ci").token)
    _steal(client, joined)
    [lock] = admin.list_locks(client.cluster)
    assert (lock.target_kind, lock.target) == (
        "bot_instance",
        f"ci/{joined.identity.bot_instance_id}",
    )
    assert lock.created_by == "auth" and lock.expires_at is None
    assert lock.message == (
        "certificate generation mismatch (stored=2, presented=1): possible stolen credentials"
    )
    for name, resp in _calls(client, sibling).items():
        assert resp.status_code == 200, (name, resp.text)
    stored = client.cluster.storage.instances.get("ci", sibling.identity.bot_instance_id)
    assert stored is not None and stored.generation == 2


def test_a_locked_instance_is_refused_on_renew_certs_and_cas(
    client: AuthClient, joined: Issued
) -> None:
    renewed, message = _steal(client, joined)
    # The holder of the current generation is refused too: it may be the thief.
    assert _refusals(client, renewed) == {
        name: (403, message) for name in ("renew", "certs", "cas")
    }
    assert _refusals(client, joined) == {name: (403, message) for name in ("renew", "certs", "cas")}
    assert len(admin.list_locks(client.cluster)) == 1  # refusals by a lock add none


def test_the_lock_is_audited_as_lock_created_next_to_the_refused_renewal(
    client: AuthClient, joined: Issued
) -> None:
    _, message = _steal(client, joined)
    instance = joined.identity.bot_instance_id
    [created] = _events(client, "lock.created")
    assert created["success"] is True and created["code"] == 0
    assert created["actor"] == {"bot": "ci", "instance": instance}
    assert created["remote_addr"] == "127.0.0.1"
    assert created["resource"] == f"lock/{lock_id_in(message)}"
    assert created["details"] == {
        "target_kind": "bot_instance",
        "target": f"ci/{instance}",
        "message": "certificate generation mismatch (stored=2, presented=1): "
        "possible stolen credentials",
        "created_by": "auth",
        "stored_generation": 2,
        "presented_generation": 1,
    }
    refused = _events(client, "bot.renew")[-1]
    assert (refused["success"], refused["code"], refused["message"]) == (False, 403, message)


def test_a_legitimate_retry_is_answered_and_never_locks(client: AuthClient, joined: Issued) -> None:
    key = keys.generate_private_key()
    first = client.renew(joined, key=key)[0]
    # The bot lost the answer: the same generation and the same key come again. The retry
    # rule is checked before a mismatch is declared, so this is answered, not locked.
    for _ in range(3):
        retry = client.renew(joined, key=key)[0]
        assert retry.status_code == 200, retry.text
        assert retry.content == first.content
    assert admin.list_locks(client.cluster) == []
    assert _events(client, "lock.created") == []
    renewed = client.save(key, wire.Certs.from_json(first.json()))
    assert client.renewed(renewed).identity.generation == 3


def test_after_locks_rm_a_new_join_replaces_the_instance_and_the_stolen_copy_stays_locked(
    client: AuthClient, joined: Issued
) -> None:
    renewed, message = _steal(client, joined)
    admin.remove_lock(client.cluster, lock_id_in(message))
    assert admin.list_locks(client.cluster) == []

    replacement = client.join(admin.add_token(client.cluster, "ci").token)
    assert replacement.identity.generation == 1
    assert replacement.identity.bot_instance_id != joined.identity.bot_instance_id
    assert client.renewed(replacement).identity.generation == 2

    # The stolen generation-1 copy cannot come back: it locks the old instance again,
    # for every holder, while the replacement is unaffected.
    again, _ = client.renew(joined)
    relock = wire.error_message(again.json()) or ""
    assert relock == theft_denial(
        relock, bot="ci", instance=joined.identity.bot_instance_id, stored=2, presented=1
    )
    assert lock_id_in(relock) != lock_id_in(message)
    assert {status for status, _ in _refusals(client, renewed).values()} == {403}
    assert client.request("GET", wire.PATH_CAS, identity=replacement).status_code == 200


def test_a_join_for_a_bot_whose_other_instance_is_locked_makes_a_new_instance(
    client: AuthClient, joined: Issued
) -> None:
    _steal(client, joined)
    fresh = client.join(admin.add_token(client.cluster, "ci").token)
    assert fresh.identity.generation == 1
    assert client.renewed(fresh).identity.generation == 2


def test_a_bot_lock_refuses_joins_without_spending_the_token_and_every_instance(
    client: AuthClient, joined: Issued
) -> None:
    lock = admin.add_lock(client.cluster, bot="ci", message="incident 42")
    token = admin.add_token(client.cluster, "ci").token
    denial = f"bot ci is locked: incident 42 (lock {lock.id})"
    assert bad_join(client, token) == denial
    assert client.cluster.storage.tokens.count("ci") == 1  # not spent
    assert len(client.cluster.storage.instances.list_for_bot("ci")) == 1
    assert _refusals(client, joined) == {name: (403, denial) for name in ("renew", "certs", "cas")}

    admin.remove_lock(client.cluster, lock.id)
    assert client.join(token).identity.generation == 1  # the same token now works
    assert client.renewed(joined).identity.generation == 2


def test_an_invalid_token_for_a_locked_bot_still_gets_the_token_error(
    client: AuthClient, bot_token: str
) -> None:
    admin.add_lock(client.cluster, bot="ci")
    message = bad_join(client)  # a guess learns nothing about locks
    assert "the token is not valid" in message and "locked" not in message


def test_an_expired_lock_is_ignored(clocked_client: AuthClient, clock: ShiftedClock) -> None:
    client = clocked_client
    created = admin.add_bot(client.cluster, "ci", roles=("access",), logins=("root",))
    joined = client.join(created.token.token)
    instance = f"ci/{joined.identity.bot_instance_id}"
    admin.add_lock(client.cluster, bot="ci", ttl=timedelta(minutes=10), now=clock())
    admin.add_lock(client.cluster, instance=instance, ttl=timedelta(minutes=20), now=clock())
    token = admin.add_token(client.cluster, "ci").token

    clock.offset = timedelta(minutes=11)  # the bot lock has expired, the instance lock not
    assert {status for status, _ in _refusals(client, joined).values()} == {403}
    assert "bot instance" in (wire.error_message(client.renew(joined)[0].json()) or "")
    # Not used over TLS below: it is not yet valid by the real clock TLS checks.
    assert client.join(token).identity.generation == 1

    clock.offset = timedelta(minutes=21)
    for name, resp in _calls(client, joined).items():
        assert resp.status_code == 200, (name, resp.text)
    assert len(admin.list_locks(client.cluster)) == 2  # expired, not deleted


def test_checking_locks_is_one_indexed_query_per_call(
    client: AuthClient, joined: Issued, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[str] = []
    connection = SQLiteBackend._connection

    def traced(backend: SQLiteBackend, busy_timeout_ms: int) -> sqlite3.Connection:
        # Reused per thread, so trace each time it is handed out.
        conn = connection(backend, busy_timeout_ms)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(SQLiteBackend, "_connection", traced)
    calls = {
        "renew": lambda: client.renew(joined)[0],
        "certs": lambda: client.impersonate(joined)[0],
        "cas": lambda: client.request("GET", wire.PATH_CAS, identity=joined),
    }
    for name, call in calls.items():
        statements.clear()
        resp = call()
        assert resp.status_code == 200, (name, resp.text)
        lock_queries = [s for s in statements if "FROM locks" in s]
        assert len(lock_queries) == 1, (name, lock_queries)
        with sqlite3.connect(client.cluster.storage.path) as conn:
            plan = [str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + lock_queries[0])]
        conn.close()
        assert any("USING INDEX locks_target" in step for step in plan), plan
        assert not any(step.startswith("SCAN locks") for step in plan), plan
