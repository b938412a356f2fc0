"""The state database: bots, single-use hashed tokens, generation counters.

The ``storage`` fixture runs each test on SQLite and on PostgreSQL (a throwaway
server, see tests/pg.py); tests that read the SQLite file use ``sqlite_storage``.
"""

from __future__ import annotations

import hashlib
import sqlite3
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tbot_py.authservice import locks
from tbot_py.authservice.bots_store import BotRecord
from tbot_py.authservice.errors import (
    AccessDenied,
    AlreadyExists,
    BadParameter,
    GenerationMismatch,
    Locked,
    NotFound,
    StorageBusy,
)
from tbot_py.authservice.instances_store import RenewalAnswer, admit_instance
from tbot_py.authservice.roles import (
    LOGINS_TRAIT,
    PRESET_ROLES,
    MCPRule,
    RoleConditions,
    new_role,
)
from tbot_py.authservice.storage import (
    SCHEMA_VERSION,
    SchemaTooNew,
    SQLiteBackend,
    Storage,
    get_meta,
)
from tbot_py.identity import keys

from .conftest import theft_denial

NOW = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
TOKEN = "0123456789abcdef0123456789abcdef"


def _with_bot_ci(store: Storage) -> Storage:
    store.bots.add(
        BotRecord(name="ci", roles=("access",), logins=("root",), created_at=NOW),
        token_hash=keys.token_hash(TOKEN),
        token_expires=NOW + timedelta(hours=1),
    )
    return store


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "postgres":
        return _with_bot_ci(Storage.open_postgres(request.getfixturevalue("postgres_dsn")))
    return _with_bot_ci(Storage.open(tmp_path / "state.db"))


@pytest.fixture
def sqlite_storage(tmp_path: Path) -> Storage:
    return _with_bot_ci(Storage.open(tmp_path / "state.db"))


def _reopen(storage: Storage) -> Storage:
    """The same database opened again, as a restarted server would."""
    if storage.path is not None:
        return Storage.open(storage.path)
    return Storage(storage.backend)


def test_new_database_is_private_and_at_the_current_schema_version(tmp_path: Path) -> None:
    store = Storage.open(tmp_path / "state.db")
    assert store.schema_version() == SCHEMA_VERSION
    assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_state_survives_reopening(storage: Storage) -> None:
    reopened = _reopen(storage)
    bot = reopened.bots.get("ci")
    assert bot is not None
    assert (bot.roles, bot.logins, bot.created_at) == (("access",), ("root",), NOW)


def test_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew, match="upgrade tbot-py"):
        Storage.open(path)


def test_token_value_never_reaches_the_database(sqlite_storage: Storage) -> None:
    storage = sqlite_storage
    assert storage.path is not None
    for db_file in storage.path.parent.glob("state.db*"):  # the database, -wal and -shm
        assert TOKEN.encode() not in db_file.read_bytes()
    with sqlite3.connect(storage.path) as conn:
        rows = conn.execute("SELECT token_hash FROM join_tokens").fetchall()
    conn.close()
    assert rows == [(keys.token_hash(TOKEN),)]


def test_adding_an_existing_bot_is_refused(storage: Storage) -> None:
    with pytest.raises(AlreadyExists, match='bot "ci" already exists'):
        storage.bots.add(BotRecord(name="ci", roles=("x",), logins=(), created_at=NOW))


def test_token_for_an_unknown_bot_is_refused(storage: Storage) -> None:
    with pytest.raises(NotFound, match='bot "nope" not found'):
        storage.tokens.add(keys.token_hash("t"), "nope", NOW + timedelta(hours=1), NOW)


def test_consuming_a_token_creates_instance_at_generation_one_and_spends_the_token(
    storage: Storage,
) -> None:
    bot = storage.instances.join(keys.token_hash(TOKEN), instance_id="i-1", now=NOW)
    assert bot.name == "ci"
    instance = storage.instances.get("ci", "i-1")
    assert instance is not None and instance.generation == 1
    with pytest.raises(AccessDenied, match="the token is not valid"):
        storage.instances.join(keys.token_hash(TOKEN), instance_id="i-2", now=NOW)
    assert storage.instances.get("ci", "i-2") is None


