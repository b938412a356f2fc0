"""What the MCP access proxy asks the auth service: which app, may this client use it, a JWT.

Pure decisions over values :mod:`.app` reads from storage; the handlers stay thin.
The proxy (a service with its own bot identity) passes on the certificate its MCP
client presented. That client is one of the cluster's bots too, and only the roles
in its certificate that its bot still holds count (:func:`counted_roles`).

An MCP app is an ``app`` resource (:mod:`.apps`) whose URI is ``mcp+stdio://``,
``mcp+http://`` or ``mcp+https://``, or an app in the proxy's own config, which the
proxy sends along and which hides a resource of the same name.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tbot_py.authservice import rbac
from tbot_py.authservice.apps import App, app_not_found
from tbot_py.authservice.bots_store import BotRecord
from tbot_py.authservice.errors import AccessDenied, BadParameter, NotFound
from tbot_py.authservice.mtls import BotCaller
from tbot_py.authservice.roles import Role
from tbot_py.client import wire

MCP_SCHEMES = ("mcp+stdio", "mcp+http", "mcp+https")
#: The rule a proxy's roles need to ask about sessions and apps: ``app_session``/``create``.
SESSION_RULE_RESOURCE = "app_session"
#: The longest a session JWT lives; never past the client's certificate either.
JWT_TTL = timedelta(hours=1)
#: How far ``nbf`` goes back, so an upstream whose clock is a little behind accepts it.
JWT_CLOCK_SKEW = timedelta(minutes=1)


def is_mcp_uri(uri: str) -> bool:
    """Whether ``uri`` names an MCP server (``mcp+stdio://``, ``mcp+http(s)://``)."""
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme.lower() in MCP_SCHEMES


def mcp_app_of(app: App) -> wire.MCPApp:
    """The stored app resource ``app`` as the proxy needs it."""
    spec = app.spec
    return wire.MCPApp(
        name=app.name,
        uri=spec.uri,
        labels=dict(app.labels),
        description=app.metadata.description,
        headers=spec.rewrite.headers if spec.rewrite else (),
        command=spec.mcp.command if spec.mcp else "",
        args=spec.mcp.args if spec.mcp else (),
        source="resource",
    )


def config_app(app: wire.MCPApp) -> wire.MCPApp:
    """An app from the proxy's config, marked so; BadParameter unless it is an MCP app."""
    if not is_mcp_uri(app.uri):
        raise BadParameter(
            f'config app "{app.name[:64]}" is not an MCP app: its uri must start with '
            + ", ".join(f"{s}://" for s in MCP_SCHEMES)
        )
    return dataclasses.replace(app, source="config")


def resolve_app(name: str, from_config: wire.MCPApp | None, stored: App | None) -> wire.MCPApp:
    """The app a session is for: the proxy's config app if it sent one, else the resource.

    NotFound without either; BadParameter when it is not an MCP app or the config
    app has another name.
    """
    if from_config is not None:
        if from_config.name != name:
            raise BadParameter(
                f'config_app is "{from_config.name[:64]}" but the session is for "{name[:64]}"'
            )
        return config_app(from_config)
    if stored is None:
        raise NotFound(app_not_found(name))
    if not is_mcp_uri(stored.spec.uri):
        raise BadParameter(
            f'app "{name}" is not an MCP app: its uri does not start with '
            + ", ".join(f"{s}://" for s in MCP_SCHEMES)
        )
    return mcp_app_of(stored)


def counted_roles(groups: Iterable[str], bot: BotRecord, stored: Mapping[str, Role]) -> list[Role]:
    """The roles a certificate's ``groups`` grant: those the bot still holds and that exist.

    A role taken from the bot since the certificate was issued grants nothing.
    """
    return [stored[name] for name in dict.fromkeys(groups) if name in bot.roles and name in stored]


def check_session(client: BotCaller, roles: Sequence[Role], app: wire.MCPApp) -> None:
    """AccessDenied unless the client's ``roles`` allow ``app`` and its route (if any) is it."""
    identity = client.identity
    if identity.route_to_app and identity.route_to_app != app.name:
        raise AccessDenied(
            f'MCP client: the certificate is routed to app "{identity.route_to_app}", '
            f'not "{app.name}"'
        )
    decision = rbac.check_app_access(roles, app.name, app.labels)
    if not decision.allowed:
        raise AccessDenied(
            f'bot "{identity.bot_name}" may not access app "{app.name}": {decision.reason}'
        )


def allowed_apps(
    client: BotCaller,
    roles: Sequence[Role],
    stored: Iterable[App],
    from_config: Iterable[wire.MCPApp],
) -> tuple[wire.MCPApp, ...]:
    """The MCP apps the client may reach, sorted by name; a config app hides a resource.

    A client certificate routed to an app sees that app only. BadParameter when a
    config app is not an MCP app.
    """
    apps = {app.name: mcp_app_of(app) for app in stored if is_mcp_uri(app.spec.uri)}
    apps.update({app.name: config_app(app) for app in from_config})
    route = client.identity.route_to_app
    return tuple(
        app
        for name, app in sorted(apps.items())
        if (not route or name == route)
        and rbac.check_app_access(roles, app.name, app.labels).allowed
    )


def session_jwt_claims(
    *,
    issuer: str,
    client: BotCaller,
    roles: Sequence[Role],
    app: wire.MCPApp,
    now: datetime,
) -> dict[str, Any]:
    """The claims of the JWT a session's upstream receives: who, which roles, for which app.

    ``aud`` is the app's URI as configured; ``exp`` is at most :data:`JWT_TTL` away
    and never past the client's certificate.
    """
    identity = client.identity
    issued_at = int(now.timestamp())
    return {
        "iss": issuer,
        "sub": identity.username,
        "aud": app.uri,
        "username": identity.username,
        "bot": identity.bot_name,
        "roles": [role.name for role in roles],
        "iat": issued_at,
        "nbf": int((now - JWT_CLOCK_SKEW).timestamp()),
        "exp": int(min(client.not_after, now + JWT_TTL).timestamp()),
        "jti": uuid.uuid4().hex,
    }


def client_certificate_der(pem: bytes) -> bytes:
    """The DER of the PEM certificate the proxy passed on; BadParameter when it is not one."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise BadParameter("client_cert is not a PEM certificate") from None
    return cert.public_bytes(serialization.Encoding.DER)
