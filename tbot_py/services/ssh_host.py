"""The ``ssh_host`` output service: a host key and certificate for an OpenSSH server.

Per cycle (tbot.md §2.3, §4): generate a fresh host key, have the cluster's host
CA sign a host certificate for the configured principals, and write tbot's three
artifacts. With them ``sshd`` presents a certificate the cluster's users trust
(``HostKey`` + ``HostCertificate``) and trusts the cluster's users in return
(``TrustedUserCAKeys``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_ssh_public_identity, ssh

from tbot_py.client import wire
from tbot_py.errors import IdentityError
from tbot_py.identity import keys
from tbot_py.services.base import (
    BotContext,
    CertValidity,
    DestinationOutput,
    GenerateResult,
    write_output,
)

log = logging.getLogger("tbot_py.services.ssh_host")

#: tbot's artifact names (tbot.md §4): the host key, its certificate, the user CA keys.
ARTIFACT_HOST_KEY = "ssh_host"
ARTIFACT_HOST_CERT = "ssh_host-cert.pub"
ARTIFACT_USER_CA = "ssh_host-user-ca.pub"


@dataclass(frozen=True)
class SSHHostOutputSettings:
    """The parts of an ``ssh_host`` service's config this service acts on."""

    name: str
    principals: tuple[str, ...]
    ttl: timedelta


def user_ca_lines(bot: BotContext) -> bytes:
    """The cluster's user CA keys, one ``<type> <base64> <comment>`` line each.

    The format ``TrustedUserCAKeys`` reads: authorized_keys lines without options.
    """
    lines = []
    for ca in bot.cas_of_type("user"):
        for key in ca.ssh_public_keys:
            fields = key.strip().split()
            if len(fields) < 2:
                continue
            lines.append(
                b"%s %s type=user&clustername=%s\n"
                % (fields[0], fields[1], ca.cluster_name.encode())
            )
    if not lines:
        raise IdentityError("the cluster sent no SSH user CA key")
    return b"".join(lines)


def _check_host_cert(line: bytes, principals: tuple[str, ...]) -> ssh.SSHCertificate:
    """Parse the server's answer; it must be a host certificate for exactly ``principals``."""
    try:
        cert = load_ssh_public_identity(line.strip())
    except ValueError:
        raise IdentityError("the host certificate from the server does not parse") from None
    if not isinstance(cert, ssh.SSHCertificate):
        raise IdentityError("the server sent a public key, not a host certificate")
    if cert.type != ssh.SSHCertificateType.HOST:
        raise IdentityError("the server sent a user certificate, not a host certificate")
    if tuple(p.decode() for p in cert.valid_principals) != principals:
        raise IdentityError("the host certificate from the server has other principals")
    return cert


class SSHHostService(DestinationOutput[SSHHostOutputSettings]):
    """Writes tbot's ``ssh_host`` artifacts to one destination."""

    async def generate(self, bot: BotContext) -> GenerateResult:
        """Sign a host certificate for a fresh key and write the three artifacts."""
        key = keys.generate_private_key()
        public_line = keys.ssh_public_key_line(key.public_key())
        answer = await bot.client.issue_host_cert(
            wire.HostCertRequest(
                public_ssh_key=public_line,
                principals=self.settings.principals,
                expires=bot.clock() + self.settings.ttl,
            )
        )
        cert = _check_host_cert(answer.ssh_cert, self.settings.principals)
        certified = cert.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        if certified != public_line.strip():
            raise IdentityError("the host certificate from the server is for another key")
        validity = CertValidity(
            not_before=datetime.fromtimestamp(cert.valid_after, UTC),
            not_after=datetime.fromtimestamp(cert.valid_before, UTC),
        )
        files = {
            ARTIFACT_HOST_KEY: keys.private_key_pem(key),
            ARTIFACT_HOST_CERT: answer.ssh_cert.strip() + b"\n",
            ARTIFACT_USER_CA: user_ca_lines(bot),
        }
        return await write_output(
            self.name,
            self.destination,
            files,
            validity,
            what="host certificate for " + ",".join(self.settings.principals),
            log=log,
        )