def test_expired_token_is_refused_and_dropped(storage: Storage) -> None:
    later = NOW + timedelta(hours=1)
    with pytest.raises(AccessDenied, match="the token is not valid"):
        storage.instances.join(keys.token_hash(TOKEN), instance_id="i-1", now=later)
    assert storage.tokens.count("ci") == 0
    assert storage.instances.get("ci", "i-1") is None


def test_concurrent_joins_with_one_token_admit_exactly_one(storage: Storage) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def join(n: int) -> None:
        barrier.wait()
        try:
            storage.instances.join(keys.token_hash(TOKEN), instance_id=f"i-{n}", now=NOW)
            results.append("ok")
        except AccessDenied:
            results.append("denied")

    threads = [threading.Thread(target=join, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["denied"] * 7 + ["ok"]
    assert storage.bots.list_all()[0].instance_count == 1


KEY_A = b"spki-der-of-key-a"  # renew_instance only hashes the DER it is given
KEY_B = b"spki-der-of-key-b"


class Issuer:
    """Stands in for the CA: records each generation it is asked to issue."""

    def __init__(self, ttl: timedelta = timedelta(hours=1)) -> None:
        self.ttl = ttl
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, generation: int) -> tuple[str, datetime]:
        with self._lock:
            self.calls.append(generation)
        return f'{{"generation": {generation}, "call": {len(self.calls)}}}', NOW + self.ttl


def _renew(
    storage: Storage,
    presented: int,
    key: bytes = KEY_A,
    *,
    now: datetime = NOW,
    issuer: Issuer | None = None,
    instance: str = "i-1",
) -> RenewalAnswer:
    return storage.instances.renew(
        "ci",
        instance,
        presented=presented,
        new_key_spki=key,
        now=now,
        issue=issuer or Issuer(),
    )


def _mismatch(storage: Storage, presented: int, key: bytes = KEY_A, **kw: Any) -> str:
    """Renew expecting a mismatch; the instance is locked, and the message is returned."""
    with pytest.raises(GenerationMismatch) as err:
        _renew(storage, presented, key, **kw)
    assert err.value.presented == presented
    return err.value.message


def _theft(message: str, stored: int, presented: int, instance: str = "i-1") -> str:
    return theft_denial(message, bot="ci", instance=instance, stored=stored, presented=presented)


@pytest.fixture
def one_instance(storage: Storage) -> Storage:
    storage.instances.join(keys.token_hash(TOKEN), instance_id="i-1", now=NOW)
    return storage


def test_renewal_issues_the_next_generation_and_advances(one_instance: Storage) -> None:
    issuer = Issuer()
    first = _renew(one_instance, 1, issuer=issuer)
    assert (first.generation, first.retry, first.expires) == (2, False, NOW + timedelta(hours=1))
    assert _renew(one_instance, 2, KEY_B, issuer=issuer).generation == 3
    assert issuer.calls == [2, 3]
    instance = one_instance.instances.get("ci", "i-1")
    assert instance is not None and instance.generation == 3


def test_retry_with_the_same_generation_and_key_returns_the_stored_answer(
    one_instance: Storage,
) -> None:
    issuer = Issuer()
    first = _renew(one_instance, 1, issuer=issuer)
    later = NOW + timedelta(minutes=5)
    retry = _renew(one_instance, 1, now=later, issuer=issuer)
    assert retry == RenewalAnswer(generation=2, body=first.body, expires=first.expires, retry=True)
    assert issuer.calls == [2]  # nothing issued for the retry
    instance = one_instance.instances.get("ci", "i-1")
    assert instance is not None and (instance.generation, instance.last_seen_at) == (2, later)


def test_same_generation_with_another_key_is_a_mismatch_that_locks_the_instance(
    one_instance: Storage,
) -> None:
    _renew(one_instance, 1, KEY_A)
    message = _mismatch(one_instance, 1, KEY_B)
    assert message == _theft(message, stored=2, presented=1)
    [lock] = one_instance.locks.list_all()
    assert (lock.target_kind, lock.target, lock.created_by) == ("bot_instance", "ci/i-1", "auth")
    # Either holder may be the thief: the real holder's retry is refused by the lock.
    with pytest.raises(Locked) as err:
        _renew(one_instance, 1, KEY_A)
    assert err.value.message == message
    instance = one_instance.instances.get("ci", "i-1")
    assert instance is not None and instance.generation == 2


def test_retry_after_the_stored_answer_expired_is_a_mismatch(one_instance: Storage) -> None:
    first = _renew(one_instance, 1)
    assert _renew(one_instance, 1, now=first.expires - timedelta(seconds=1)).retry
    message = _mismatch(one_instance, 1, now=first.expires)
    assert message == _theft(message, stored=2, presented=1)


def test_generation_older_than_the_last_renewal_is_a_mismatch(one_instance: Storage) -> None:
    _renew(one_instance, 1, KEY_A)
    _renew(one_instance, 2, KEY_B)
    message = _mismatch(one_instance, 1, KEY_A)  # only the latest renewal can be retried
    assert message == _theft(message, stored=3, presented=1)


def test_generation_ahead_of_the_stored_one_is_a_mismatch(one_instance: Storage) -> None:
    message = _mismatch(one_instance, 2)
    assert message == _theft(message, stored=1, presented=2)


def test_renewing_an_unknown_instance_is_denied(storage: Storage) -> None:
    with pytest.raises(AccessDenied, match="not found"):
        _renew(storage, 1, instance="nope")


def test_a_failing_issue_leaves_the_generation_alone(one_instance: Storage) -> None:
    def broken(generation: int) -> tuple[str, datetime]:
        raise RuntimeError("signing failed")

    with pytest.raises(RuntimeError):
        one_instance.instances.renew(
            "ci", "i-1", presented=1, new_key_spki=KEY_A, now=NOW, issue=broken
        )
    assert _renew(one_instance, 1).generation == 2


def test_concurrent_retries_advance_the_generation_once(one_instance: Storage) -> None:
    issuer = Issuer()
    results: list[RenewalAnswer] = []
    barrier = threading.Barrier(8)

    def renew() -> None:
        barrier.wait()
        results.append(_renew(one_instance, 1, issuer=issuer))

    threads = [threading.Thread(target=renew) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert issuer.calls == [2]
    assert len(results) == 8
    assert {(r.generation, r.body) for r in results} == {(2, results[0].body)}
    assert sorted(r.retry for r in results) == [False] + [True] * 7


def test_concurrent_renewals_with_different_keys_admit_exactly_one(one_instance: Storage) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def renew(n: int) -> None:
        barrier.wait()
        try:
            _renew(one_instance, 1, f"key-{n}".encode())
            results.append("ok")
        except AccessDenied:
            results.append("denied")

    threads = [threading.Thread(target=renew, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["denied"] * 7 + ["ok"]
    # The first loser locked the instance; the others were refused by that one lock.
    assert len(one_instance.locks.list_all()) == 1


# -- schema migrations ----------------------------------------------------------------

# The schema exactly as tbot-py created it at user_version 1, frozen here.
SCHEMA_V1_SQL = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE bots (
    name       TEXT PRIMARY KEY,
    roles      TEXT NOT NULL,     -- JSON list of role names
    logins     TEXT NOT NULL,     -- JSON list of SSH logins
    created_at TEXT NOT NULL
);
CREATE TABLE join_tokens (
    token_hash  TEXT PRIMARY KEY, -- keys.token_hash(value), never the value
    bot_name    TEXT NOT NULL REFERENCES bots(name) ON DELETE CASCADE,
    join_method TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX join_tokens_bot ON join_tokens(bot_name);
CREATE TABLE bot_instances (
    id           TEXT PRIMARY KEY,
    bot_name     TEXT NOT NULL REFERENCES bots(name) ON DELETE CASCADE,
    generation   INTEGER NOT NULL,
    created_at   TEXT NOT NULL,
    last_seen_at TEXT NOT NULL
);
CREATE INDEX bot_instances_bot ON bot_instances(bot_name);
PRAGMA user_version = 1;
"""
V1_TIME = "2030-01-02T03:04:05.123456Z"  # NOW, in the stored format


def _make_v1_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA_V1_SQL)
        with conn:
            conn.execute(
                "INSERT INTO bots VALUES ('ci', '[\"access\"]', '[\"root\"]', ?)", (V1_TIME,)
            )
            conn.executemany(
                "INSERT INTO bot_instances VALUES (?, 'ci', ?, ?, ?)",
                [("i-1", 1, V1_TIME, V1_TIME), ("i-2", 2, V1_TIME, V1_TIME)],
            )
    finally:
        conn.close()


def _columns(path: Path, table: str = "bot_instances") -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(f"PRAGMA table_info({table})").fetchall()
    finally:
        conn.close()
    return [(str(r[1]), str(r[2])) for r in rows]


def test_version_1_database_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _make_v1_database(path)
    assert "renewal_answer" not in dict(_columns(path))

    store = Storage.open(path)
    assert store.schema_version() == SCHEMA_VERSION == 7
    fresh = tmp_path / "fresh.db"
    Storage.open(fresh)
    assert _columns(path) == _columns(fresh)

    bot = store.bots.get("ci")
    assert bot is not None and (bot.roles, bot.logins, bot.created_at) == (
        ("access",),
        ("root",),
        NOW,
    )
    old = store.instances.get("ci", "i-2")
    assert old is not None and (old.generation, old.last_seen_at) == (2, NOW)
    # An instance renewed under v1 has no stored answer: the lost renewal stays lost.
    message = _mismatch(store, 1, instance="i-2")
    assert message == _theft(message, stored=2, presented=1, instance="i-2")
    # Renewals after the migration are recorded and can be retried.
    first = _renew(store, 1, instance="i-1")
    assert _renew(store, 1, instance="i-1") == RenewalAnswer(
        generation=2, body=first.body, expires=first.expires, retry=True
    )
    assert Storage.open(path).schema_version() == 7  # reopening is a no-op


# v2 as tbot-py created it: v1 plus the renewal columns, frozen here.
SCHEMA_V2_ADDITIONS = """
ALTER TABLE bot_instances ADD COLUMN renewed_from INTEGER;
ALTER TABLE bot_instances ADD COLUMN renewal_key_sha256 TEXT;
ALTER TABLE bot_instances ADD COLUMN renewal_answer TEXT;
ALTER TABLE bot_instances ADD COLUMN renewal_expires_at TEXT;
PRAGMA user_version = 2;
"""
SCHEMA_V2_SQL = SCHEMA_V1_SQL.replace("PRAGMA user_version = 1;", "") + SCHEMA_V2_ADDITIONS


def _role_names(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [str(r[0]) for r in conn.execute("SELECT name FROM roles ORDER BY name")]
    finally:
        conn.close()


def test_version_2_database_is_migrated_with_the_preset_roles(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA_V2_SQL)
        with conn:
            # A bot from before roles existed, naming a role that is not a preset.
            conn.execute(
                "INSERT INTO bots VALUES ('ci', '[\"access\", \"dev\"]', '[\"root\"]', ?)",
                (V1_TIME,),
            )
    finally:
        conn.close()

    store = Storage.open(path)
    assert store.schema_version() == 7
    assert [role.name for role in store.roles.list_all()] == ["access", "auditor", "editor"]
    access = store.roles.get("access")
    assert access is not None
    assert access.spec.allow.logins == (LOGINS_TRAIT,)
    assert access.spec.allow.app_labels == {"*": "*"}
    assert access.spec.allow.mcp == MCPRule(tools=("*",))
    assert access.max_session_ttl == timedelta(hours=30)
    editor = store.roles.get("editor")
    assert editor is not None
    assert editor.spec.allow == RoleConditions(app_labels={"*": "*"}, db_labels={"*": "*"})
    auditor = store.roles.get("auditor")
    assert auditor is not None and auditor.spec.allow == RoleConditions()
    assert store.roles.list_all() == sorted(PRESET_ROLES, key=lambda r: r.name)
    bot = store.bots.get("ci")
    assert bot is not None and bot.roles == ("access", "dev")  # kept; "dev" grants nothing
    Storage.open(path)  # reopening seeds nothing twice
    assert _role_names(path) == ["access", "auditor", "editor"]


# v3 as tbot-py created it: v2 plus the roles table, frozen here.
SCHEMA_V3_SQL = (
    SCHEMA_V2_SQL.replace("PRAGMA user_version = 2;", "")
    + """
CREATE TABLE roles (
    name       TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
PRAGMA user_version = 3;
"""
)


def _indexes(path: Path, table: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [str(r[1]) for r in conn.execute(f"PRAGMA index_list({table})")]
    finally:
        conn.close()


def test_version_3_database_is_migrated_to_4_with_no_locks_and_keeps_its_renewals(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    answer_expires = NOW + timedelta(hours=1)
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA_V3_SQL)
        with conn:
            conn.execute(
                "INSERT INTO roles VALUES ('access', ?, ?, ?)",
                (PRESET_ROLES[0].model_dump_json(), V1_TIME, V1_TIME),
            )
            conn.execute(
                "INSERT INTO bots VALUES ('ci', '[\"access\"]', '[\"root\"]', ?)", (V1_TIME,)
            )
            # Renewed from 1 to 2 under v3, its answer stored for a retry.
            conn.execute(
                "INSERT INTO bot_instances VALUES ('i-1', 'ci', 2, ?, ?, 1, ?, ?, ?)",
                (
                    V1_TIME,
                    V1_TIME,
                    hashlib.sha256(KEY_A).hexdigest(),
                    '{"generation": 2}',
                    answer_expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                ),
            )
    finally:
        conn.close()

    store = Storage.open(path)
    assert store.schema_version() == SCHEMA_VERSION == 7
    fresh = tmp_path / "fresh.db"
    Storage.open(fresh)
    assert _columns(path, "locks") == _columns(fresh, "locks") != []
    assert _indexes(path, "locks") == _indexes(fresh, "locks")
    assert "locks_target" in _indexes(path, "locks")
    assert store.locks.list_all() == []
    assert store.roles.get("access") == PRESET_ROLES[0]
    # The retry rule carries over, and a mismatch now locks the instance.
    assert _renew(store, 1) == RenewalAnswer(
        generation=2, body='{"generation": 2}', expires=answer_expires, retry=True
    )
    message = _mismatch(store, 1, KEY_B)
    assert message == _theft(message, stored=2, presented=1)
    Storage.open(path)  # reopening is a no-op
    assert len(store.locks.list_all()) == 1


def test_new_database_has_the_preset_roles(tmp_path: Path) -> None:
    store = Storage.open(tmp_path / "state.db")
    assert store.roles.list_all() == sorted(PRESET_ROLES, key=lambda r: r.name)


def test_version_6_database_gets_app_and_db_tables_and_unedited_presets_gain_db_rules(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    Storage.open(path)
    access = PRESET_ROLES[0]
    # The access preset as v6 seeded it, and an editor since edited by an admin.
    old_access = new_role(
        "access",
        description=access.metadata.description,
        allow=RoleConditions(
            logins=(LOGINS_TRAIT,), app_labels={"*": "*"}, mcp=MCPRule(tools=("*",))
        ),
    )
    edited_editor = new_role("editor", allow=RoleConditions(app_labels={"env": "dev"}))
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("DROP TABLE apps")
            conn.execute("DROP TABLE databases")
            for role in (old_access, edited_editor):
                conn.execute(
                    "UPDATE roles SET definition = ? WHERE name = ?",
                    (role.model_dump_json(), role.name),
                )
        conn.execute("PRAGMA user_version = 6")
    finally:
        conn.close()

    store = Storage.open(path)
    assert store.schema_version() == 7
    assert store.apps.list_all() == [] and store.databases.list_all() == []
    assert store.roles.get("access") == access
    assert store.roles.get("editor") == edited_editor
    Storage.open(path)  # reopening is a no-op
    assert store.roles.get("editor") == edited_editor


def test_roles_are_created_replaced_only_with_overwrite_read_and_deleted(
    storage: Storage,
) -> None:
    first = new_role("dev", allow=RoleConditions(logins=("ubuntu",)))
    second = new_role("dev", max_session_ttl=timedelta(hours=1))
    assert storage.roles.put(first, NOW) is False
    with pytest.raises(AlreadyExists, match='role "dev" already exists'):
        storage.roles.put(second, NOW)
    assert storage.roles.get("dev") == first
    assert storage.roles.put(second, NOW, overwrite=True) is True
    assert _reopen(storage).roles.get("dev") == second
    assert storage.roles.get_many(("dev", "nope", "access"))["dev"] == second
    assert set(storage.roles.get_many(("dev", "nope", "access"))) == {"dev", "access"}
    storage.roles.delete("dev")
    assert storage.roles.get("dev") is None
    with pytest.raises(NotFound, match='role "dev" not found'):
        storage.roles.delete("dev")


def test_a_role_in_use_cannot_be_deleted_and_the_error_names_the_bots(storage: Storage) -> None:
    storage.roles.put(new_role("dev"), NOW)
    for name in ("b2", "b1"):
        storage.bots.add(BotRecord(name=name, roles=("dev",), logins=(), created_at=NOW))
    with pytest.raises(BadParameter) as err:
        storage.roles.delete("dev")
    assert err.value.message.startswith('role "dev" is still used by bots b1, b2; ')
    assert "--remove-roles dev" in err.value.message
    assert storage.roles.get("dev") is not None


def test_a_bot_naming_an_unknown_role_is_refused_and_not_created(storage: Storage) -> None:
    with pytest.raises(NotFound) as err:
        storage.bots.add(
            BotRecord(name="new", roles=("access", "x"), logins=(), created_at=NOW),
            token_hash=keys.token_hash("t2"),
            token_expires=NOW + timedelta(hours=1),
        )
    assert err.value.message == (
        'role "x" not found; create it with tbot-py auth create -f role.yaml'
    )
    assert storage.bots.get("new") is None
    assert storage.tokens.count("new") == 0


def test_bot_roles_are_updated_and_a_bot_keeps_at_least_one(storage: Storage) -> None:
    storage.roles.put(new_role("dev"), NOW)
    bot = storage.bots.update_roles("ci", add=("dev", "access"), remove=())
    assert bot.roles == ("access", "dev")
    bot = storage.bots.update_roles("ci", remove=("access",))
    assert bot.roles == ("dev",)
    stored = storage.bots.get("ci")
    assert stored is not None and (stored.roles, stored.logins) == (("dev",), ("root",))
    with pytest.raises(BadParameter, match='bot "ci" needs at least one role'):
        storage.bots.update_roles("ci", remove=("dev",))
    with pytest.raises(BadParameter, match='bot "ci" does not have role "editor"'):
        storage.bots.update_roles("ci", remove=("editor",))
    with pytest.raises(NotFound, match='role "ghost" not found'):
        storage.bots.update_roles("ci", add=("ghost",))
    with pytest.raises(NotFound, match='bot "nope" not found'):
        storage.bots.update_roles("nope", add=("dev",))
    stored = storage.bots.get("ci")
    assert stored is not None and stored.roles == ("dev",)


def test_instances_are_listed_oldest_first(storage: Storage) -> None:
    assert storage.instances.list_for_bot("ci") == []
    storage.tokens.add(keys.token_hash("t2"), "ci", NOW + timedelta(hours=1), NOW)
    storage.instances.join(keys.token_hash(TOKEN), instance_id="i-b", now=NOW)
    later = NOW + timedelta(minutes=1)
    storage.instances.join(keys.token_hash("t2"), instance_id="i-a", now=later)
    instances = storage.instances.list_for_bot("ci")
    assert [(i.id, i.generation, i.created_at) for i in instances] == [
        ("i-b", 1, NOW),
        ("i-a", 1, later),
    ]
    with pytest.raises(NotFound, match='bot "ghost" not found'):
        storage.instances.list_for_bot("ghost")


def test_tokens_are_listed_and_removed_by_an_unambiguous_hash_prefix(storage: Storage) -> None:
    expires = NOW + timedelta(hours=2)
    storage.tokens.add("abcd1111" + "0" * 56, "ci", expires, NOW)
    storage.tokens.add("abcd2222" + "0" * 56, "ci", expires, NOW)
    listed = storage.tokens.list_all()
    assert [(t.token_hash[:8], t.bot_name, t.join_method) for t in listed] == [
        (keys.token_hash(TOKEN)[:8], "ci", "token"),
        ("abcd1111", "ci", "token"),
        ("abcd2222", "ci", "token"),
    ]
    with pytest.raises(BadParameter, match='token id "abcd" is ambiguous: 2 tokens match'):
        storage.tokens.remove("abcd")
    assert storage.tokens.remove("abcd1").token_hash.startswith("abcd1111")
    with pytest.raises(NotFound, match='no join token with id "abcd1"'):
        storage.tokens.remove("abcd1")
    assert storage.tokens.count("ci") == 2


def test_removing_a_bot_removes_its_tokens_and_instances(storage: Storage) -> None:
    storage.tokens.add(keys.token_hash("other"), "ci", NOW + timedelta(hours=1), NOW)
    storage.instances.join(keys.token_hash(TOKEN), instance_id="i-1", now=NOW)
    storage.bots.remove("ci")
    assert storage.bots.get("ci") is None
    assert storage.instances.get("ci", "i-1") is None
    assert storage.tokens.count("ci") == 0
    with pytest.raises(NotFound):
        storage.bots.remove("ci")


def test_list_bots_counts_instances(storage: Storage) -> None:
    storage.roles.put(new_role("r"), NOW)
    storage.bots.add(BotRecord(name="a-bot", roles=("r",), logins=(), created_at=NOW))
    storage.instances.join(keys.token_hash(TOKEN), instance_id="i-1", now=NOW)
    summaries = storage.bots.list_all()
    assert [(s.bot.name, s.instance_count) for s in summaries] == [("a-bot", 0), ("ci", 1)]


def test_meta_values_can_be_set_and_replaced(storage: Storage) -> None:
    assert storage.get_meta("k") is None
    storage.set_meta("k", "v1")
    storage.set_meta("k", "v2")
    assert storage.get_meta("k") == "v2"


def test_locks_are_stored_enforced_on_join_and_renewal_and_removed(storage: Storage) -> None:
    storage.instances.join(keys.token_hash(TOKEN), instance_id="i-1", now=NOW)
    lock = locks.new_lock(
        locks.KIND_BOT_INSTANCE, "ci/i-1", "lost laptop", created_by="admin", now=NOW
    )
    storage.locks.add(lock)
    expired = locks.new_lock(
        locks.KIND_BOT, "ci", "old", created_by="admin", now=NOW, ttl=timedelta(seconds=1)
    )
    storage.locks.add(expired)
    assert {stored.id for stored in storage.locks.list_all()} == {lock.id, expired.id}
    with pytest.raises(Locked, match="lost laptop"):
        _renew(storage, 1, now=NOW + timedelta(seconds=2))
    with pytest.raises(NotFound, match="not found"):
        storage.locks.add(locks.new_lock(locks.KIND_BOT, "nope", "x", created_by="a", now=NOW))
    assert storage.locks.remove(lock.id) == lock
    assert _renew(storage, 1, now=NOW + timedelta(seconds=2)).generation == 2
    with pytest.raises(NotFound, match="no lock with id"):
        storage.locks.remove(lock.id)


def test_admission_asks_for_last_seen_once_a_minute_and_record_seen_writes_it(
    one_instance: Storage,
) -> None:
    def last_seen() -> datetime:
        instance = one_instance.instances.get("ci", "i-1")
        assert instance is not None
        return instance.last_seen_at

    def due(instance_id: str, now: datetime) -> bool:
        return one_instance.read(lambda conn: admit_instance(conn, "ci", instance_id, now))

    start = last_seen()
    assert not due("i-1", start + timedelta(seconds=30))  # within the resolution: no write
    later = start + timedelta(seconds=61)
    assert due("i-1", later)
    one_instance.instances.record_seen("ci", "i-1", later)
    assert last_seen() == later
    assert not due("i-1", later + timedelta(seconds=1))
    with pytest.raises(AccessDenied, match="not found"):
        due("i-missing", later)
    with pytest.raises(AccessDenied, match="not found"):
        one_instance.instances.record_seen("ci", "i-missing", later)


def test_admission_and_record_seen_refuse_a_locked_instance(one_instance: Storage) -> None:
    one_instance.locks.add(
        locks.new_lock(locks.KIND_BOT_INSTANCE, "ci/i-1", "stolen", created_by="admin", now=NOW)
    )
    later = NOW + timedelta(minutes=5)
    with pytest.raises(Locked, match="stolen"):
        one_instance.read(lambda conn: admit_instance(conn, "ci", "i-1", later))
    # The write checks again: a lock made after the caller was admitted still stops it.
    with pytest.raises(Locked, match="stolen"):
        one_instance.instances.record_seen("ci", "i-1", later)


def test_a_read_that_may_not_wait_is_not_held_up_by_a_writer(sqlite_storage: Storage) -> None:
    # WAL: a reader never waits for a writer, so the server reads on its event loop.
    writer = sqlite3.connect(str(sqlite_storage.path), isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO meta (key, value) VALUES ('k', 'uncommitted')")
        assert sqlite_storage.read(lambda conn: get_meta(conn, "k"), wait=False) is None
        writer.execute("COMMIT")
    finally:
        writer.close()
    assert sqlite_storage.read(lambda conn: get_meta(conn, "k"), wait=False) == "uncommitted"


def test_a_read_that_may_not_wait_raises_storage_busy_and_leaves_no_transaction(
    tmp_path: Path,
) -> None:
    # Without WAL (a fresh file, never prepared) an exclusive writer does block readers.
    backend = SQLiteBackend(tmp_path / "t.db")
    with backend.transaction(write=True) as conn:
        conn.execute("CREATE TABLE t (v INTEGER)")
    holder = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO t VALUES (1)")
        busy = pytest.raises(StorageBusy, match="locked by another connection")
        with busy, backend.transaction(wait=False) as conn:
            conn.execute("SELECT COUNT(*) FROM t").fetchone()
        holder.execute("COMMIT")
    finally:
        holder.close()
    with backend.transaction(wait=False) as conn:
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1


def test_postgres_never_reads_without_waiting() -> None:
    from tbot_py.authservice._postgres import PostgresBackend

    # No server needed: it refuses before connecting, since every statement is a round trip.
    backend = PostgresBackend("postgres://tbot@127.0.0.1:1/none")
    with pytest.raises(StorageBusy, match="network"), backend.transaction(wait=False):
        pass


def test_a_failed_commit_leaves_the_reused_connection_usable(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "t.db")
    with backend.transaction(write=True) as conn:
        conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
        )
    with pytest.raises(sqlite3.IntegrityError), backend.transaction(write=True) as conn:
        conn.execute("INSERT INTO child VALUES (42)")  # the deferred check fails at COMMIT
    # The same (per-thread) connection is reused: it must not still be in a transaction.
    with backend.transaction(write=True) as conn:
        assert conn.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 0
