"""The mTLS caller checks: a bot's own certificate, a bot's identity output, or an admin's.

The bot endpoints of :mod:`.app` (renew, certs, cas) call
:func:`check_bot_certificate` on the client certificate TLS has already
verified. The access proxy's endpoints call :func:`check_service_certificate`
on the proxy's certificate and :func:`check_mcp_client_certificate` on the
certificate its MCP client presented. All are pure: the caller passes the CAs
and ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tbot_py.authservice import ca
from tbot_py.authservice.errors import AccessDenied
from tbot_py.identity.tlsid import TLSIdentity


@dataclass(frozen=True)
class BotCaller:
    """A verified mTLS caller: the bot's own identity and when its certificate expires."""

    identity: TLSIdentity
    not_after: datetime


def check_admin_certificate(der: bytes | None, cas: ca.ClusterCAs, now: datetime) -> TLSIdentity:
    """Accept only a current admin certificate of this cluster: group ``tbot-py-admin``, no bot.

    Same chain and validity checks as :func:`check_bot_certificate`. Raises AccessDenied.
    """
    cert = _verified_client_certificate(der, cas, now)
    identity = TLSIdentity.from_subject(cert.subject)
    if identity.bot_name or identity.bot_instance_id or identity.impersonator:
        raise AccessDenied("bot certificates can not call the admin API; use an admin identity")
    if ca.ADMIN_GROUP not in identity.groups or not identity.username:
        raise AccessDenied(f"client certificate is not in the {ca.ADMIN_GROUP} group")
    return identity


def _verified_client_certificate(
    der: bytes | None, cas: ca.ClusterCAs, now: datetime
) -> x509.Certificate:
    """The client certificate, once signed by the user CA and valid at ``now``."""
    if not der:
        raise AccessDenied("client certificate required")
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(cas.user.cert)
    except (ValueError, TypeError, InvalidSignature):
        raise AccessDenied("client certificate was not issued by this cluster") from None
    if now < cert.not_valid_before_utc or now >= cert.not_valid_after_utc:
        raise AccessDenied("client certificate has expired or is not yet valid")
    return cert


def check_bot_certificate(der: bytes | None, cas: ca.ClusterCAs, now: datetime) -> BotCaller:
    """Accept only the bot's own, current certificate from this cluster.

    TLS has already verified the chain against the user CA; this repeats the
    signature and validity checks with ``now`` so the rules do not depend on
    the TLS configuration, then checks the identity. Raises AccessDenied.

    The certificate is renewable for a ``token`` join and not for the delegated
    (OIDC) joins, which join again instead; ``/v1/bot/renew`` checks that itself.
    Impersonated output certificates are never accepted.
    """
    cert = _verified_client_certificate(der, cas, now)
    identity = TLSIdentity.from_subject(cert.subject)
    if identity.impersonator:
        raise AccessDenied(
            "impersonated certificates can not be used here; present the bot's own certificate"
        )
    if (
        not identity.bot_name
        or not identity.bot_instance_id
        or identity.username != ca.bot_username(identity.bot_name)
    ):
        raise AccessDenied("client certificate is not a bot certificate")
    return BotCaller(identity=identity, not_after=cert.not_valid_after_utc)


def check_service_certificate(der: bytes | None, cas: ca.ClusterCAs, now: datetime) -> BotCaller:
    """Accept a current certificate of one of this cluster's bots: its own or an output.

    What a service such as the access proxy presents: the identity output a bot keeps
    fresh for it (impersonated by the bot itself) or the bot's own certificate. A
    certificate routed to an app or a database is for that target only and is refused.
    The roles that count are the certificate's groups the bot still holds; the caller
    checks that against storage. Raises AccessDenied.
    """
    caller = _bot_identity(der, cas, now)
    if caller.identity.route_to_app or caller.identity.db_service:
        raise AccessDenied("a certificate routed to an app or a database can not be used here")
    return caller


def check_mcp_client_certificate(der: bytes | None, cas: ca.ClusterCAs, now: datetime) -> BotCaller:
    """Accept the certificate an MCP client presented to the access proxy.

    As :func:`check_service_certificate`, except that a route to an app is kept for
    the caller to compare with the app asked for; a database route is refused.
    Messages say it is the MCP client's certificate. Raises AccessDenied.
    """
    try:
        caller = _bot_identity(der, cas, now)
    except AccessDenied as exc:
        raise AccessDenied(f"MCP client: {exc.message}") from None
    if caller.identity.db_service:
        raise AccessDenied("MCP client: the certificate is routed to a database")
    return caller


def _bot_identity(der: bytes | None, cas: ca.ClusterCAs, now: datetime) -> BotCaller:
    """A current user-CA certificate naming a bot, its instance and its own user."""
    cert = _verified_client_certificate(der, cas, now)
    identity = TLSIdentity.from_subject(cert.subject)
    username = ca.bot_username(identity.bot_name)
    if (
        not identity.bot_name
        or not identity.bot_instance_id
        or identity.username != username
        or identity.impersonator not in ("", username)
    ):
        raise AccessDenied("client certificate is not a bot identity")
    return BotCaller(identity=identity, not_after=cert.not_valid_after_utc)
