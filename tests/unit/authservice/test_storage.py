"""SQLite state: bots, single-use hashed tokens, generation counters."""

from __future__ import annotations

import sqlite3
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tbot_py.authservice.errors import AccessDenied, AlreadyExists, NotFound
from tbot_py.authservice.storage import SCHEMA_VERSION, BotRecord, SchemaTooNew, Storage
from tbot_py.identity import keys

NOW = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    store = Storage.open(tmp_path / "state.db")
    store.add_bot(
        BotRecord(name="ci", roles=("access",), logins=("root",), created_at=NOW),
        token_hash=keys.token_hash(TOKEN),
        token_expires=NOW + timedelta(hours=1),
    )
    return store


def test_new_database_is_private_and_at_the_current_schema_version(tmp_path: Path) -> None:
    store = Storage.open(tmp_path / "state.db")
    assert store.schema_version() == SCHEMA_VERSION
    assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_state_survives_reopening(storage: Storage) -> None:
    reopened = Storage.open(storage.path)
    bot = reopened.get_bot("ci")
    assert bot is not None
    assert (bot.roles, bot.logins, bot.created_at) == (("access",), ("root",), NOW)


def test_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew, match="upgrade tbot-py"):
        Storage.open(path)


def test_token_value_never_reaches_the_database(storage: Storage) -> None:
    for db_file in storage.path.parent.glob("state.db*"):  # the database, -wal and -shm
        assert TOKEN.encode() not in db_file.read_bytes()
    with sqlite3.connect(storage.path) as conn:
        rows = conn.execute("SELECT token_hash FROM join_tokens").fetchall()
    conn.close()
    assert rows == [(keys.token_hash(TOKEN),)]


def test_adding_an_existing_bot_is_refused(storage: Storage) -> None:
    with pytest.raises(AlreadyExists, match='bot "ci" already exists'):
        storage.add_bot(BotRecord(name="ci", roles=("x",), logins=(), created_at=NOW))


def test_token_for_an_unknown_bot_is_refused(storage: Storage) -> None:
    with pytest.raises(NotFound, match='bot "nope" not found'):
        storage.add_token(keys.token_hash("t"), "nope", NOW + timedelta(hours=1), NOW)


def test_consuming_a_token_creates_instance_at_generation_one_and_spends_the_token(
    storage: Storage,
) -> None:
    bot = storage.consume_token(keys.token_hash(TOKEN), instance_id="i-1", now=NOW)
    assert bot.name == "ci"
    instance = storage.get_instance("ci", "i-1")
    assert instance is not None and instance.generation == 1
    with pytest.raises(AccessDenied, match="the token is not valid"):
        storage.consume_token(keys.token_hash(TOKEN), instance_id="i-2", now=NOW)
    assert storage.get_instance("ci", "i-2") is None


def test_expired_token_is_refused_and_dropped(storage: Storage) -> None:
    later = NOW + timedelta(hours=1)
    with pytest.raises(AccessDenied, match="the token is not valid"):
        storage.consume_token(keys.token_hash(TOKEN), instance_id="i-1", now=later)
    assert storage.count_tokens("ci") == 0
    assert storage.get_instance("ci", "i-1") is None


def test_concurrent_joins_with_one_token_admit_exactly_one(storage: Storage) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def join(n: int) -> None:
        barrier.wait()
        try:
            storage.consume_token(keys.token_hash(TOKEN), instance_id=f"i-{n}", now=NOW)
            results.append("ok")
        except AccessDenied:
            results.append("denied")

    threads = [threading.Thread(target=join, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["denied"] * 7 + ["ok"]
    assert storage.list_bots()[0].instance_count == 1


def test_advance_generation_bumps_the_presented_generation(storage: Storage) -> None:
    storage.consume_token(keys.token_hash(TOKEN), instance_id="i-1", now=NOW)
    assert storage.advance_generation("ci", "i-1", 1, NOW) == 2
    assert storage.advance_generation("ci", "i-1", 2, NOW) == 3
    instance = storage.get_instance("ci", "i-1")
    assert instance is not None and instance.generation == 3


def test_stale_generation_is_a_mismatch_naming_both_numbers(storage: Storage) -> None:
    storage.consume_token(keys.token_hash(TOKEN), instance_id="i-1", now=NOW)
    storage.advance_generation("ci", "i-1", 1, NOW)
    with pytest.raises(AccessDenied) as err:
        storage.advance_generation("ci", "i-1", 1, NOW)
    assert err.value.message == "cert generation mismatch for bot ci/i-1: stored=2, presented=1"


def test_advancing_an_unknown_instance_is_denied(storage: Storage) -> None:
    with pytest.raises(AccessDenied, match="not found"):
        storage.advance_generation("ci", "nope", 1, NOW)


def test_removing_a_bot_removes_its_tokens_and_instances(storage: Storage) -> None:
    storage.add_token(keys.token_hash("other"), "ci", NOW + timedelta(hours=1), NOW)
    storage.consume_token(keys.token_hash(TOKEN), instance_id="i-1", now=NOW)
    storage.remove_bot("ci")
    assert storage.get_bot("ci") is None
    assert storage.get_instance("ci", "i-1") is None
    assert storage.count_tokens("ci") == 0
    with pytest.raises(NotFound):
        storage.remove_bot("ci")


def test_list_bots_counts_instances(storage: Storage) -> None:
    storage.add_bot(BotRecord(name="a-bot", roles=("r",), logins=(), created_at=NOW))
    storage.consume_token(keys.token_hash(TOKEN), instance_id="i-1", now=NOW)
    summaries = storage.list_bots()
    assert [(s.bot.name, s.instance_count) for s in summaries] == [("a-bot", 0), ("ci", 1)]


def test_meta_values_can_be_set_and_replaced(storage: Storage) -> None:
    assert storage.get_meta("k") is None
    storage.set_meta("k", "v1")
    storage.set_meta("k", "v2")
    assert storage.get_meta("k") == "v2"
