"""The ``application`` output service: a TLS client certificate routed to one app.

Per cycle (tbot.md §2.3, §4): issue an impersonated TLS certificate whose subject
carries Teleport's RouteToApp (the app name, OID 1.3.9999.1.10) for a fresh key,
and write ``tlscert``, ``key`` and the cluster's TLS CA files; with
``specific_tls_extensions`` also ``tls.crt``, ``tls.key`` and ``tls.cas``.

Also the shared part of the ``database`` output: :func:`issue_routed`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509

from tbot_py.bot.identity import fresh_public_keys
from tbot_py.client import wire
from tbot_py.errors import IdentityError
from tbot_py.identity import artifacts, keys
from tbot_py.identity.artifacts import DATABASE_CA_FILE, HOST_CA_FILE, USER_CA_FILE
from tbot_py.identity.model import ARTIFACT_KEY, ARTIFACT_TLS_CERT
from tbot_py.identity.tlsid import TLSIdentity
from tbot_py.services.base import (
    BotContext,
    CertValidity,
    DestinationOutput,
    GenerateResult,
    write_output,
)

log = logging.getLogger("tbot_py.services.application")

#: tbot's names for the "tls" identity-file format (tbot.md §2.3).
ARTIFACT_TLS_CRT = "tls.crt"
ARTIFACT_TLS_KEY = "tls.key"
ARTIFACT_TLS_CAS = "tls.cas"


@dataclass(frozen=True)
class ApplicationOutputSettings:
    """The parts of an ``application`` service's config this service acts on."""

    name: str
    app_name: str
    specific_tls_extensions: bool
    ttl: timedelta


@dataclass(frozen=True)
class RoutedCert:
    """A routed TLS certificate, its fresh key, and what its subject says."""

    key_pem: bytes
    cert_pem: bytes
    identity: TLSIdentity
    validity: CertValidity


def ca_pems(bot: BotContext, ca_type: str) -> bytes:
    """The PEM TLS certificates of every CA of ``ca_type``, concatenated (tbot.md §4.2)."""
    pems = artifacts.ca_pems(bot.cert_authorities, ca_type)
    if not pems:
        raise IdentityError(f"the cluster sent no {ca_type} CA certificate")
    return pems


async def issue_routed(
    bot: BotContext,
    ttl: timedelta,
    *,
    app: str = "",
    db_service: str = "",
    db_user: str = "",
    db_name: str = "",
) -> RoutedCert:
    """Issue a certificate for a fresh key routed to ``app`` or ``db_service``; check it.

    The certificate must be for the fresh key and carry the route that was asked for.
    """
    key = keys.generate_private_key()
    req = wire.ImpersonateRequest(
        keys=fresh_public_keys(key),
        expires=bot.clock() + ttl,
        route_to_app=app,
        route_to_db_service=db_service,
        route_to_db_user=db_user,
        route_to_db_name=db_name,
    )
    certs = await bot.client.issue_impersonated(req)
    try:
        cert = x509.load_pem_x509_certificate(certs.tls)
    except ValueError:
        raise IdentityError("the TLS certificate from the server does not parse") from None
    if not keys.same_public_key(cert.public_key(), key.public_key()):  # type: ignore[arg-type]
        raise IdentityError("the TLS certificate from the server is for another key")
    identity = TLSIdentity.from_subject(cert.subject)
    route = (identity.route_to_app, identity.db_service, identity.db_user, identity.db_name)
    wanted = (req.route_to_app, req.route_to_db_service, req.route_to_db_user, req.route_to_db_name)
    if route != wanted:
        raise IdentityError("the TLS certificate from the server has another route")
    return RoutedCert(
        key_pem=keys.private_key_pem(key),
        cert_pem=certs.tls,
        identity=identity,
        validity=CertValidity(
            not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc
        ),
    )


class ApplicationService(DestinationOutput[ApplicationOutputSettings]):
    """Writes tbot's ``application`` artifacts to one destination."""

    async def generate(self, bot: BotContext) -> GenerateResult:
        """Issue a certificate routed to the app and write the artifacts."""
        routed = await issue_routed(bot, self.settings.ttl, app=self.settings.app_name)
        files = {
            ARTIFACT_TLS_CERT: routed.cert_pem,
            ARTIFACT_KEY: routed.key_pem,
            HOST_CA_FILE: ca_pems(bot, "host"),
            USER_CA_FILE: ca_pems(bot, "user"),
            DATABASE_CA_FILE: ca_pems(bot, "db"),
        }
        if self.settings.specific_tls_extensions:
            files[ARTIFACT_TLS_CRT] = routed.cert_pem
            files[ARTIFACT_TLS_KEY] = routed.key_pem
            files[ARTIFACT_TLS_CAS] = ca_pems(bot, "host")
        return await write_output(
            self.name,
            self.destination,
            files,
            routed.validity,
            what=f"{routed.identity.username}, app {self.settings.app_name}",
            log=log,
        )
