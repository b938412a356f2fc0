"""The ``identity`` output service: a short-lived, impersonated identity for ssh, tsh and curl.

Per cycle (tbot.md §2.2): issue an impersonated identity with a fresh key,
render tbot's artifacts with the CAs fetched once by the bot, and hand them to
the destination, which replaces each file atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from tbot_py.bot.identity import fresh_public_keys
from tbot_py.client import wire
from tbot_py.destinations import Destination, DirectoryDestination
from tbot_py.identity import keys
from tbot_py.identity.artifacts import SSHConfigTarget, identity_output_files
from tbot_py.identity.model import Identity
from tbot_py.services.base import BotContext, DestinationOutput, GenerateResult, write_output

log = logging.getLogger("tbot_py.services.identity")

DEFAULT_PROXY_PORT = 443
# Certificates shorter than asked by more than this get a warning: a role or the bot's
# own remaining validity capped them, which an operator should know about.
_SHORTENED_SLACK = timedelta(minutes=1)


@dataclass(frozen=True)
class IdentityOutputSettings:
    """The parts of an ``identity`` service's config this service acts on."""

    name: str
    roles: tuple[str, ...]
    allow_reissue: bool
    ssh_config: bool
    ttl: timedelta


def split_host_port(addr: str, default_port: int = DEFAULT_PROXY_PORT) -> tuple[str, int]:
    """``("host", port)`` from ``host:port`` or ``[v6]:port``."""
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, sep, port = addr.rpartition(":")
        if not sep:
            host, port = addr, ""
    return host, int(port) if port.isdigit() else default_port


class IdentityService(DestinationOutput[IdentityOutputSettings]):
    """Writes tbot's ``identity`` artifacts to one destination."""

    def __init__(
        self, settings: IdentityOutputSettings, destination: Destination, proxy_addr: str
    ) -> None:
        super().__init__(settings, destination)
        self.proxy_addr = proxy_addr

    def _known_hosts_target(self, bot: BotContext) -> SSHConfigTarget | None:
        if not self.settings.ssh_config:
            return None
        # The proxy address ssh should use: what the server advertises, else what we dialled.
        host, port = split_host_port(bot.ping.proxy_public_addr or self.proxy_addr)
        return SSHConfigTarget(
            proxy_host=host,
            proxy_port=port,
            executable=bot.executable,
            tls_routing=bot.ping.tls_routing_enabled,
        )

    async def generate(self, bot: BotContext) -> GenerateResult:
        """Issue a fresh impersonated identity and write every artifact."""
        key = keys.generate_private_key()
        expires = bot.clock() + self.settings.ttl
        certs = await bot.client.issue_impersonated(
            wire.ImpersonateRequest(
                keys=fresh_public_keys(key),
                expires=expires,
                role_requests=self.settings.roles,
                reissuable=self.settings.allow_reissue,
            )
        )
        identity = Identity.from_certs(key, certs)
        if identity.not_after < expires - _SHORTENED_SLACK:
            log.warning(
                "%s: the server issued a credential valid until %s, shorter than the %s asked "
                "for (capped by the bot's own validity or a role)",
                self.name,
                identity.not_after,
                self.settings.ttl,
            )
        directory = (
            str(self.destination.path)
            if isinstance(self.destination, DirectoryDestination)
            else None
        )
        files = identity_output_files(
            identity,
            bot.cert_authorities,
            known_hosts=self._known_hosts_target(bot),
            ssh_config_dir=directory,
        )
        roles = ",".join(identity.roles) or "-"
        principals = ",".join(identity.principals) or "-"
        return await write_output(
            self.name,
            self.destination,
            files,
            identity,
            what=f"{identity.username}, roles {roles}, principals {principals}",
            log=log,
        )
