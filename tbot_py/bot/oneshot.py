"""One-shot mode: join or renew, write every output once, exit.

Order matters for safety:

1. Every destination is prepared and proven writable before any network call,
   so a bad output path never burns a single-use join token.
2. The storage lock is taken, so two bots never renew from the same identity.
3. The bot identity is obtained and saved before any output uses it.
4. Outputs are generated concurrently and independently; each writes its files
   only after every one of them rendered, so a failure leaves it untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tbot_py.bot.identity import Clock, JoinParams, obtain_bot_identity
from tbot_py.bot.idtokens import read_id_token
from tbot_py.client import tls, wire
from tbot_py.client.http import AuthClient
from tbot_py.config.schema import (
    ApplicationServiceConfig,
    BotConfig,
    DatabaseServiceConfig,
    DirectoryDestination,
    IdentityServiceConfig,
    SSHHostServiceConfig,
    WorkloadIdentityJWTServiceConfig,
    WorkloadIdentitySelectorConfig,
    WorkloadIdentityX509ServiceConfig,
)
from tbot_py.destinations import Destination
from tbot_py.destinations import DirectoryDestination as DirectoryStore
from tbot_py.destinations import MemoryDestination as MemoryStore
from tbot_py.errors import ConfigError, Error
from tbot_py.identity.model import Identity
from tbot_py.services.application import ApplicationOutputSettings, ApplicationService
from tbot_py.services.base import BotContext, GenerateResult, OutputService
from tbot_py.services.database import DatabaseOutputSettings, DatabaseService
from tbot_py.services.identity import IdentityOutputSettings, IdentityService
from tbot_py.services.ssh_host import SSHHostOutputSettings, SSHHostService
from tbot_py.services.workload_identity import (
    JWTSVIDOutputSettings,
    WorkloadIdentityJWTService,
    WorkloadIdentityX509Service,
    X509SVIDOutputSettings,
)

if TYPE_CHECKING:
    from tbot_py.destinations.acl import Reader

log = logging.getLogger("tbot_py.bot")


def utc_now() -> datetime:
    return datetime.now(UTC)


class OutputsFailed(Error):
    """One or more outputs could not be generated; the others were written."""

    def __init__(self, failures: Sequence[tuple[str, BaseException]], total: int) -> None:
        self.failures = list(failures)
        details = "; ".join(f"{name}: {exc}" for name, exc in failures)
        if total == 1:
            message = f"output {details}"
        else:
            message = f"{len(failures)} of {total} outputs failed: {details}"
        super().__init__(message)


@dataclass(frozen=True)
class OneshotResult:
    """What a one-shot run produced, for the summary. Holds no secret."""

    bot_identity: Identity
    outputs: tuple[GenerateResult, ...]


def build_destination(config: DirectoryDestination | object) -> Destination:
    """The runtime destination for a destination config."""
    if isinstance(config, DirectoryDestination):
        readers: list[Reader] = []
        if config.readers:
            from tbot_py.destinations.acl import Reader

            readers = [Reader(kind=entry.kind, id=entry.id) for entry in config.readers]
        return DirectoryStore(
            config.absolute_path(), symlinks=config.symlinks, acls=config.acls, readers=readers
        )
    return MemoryStore()


def wire_selector(selector: WorkloadIdentitySelectorConfig) -> wire.WorkloadIdentitySelector:
    """The request's selector; config validation allows exactly one value per label."""
    labels = {key: values[0] for key, values in selector.labels.items()}
    return wire.WorkloadIdentitySelector(name=selector.name, labels=labels)


def _identity(
    svc: IdentityServiceConfig, ttl: timedelta, dest: Destination, addr: str
) -> OutputService:
    settings = IdentityOutputSettings(
        name=svc.name or svc.type,
        roles=tuple(svc.roles),
        allow_reissue=svc.allow_reissue,
        ssh_config=svc.ssh_config == "on",
        ttl=ttl,
    )
    return IdentityService(settings, dest, addr)


def _ssh_host(
    svc: SSHHostServiceConfig, ttl: timedelta, dest: Destination, _addr: str
) -> OutputService:
    settings = SSHHostOutputSettings(
        name=svc.name or svc.type, principals=tuple(svc.principals), ttl=ttl
    )
    return SSHHostService(settings, dest)


def _x509_svid(
    svc: WorkloadIdentityX509ServiceConfig, ttl: timedelta, dest: Destination, _addr: str
) -> OutputService:
    settings = X509SVIDOutputSettings(
        name=svc.name or svc.type, selector=wire_selector(svc.selector), ttl=ttl
    )
    return WorkloadIdentityX509Service(settings, dest)


