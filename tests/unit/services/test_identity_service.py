"""The identity output service: address splitting, and one generation against a real server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import pytest

from tbot_py.authservice import admin
from tbot_py.authservice.roles import new_role
from tbot_py.authservice.server import RunningAuthService
from tbot_py.bot.identity import JoinParams, obtain_bot_identity
from tbot_py.client import tls
from tbot_py.client.http import AuthClient
from tbot_py.destinations import Destination, DirectoryDestination, MemoryDestination
from tbot_py.errors import AccessDenied
from tbot_py.services.base import BotContext, GenerateResult
from tbot_py.services.identity import IdentityOutputSettings, IdentityService, split_host_port
from tests.expected import IDENTITY_FILES, artifact_names
from tests.unit.conftest import BOT, utc_now

SETTINGS = IdentityOutputSettings(
    name="out", roles=("dev",), allow_reissue=False, ssh_config=True, ttl=timedelta(minutes=30)
)


# -- split_host_port --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("proxy.example.com:443", ("proxy.example.com", 443)),
        ("proxy.example.com:3080", ("proxy.example.com", 3080)),
        ("127.0.0.1:3025", ("127.0.0.1", 3025)),
        ("[::1]:3025", ("::1", 3025)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("[::1]", ("::1", 443)),
        ("proxy.example.com", ("proxy.example.com", 443)),
        ("proxy.example.com:", ("proxy.example.com", 443)),
        ("proxy.example.com:https", ("proxy.example.com", 443)),
    ],
)
def test_split_host_port(addr: str, expected: tuple[str, int]) -> None:
    assert split_host_port(addr) == expected


def test_split_host_port_uses_the_given_default_port() -> None:
    assert split_host_port("proxy.example.com", default_port=3080) == ("proxy.example.com", 3080)
    assert split_host_port("proxy.example.com:22", default_port=3080) == ("proxy.example.com", 22)


# -- generate ---------------------------------------------------------------------------


def _generate(
    service: RunningAuthService,
    token: str,
    settings: IdentityOutputSettings,
    destination: Destination,
    *,
    proxy_public_addr: str | None = None,
) -> GenerateResult:
    """Join as the bot, then run one generation of an IdentityService into ``destination``."""

    async def main() -> GenerateResult:
        params = JoinParams(addr=service.addr, token=token, ca_pins=(service.ca_pin,))
        bot_identity = await obtain_bot_identity(
            params, MemoryDestination(), timedelta(hours=1), utc_now
        )
        ctx = tls.mtls_context(
            bot_identity.tls_cert_pem, bot_identity.private_key_pem, bot_identity.tls_ca_pems
        )
        async with AuthClient(service.addr, ctx, timeout=5.0) as client:
            ping = await client.ping()
            if proxy_public_addr is not None:
                ping = dataclasses.replace(ping, proxy_public_addr=proxy_public_addr)
            bot = BotContext(
                client=client,
                bot_identity=bot_identity,
                ping=ping,
                cert_authorities=tuple(await client.cert_authorities()),
                clock=utc_now,
                executable="/usr/local/bin/tbot-py",
            )
            output = IdentityService(settings, destination, service.addr)
            output.init()
            return await output.generate(bot)

    return asyncio.run(main())


def _written(destination: MemoryDestination, names: set[str]) -> set[str]:
    return {name for name in names if destination.read(name) is not None}


def test_generate_writes_an_impersonated_identity_with_the_requested_roles(
    service: RunningAuthService, token: str
) -> None:
    destination = MemoryDestination()
    result = _generate(service, token, SETTINGS, destination)
    identity = result.identity
    assert identity.roles == ("dev",)
    assert identity.tls_identity.impersonator == f"bot-{BOT}"
    assert not identity.tls_identity.renewable
    assert identity.tls_identity.disallow_reissue
    assert destination.read("tlscert") == identity.tls_cert_pem
    assert destination.read("key") == identity.private_key_pem
    assert result.service == "out"
    assert result.destination == "memory"


def test_allow_reissue_makes_the_identity_reissuable(
    service: RunningAuthService, token: str
) -> None:
    settings = dataclasses.replace(SETTINGS, allow_reissue=True)
    result = _generate(service, token, settings, MemoryDestination())
    assert not result.identity.tls_identity.disallow_reissue


def test_memory_destination_gets_known_hosts_but_no_ssh_config(
    service: RunningAuthService, token: str
) -> None:
    destination = MemoryDestination()
    result = _generate(service, token, SETTINGS, destination)
    assert set(result.files) == IDENTITY_FILES | {"known_hosts"}
    assert destination.read("ssh_config") is None


def test_ssh_config_off_writes_no_ssh_files(service: RunningAuthService, token: str) -> None:
    settings = dataclasses.replace(SETTINGS, ssh_config=False)
    destination = MemoryDestination()
    result = _generate(service, token, settings, destination)
    assert set(result.files) == IDENTITY_FILES
    assert destination.read("known_hosts") is None


def test_directory_destination_gets_ssh_config_pointing_at_itself(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = _generate(service, token, SETTINGS, DirectoryDestination(out))
    cluster = service.cluster_name
    expected = IDENTITY_FILES | {
        "known_hosts",
        "ssh_config",
        f"{cluster}.ssh_config",
        f"{cluster}.known_hosts",
    }
    assert set(result.files) == expected
    assert artifact_names(out) == expected
    assert f'IdentityFile "{out}/key"' in (out / "ssh_config").read_text()


def test_known_hosts_names_the_advertised_proxy_address(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    _generate(
        service,
        token,
        SETTINGS,
        DirectoryDestination(out),
        proxy_public_addr="proxy.example.com:3080",
    )
    known_hosts = (out / "known_hosts").read_text()
    assert known_hosts.startswith(f"@cert-authority proxy.example.com,{service.cluster_name},")
    assert "--proxy-server=proxy.example.com:3080" in (out / "ssh_config").read_text()


def test_known_hosts_falls_back_to_the_dialled_address(
    service: RunningAuthService, token: str
) -> None:
    destination = MemoryDestination()
    _generate(service, token, SETTINGS, destination, proxy_public_addr="")
    known_hosts = destination.read("known_hosts")
    assert known_hosts is not None
    host, _ = split_host_port(service.addr)
    assert known_hosts.startswith(f"@cert-authority {host},".encode())


def test_credential_shorter_than_asked_is_logged_as_a_warning(
    service: RunningAuthService, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The bot identity lives one hour, and an output never outlives it.
    settings = dataclasses.replace(SETTINGS, ttl=timedelta(hours=4))
    with caplog.at_level(logging.WARNING, logger="tbot_py.services.identity"):
        result = _generate(service, token, settings, MemoryDestination())
    assert result.identity.not_after < utc_now() + timedelta(hours=2)
    [warning] = [r for r in caplog.records if r.name == "tbot_py.services.identity"]
    assert "shorter than" in warning.getMessage()
    assert warning.getMessage().startswith("out: ")


def test_role_max_session_ttl_shortens_the_credential_and_the_client_warns(
    service: RunningAuthService, caplog: pytest.LogCaptureFixture
) -> None:
    short = new_role("ten-minutes", max_session_ttl=timedelta(minutes=10))
    admin.create_role(service.cluster, short)
    token = admin.add_bot(service.cluster, "short", roles=("ten-minutes",)).token.token
    settings = dataclasses.replace(SETTINGS, roles=("ten-minutes",))
    with caplog.at_level(logging.WARNING, logger="tbot_py.services.identity"):
        result = _generate(service, token, settings, MemoryDestination())
    assert result.identity.not_after <= utc_now() + timedelta(minutes=10)
    assert result.identity.not_after > utc_now() + timedelta(minutes=9)
    [warning] = [r for r in caplog.records if r.name == "tbot_py.services.identity"]
    assert "shorter than" in warning.getMessage()


def test_credential_as_long_as_asked_logs_no_warning(
    service: RunningAuthService, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tbot_py.services.identity"):
        _generate(service, token, SETTINGS, MemoryDestination())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_role_the_bot_lacks_is_refused_and_nothing_is_written(
    service: RunningAuthService, token: str
) -> None:
    settings = dataclasses.replace(SETTINGS, roles=("admin",))
    destination = MemoryDestination()
    with pytest.raises(AccessDenied, match='role "admin" is not allowed'):
        _generate(service, token, settings, destination)
    assert _written(destination, IDENTITY_FILES | {"known_hosts"}) == set()


def test_empty_roles_ask_for_every_role_the_bot_holds(
    service: RunningAuthService, token: str
) -> None:
    settings = dataclasses.replace(SETTINGS, roles=())
    result = _generate(service, token, settings, MemoryDestination())
    assert result.identity.roles == ("access", "dev")


class _ThreadRecordingDestination(MemoryDestination):
    """A memory destination that records which thread wrote to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writer_threads: set[int] = set()

    def write_many(self, files: Mapping[str, bytes]) -> None:
        self.writer_threads.add(threading.get_ident())
        super().write_many(files)


def test_files_are_written_off_the_event_loop_thread(
    service: RunningAuthService, token: str
) -> None:
    """A directory write fsyncs each file; on the loop it would stall every other output."""
    destination = _ThreadRecordingDestination()
    _generate(service, token, SETTINGS, destination)
    assert destination.writer_threads
    assert threading.get_ident() not in destination.writer_threads
