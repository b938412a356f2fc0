"""The ssh_host output service: one generation against a real auth service over real TLS."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_ssh_public_identity, ssh

from tbot_py.authservice import admin
from tbot_py.authservice.roles import ResourceRule, RoleConditions, new_role
from tbot_py.authservice.server import RunningAuthService
from tbot_py.bot.identity import JoinParams, obtain_bot_identity
from tbot_py.client import tls
from tbot_py.client.http import AuthClient
from tbot_py.destinations import DirectoryDestination, MemoryDestination
from tbot_py.errors import AccessDenied
from tbot_py.services.base import BotContext, GenerateResult
from tbot_py.services.ssh_host import SSHHostOutputSettings, SSHHostService
from tests.unit.conftest import utc_now

SETTINGS = SSHHostOutputSettings(
    name="host", principals=("node1.example.com", "10.0.0.5"), ttl=timedelta(minutes=30)
)
ARTIFACTS = {"ssh_host", "ssh_host-cert.pub", "ssh_host-user-ca.pub"}


def _token(service: RunningAuthService, *, allowed: bool) -> str:
    rule = ResourceRule(resources=("host_cert",), verbs=("create",))
    role = new_role("hosts", allow=RoleConditions(rules=(rule,) if allowed else ()))
    admin.create_role(service.cluster, role)
    return admin.add_bot(service.cluster, "sshd", roles=("hosts",)).token.token


def _generate(
    service: RunningAuthService, token: str, destination: DirectoryDestination | MemoryDestination
) -> GenerateResult:
    async def main() -> GenerateResult:
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
            output = SSHHostService(SETTINGS, destination)
            output.init()
            return await output.generate(bot)

    return asyncio.run(main())


def test_generate_writes_the_three_artifacts_ssh_keygen_reads(
    service: RunningAuthService, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = _generate(service, _token(service, allowed=True), DirectoryDestination(out))
    assert set(result.files) == ARTIFACTS
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} >= ARTIFACTS
    listing = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(out / "ssh_host-cert.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "host certificate" in listing
    assert listing.split("Principals:")[1].split("Critical Options:")[0].split() == [
        "node1.example.com",
        "10.0.0.5",
    ]
    # The certificate is for the written key.
    public = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(out / "ssh_host")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    cert = load_ssh_public_identity((out / "ssh_host-cert.pub").read_bytes())
    assert isinstance(cert, ssh.SSHCertificate)
    assert cert.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).split() == [p.encode() for p in public[:2]]
    # The validity the daemon schedules from is the certificate's.
    assert int(result.identity.not_after.timestamp()) == cert.valid_before
    assert result.identity.not_after - result.identity.not_before <= timedelta(minutes=31)


def test_the_user_ca_file_holds_the_clusters_user_ca_key(
    service: RunningAuthService,
) -> None:
    destination = MemoryDestination()
    _generate(service, _token(service, allowed=True), destination)
    text = destination.read("ssh_host-user-ca.pub")
    assert text is not None
    lines = text.splitlines()
    user_ca = service.cluster.cas.user.ssh_public_key_line.split()[:2]
    assert [line.split()[:2] for line in lines] == [user_ca]
    assert lines[0].endswith(f"type=user&clustername={service.cluster.name}".encode())
    host_ca = service.cluster.cas.host.ssh_public_key_line.split()[:2]
    assert host_ca not in [line.split()[:2] for line in lines]


def test_a_bot_without_the_rule_writes_nothing(service: RunningAuthService) -> None:
    destination = MemoryDestination()
    with pytest.raises(AccessDenied, match="may not create host certificates"):
        _generate(service, _token(service, allowed=False), destination)
    assert all(destination.read(name) is None for name in ARTIFACTS)
