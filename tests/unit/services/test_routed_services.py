"""The application and database outputs: one generation against a real auth service."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509

from tbot_py.authservice import admin
from tbot_py.authservice.apps import (
    App,
    AppMetadata,
    AppSpec,
    Database,
    DatabaseMetadata,
    DatabaseSpec,
)
from tbot_py.authservice.roles import RoleConditions, new_role
from tbot_py.authservice.server import RunningAuthService
from tbot_py.bot.identity import JoinParams, fresh_public_keys, obtain_bot_identity
from tbot_py.client import tls, wire
from tbot_py.client.http import AuthClient
from tbot_py.destinations import DirectoryDestination, MemoryDestination
from tbot_py.errors import Error
from tbot_py.identity import keys
from tbot_py.identity.tlsid import TLSIdentity
from tbot_py.services.application import ApplicationOutputSettings, ApplicationService
from tbot_py.services.base import BotContext, GenerateResult, OutputService
from tbot_py.services.database import DatabaseFormat, DatabaseOutputSettings, DatabaseService
from tests.unit.conftest import utc_now

TTL = timedelta(minutes=30)
T = TypeVar("T")


GRAFANA = App(
    metadata=AppMetadata(name="grafana", labels={"env": "dev"}),
    spec=AppSpec(uri="http://127.0.0.1:3000"),
)
PG = Database(
    metadata=DatabaseMetadata(name="pg", labels={"env": "dev"}),
    spec=DatabaseSpec(protocol="postgres", uri="127.0.0.1:5432"),
)
#: Routes to the dev app and database, as user alice on database orders.
DEV_ROUTES = new_role(
    "apps",
    allow=RoleConditions(
        app_labels={"env": "dev"},
        db_labels={"env": "dev"},
        db_users=("alice",),
        db_names=("orders",),
    ),
)


def _with_bot(service: RunningAuthService, use: Callable[[BotContext], Awaitable[T]]) -> T:
    for resource in (GRAFANA, PG):
        admin.create_resource(service.cluster, resource)
    admin.create_role(service.cluster, DEV_ROUTES)
    token = admin.add_bot(service.cluster, "robot", roles=("apps",)).token.token

    async def main() -> T:
        params = JoinParams(addr=service.addr, token=token, ca_pins=(service.ca_pin,))
        bot_identity = await obtain_bot_identity(
            params, MemoryDestination(), timedelta(hours=1), utc_now
        )
        ctx = tls.mtls_context(
            bot_identity.tls_cert_pem, bot_identity.private_key_pem, bot_identity.tls_ca_pems
        )
        async with AuthClient(service.addr, ctx, timeout=5.0) as client:
            bot = BotContext(
                client=client,
                bot_identity=bot_identity,
                ping=await client.ping(),
                cert_authorities=tuple(await client.cert_authorities()),
                clock=utc_now,
            )
            return await use(bot)

    return asyncio.run(main())


def _generate(service: RunningAuthService, output: OutputService) -> GenerateResult:
    output.init()
    return _with_bot(service, output.generate)


def _openssl(*args: str | Path) -> str:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=True
    ).stdout


def _subject(cert: Path) -> str:
    return _openssl("x509", "-in", cert, "-noout", "-subject", "-nameopt", "oid,sep_multiline")


def _assert_key_matches(cert: Path, key: Path) -> None:
    assert _openssl("x509", "-in", cert, "-noout", "-pubkey") == _openssl(
        "pkey", "-in", key, "-pubout"
    )


@pytest.mark.parametrize(
    ("specific", "expected"),
    [
        (
            False,
            {
                "tlscert",
                "key",
                "teleport-host-ca.crt",
                "teleport-user-ca.crt",
                "teleport-database-ca.crt",
            },
        ),
        (
            True,
            {
                "tlscert",
                "key",
                "teleport-host-ca.crt",
                "teleport-user-ca.crt",
                "teleport-database-ca.crt",
                "tls.crt",
                "tls.key",
                "tls.cas",
            },
        ),
    ],
)
def test_application_writes_a_cert_routed_to_the_app(
    service: RunningAuthService, tmp_path: Path, specific: bool, expected: set[str]
) -> None:
    out = tmp_path / "out"
    settings = ApplicationOutputSettings(
        name="app", app_name="grafana", specific_tls_extensions=specific, ttl=TTL
    )
    result = _generate(service, ApplicationService(settings, DirectoryDestination(out)))
    assert set(result.files) == expected
    assert _openssl("verify", "-CAfile", out / "teleport-user-ca.crt", out / "tlscert") == (
        f"{out / 'tlscert'}: OK\n"
    )
    subject = _subject(out / "tlscert").replace(" ", "").splitlines()
    assert "1.3.9999.1.10=grafana" in subject, subject
    assert not [line for line in subject if line.startswith("1.3.9999.2.1=")], subject
    _assert_key_matches(out / "tlscert", out / "key")
    assert (out / "teleport-host-ca.crt").read_bytes() == service.cluster.cas.host.cert_pem
    if specific:
        assert (out / "tls.crt").read_bytes() == (out / "tlscert").read_bytes()
        assert (out / "tls.key").read_bytes() == (out / "key").read_bytes()
        assert (out / "tls.cas").read_bytes() == service.cluster.cas.host.cert_pem
    assert result.identity.not_after - result.identity.not_before <= TTL + timedelta(minutes=2)


_DB_BASE = {"tlscert", "key", "teleport-database-ca.crt"}


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("", _DB_BASE),
        ("tls", _DB_BASE | {"tls.key", "tls.crt", "tls.cas"}),
        ("mongo", _DB_BASE | {"mongo.crt", "mongo.cas"}),
    ],
)
def test_database_writes_tbots_artifacts_per_format(
    service: RunningAuthService, tmp_path: Path, fmt: DatabaseFormat, expected: set[str]
) -> None:
    out = tmp_path / "out"
    settings = DatabaseOutputSettings(
        name="db", service="pg", database="orders", username="alice", format=fmt, ttl=TTL
    )
    result = _generate(service, DatabaseService(settings, DirectoryDestination(out)))
    assert set(result.files) == expected
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == expected
    subject = _subject(out / "tlscert").replace(" ", "")
    for field in ("1.3.9999.2.1=pg", "1.3.9999.2.3=alice", "1.3.9999.2.4=orders"):
        assert field in subject.splitlines(), subject
    assert "1.3.9999.1.10=" not in subject
    _assert_key_matches(out / "tlscert", out / "key")
    user_ca = tmp_path / "user-ca.pem"
    user_ca.write_bytes(service.cluster.cas.user.cert_pem)
    assert _openssl("verify", "-CAfile", user_ca, out / "tlscert").endswith(": OK\n")
    assert (out / "teleport-database-ca.crt").read_bytes() == service.cluster.cas.db.cert_pem
    if fmt == "mongo":
        # mongo.crt: the certificate, then its key; openssl reads both from the one file.
        both = (out / "mongo.crt").read_bytes()
        assert both == (out / "tlscert").read_bytes() + (out / "key").read_bytes()
        _assert_key_matches(out / "mongo.crt", out / "mongo.crt")
        assert (out / "mongo.cas").read_bytes() == service.cluster.cas.db.cert_pem
    if fmt == "tls":
        _assert_key_matches(out / "tls.crt", out / "tls.key")
        assert (out / "tls.cas").read_bytes() == service.cluster.cas.host.cert_pem


_COCKROACH = {"cockroach/node.crt", "cockroach/node.key", "cockroach/ca.crt"}


def test_database_cockroach_format_writes_a_subdirectory_published_with_the_set(
    service: RunningAuthService, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    settings = DatabaseOutputSettings(
        name="db", service="pg", database="orders", username="alice", format="cockroach", ttl=TTL
    )
    result = _generate(service, DatabaseService(settings, DirectoryDestination(out)))
    assert set(result.files) == _DB_BASE | _COCKROACH
    top = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert top == _DB_BASE | {"cockroach"}
    assert (out / "cockroach").readlink() == Path("..data/cockroach")
    assert sorted(p.name for p in (out / "cockroach").iterdir()) == [
        "ca.crt",
        "node.crt",
        "node.key",
    ]
    node = out / "cockroach"
    assert (node / "node.crt").read_bytes() == (out / "tlscert").read_bytes()
    assert (node / "node.key").read_bytes() == (out / "key").read_bytes()
    _assert_key_matches(node / "node.crt", node / "node.key")
    # The database CA, as tbot's writeCockroachDatabaseFiles writes it (not the host CA).
    assert (node / "ca.crt").read_bytes() == service.cluster.cas.db.cert_pem
    assert (out / "..data" / "cockroach").stat().st_mode & 0o777 == 0o700


def test_database_cockroach_format_in_memory(service: RunningAuthService) -> None:
    destination = MemoryDestination()
    settings = DatabaseOutputSettings(
        name="db", service="pg", database="", username="", format="cockroach", ttl=TTL
    )
    _generate(service, DatabaseService(settings, destination))
    files = destination.read_many(sorted(_COCKROACH | {"key", "tlscert"}))
    assert files["cockroach/node.key"] == files["key"] is not None
    assert files["cockroach/node.crt"] == files["tlscert"] is not None
    assert files["cockroach/ca.crt"] == service.cluster.cas.db.cert_pem


def test_database_without_user_or_name_carries_only_the_service(
    service: RunningAuthService,
) -> None:
    destination = MemoryDestination()
    settings = DatabaseOutputSettings(
        name="db", service="pg", database="", username="", format="", ttl=TTL
    )
    _generate(service, DatabaseService(settings, destination))
    cert_pem = destination.read("tlscert")
    assert cert_pem is not None
    identity = TLSIdentity.from_subject(x509.load_pem_x509_certificate(cert_pem).subject)
    assert (identity.db_service, identity.db_user, identity.db_name) == ("pg", "", "")
    assert identity.route_to_app == ""
    assert identity.impersonator == identity.username


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"route_to_app": "grafana", "route_to_db_service": "pg"}, "not both"),
        ({"route_to_db_user": "alice"}, "need route_to_db_service"),
        ({"route_to_app": "a" * 254}, "longer than 253"),
    ],
)
def test_the_auth_service_refuses_a_bad_route(
    service: RunningAuthService, route: dict[str, str], message: str
) -> None:
    async def ask(bot: BotContext) -> wire.Certs:
        key = keys.generate_private_key()
        return await bot.client.issue_impersonated(
            wire.ImpersonateRequest(keys=fresh_public_keys(key), **route)
        )

    with pytest.raises(Error, match=message):
        _with_bot(service, ask)


def test_routes_round_trip_through_the_wire_and_the_subject() -> None:
    key = keys.generate_private_key()
    req = wire.ImpersonateRequest(
        keys=fresh_public_keys(key),
        route_to_db_service="pg",
        route_to_db_user="alice",
        route_to_db_name="orders",
    )
    again = wire.ImpersonateRequest.from_json(req.to_json())
    assert again == req
    plain = wire.ImpersonateRequest(keys=fresh_public_keys(key))
    assert "route_to_app" not in plain.to_json()
    identity = TLSIdentity(username="bot-x", route_to_app="grafana")
    assert TLSIdentity.from_subject(identity.to_subject()) == identity
    with pytest.raises(wire.WireError, match="route_to_app must be a string"):
        wire.ImpersonateRequest.from_json({**plain.to_json(), "route_to_app": 3})