def _jwt_svid(
    svc: WorkloadIdentityJWTServiceConfig, ttl: timedelta, dest: Destination, _addr: str
) -> OutputService:
    settings = JWTSVIDOutputSettings(
        name=svc.name or svc.type,
        selector=wire_selector(svc.selector),
        audiences=tuple(svc.audiences),
        ttl=ttl,
    )
    return WorkloadIdentityJWTService(settings, dest)


def _application(
    svc: ApplicationServiceConfig, ttl: timedelta, dest: Destination, _addr: str
) -> OutputService:
    settings = ApplicationOutputSettings(
        name=svc.name or svc.type,
        app_name=svc.app_name,
        specific_tls_extensions=svc.specific_tls_extensions,
        ttl=ttl,
    )
    return ApplicationService(settings, dest)


def _database(
    svc: DatabaseServiceConfig, ttl: timedelta, dest: Destination, _addr: str
) -> OutputService:
    settings = DatabaseOutputSettings(
        name=svc.name or svc.type,
        service=svc.service,
        database=svc.database,
        username=svc.username,
        format=svc.format,
        ttl=ttl,
    )
    return DatabaseService(settings, dest)


#: How each output type's config becomes its runtime service: (config, TTL, destination,
#: auth address) -> service. Every config type of ``BotConfig.services`` is listed.
_BUILDERS: dict[type[Any], Callable[[Any, timedelta, Destination, str], OutputService]] = {
    IdentityServiceConfig: _identity,
    SSHHostServiceConfig: _ssh_host,
    WorkloadIdentityX509ServiceConfig: _x509_svid,
    WorkloadIdentityJWTServiceConfig: _jwt_svid,
    ApplicationServiceConfig: _application,
    DatabaseServiceConfig: _database,
}


def build_services(config: BotConfig, addr: str) -> list[OutputService]:
    """One runtime service per configured service, in config order."""
    services: list[OutputService] = []
    for svc in config.services:
        ttl, _ = svc.effective_lifetime(config)
        build = _BUILDERS[type(svc)]
        services.append(build(svc, ttl, build_destination(svc.destination), addr))
    return services


def join_params(config: BotConfig) -> JoinParams:
    """Everything needed to reach the cluster; reads the token (file) now.

    An unreadable token file is not an error yet: a stored identity renews without it.
    """
    onboarding = config.onboarding
    try:
        token, problem = onboarding.read_token(), None
    except ConfigError as exc:
        token, problem = None, exc

    async def fetch_id_token(audience: str) -> str:
        return await read_id_token(onboarding, audience=audience)

    return JoinParams(
        addr=config.require_address(),
        token=token,
        token_problem=problem,
        ca_pins=tuple(onboarding.ca_pins),
        ca_path=onboarding.ca_path,
        insecure=onboarding.insecure,
        join_method=onboarding.join_method,
        id_token=fetch_id_token if onboarding.is_delegated() else None,
    )


async def run_oneshot(
    config: BotConfig,
    *,
    clock: Clock = utc_now,
    executable: str = "tbot-py",
    after_renew_response: Callable[[], None] | None = None,
) -> OneshotResult:
    """Obtain the bot identity, write every output once, and return what was written."""
    addr = config.require_address()
    storage = build_destination(config.storage)
    services = build_services(config, addr)
    storage.init()
    for service in services:
        service.init()
    params = join_params(config)
    if not storage.is_persistent:
        log.warning(
            "storage is in memory: the bot identity is lost on exit, so every run joins again "
            "and needs a fresh join token"
        )
    with storage.lock():
        bot_identity = await obtain_bot_identity(
            params, storage, config.credential_ttl, clock, after_renew_response
        )
        ctx = tls.mtls_context(
            bot_identity.tls_cert_pem, bot_identity.private_key_pem, bot_identity.tls_ca_pems
        )
        async with AuthClient(addr, ctx) as client:
            ping, cas = await asyncio.gather(client.ping(), client.cert_authorities())
            bot = BotContext(
                client=client,
                bot_identity=bot_identity,
                ping=ping,
                cert_authorities=tuple(cas),
                clock=clock,
                executable=executable,
            )
            outcomes = await asyncio.gather(
                *(service.generate(bot) for service in services), return_exceptions=True
            )
    results: list[GenerateResult] = []
    failures: list[tuple[str, BaseException]] = []
    for service, outcome in zip(services, outcomes, strict=True):
        if isinstance(outcome, Error):
            failures.append((service.name, outcome))
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            results.append(outcome)
    if failures:
        raise OutputsFailed(failures, len(services))
    return OneshotResult(bot_identity=bot_identity, outputs=tuple(results))
