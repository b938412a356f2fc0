"""JSON shapes exchanged with the auth service, shared by the client and the server.

Where Teleport has an HTTP endpoint we use its path and shapes exactly
(teleport-protocol.md §1, §2, §8). Renewal, impersonation and CA fetching,
which Teleport does over gRPC, are our own JSON endpoints under ``/v1/bot/``,
authenticated by mTLS with the current bot certificate; they reuse Teleport's
``Certs`` shape so one decoder serves every issuing call.

Encoding rules ("Go JSON"): byte fields are standard base64 with padding,
times are RFC 3339 in UTC. The workload identity and MCP access proxy shapes, which
are our own, carry PEM as plain JSON text instead.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PATH_FIND = "/webapi/find"
PATH_FIND_V1 = "/v1/webapi/find"
PATH_JOIN = "/v1/webapi/host/credentials"
PATH_EXPORT = "/webapi/auth/export"
PATH_RENEW = "/v1/bot/renew"
PATH_CERTS = "/v1/bot/certs"
PATH_CAS = "/v1/bot/cas"
PATH_HOST_CERT = "/v1/bot/hostcert"

ROLE_BOT = "Bot"
SIGNATURE_SUITE = "balanced-v1"

CA_TYPES = ("host", "user", "db")


class WireError(ValueError):
    """A JSON document does not have the expected shape (the caller adds the URL)."""


def b64encode(data: bytes) -> str:
    """Standard base64 with padding, as Go encodes []byte."""
    return base64.b64encode(data).decode("ascii")


def b64decode(value: object, what: str) -> bytes:
    """Decode a Go []byte field; raise WireError naming ``what`` when it is not base64."""
    if not isinstance(value, str):
        raise WireError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{what} is not valid base64") from None


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC with a Z suffix."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: object, what: str) -> datetime:
    """Parse an RFC 3339 time; raise WireError naming ``what`` otherwise."""
    if not isinstance(value, str):
        raise WireError(f"{what} must be an RFC 3339 string")
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise WireError(f"{what} is not an RFC 3339 time") from None
    if t.tzinfo is None:
        raise WireError(f"{what} has no time zone")
    return t.astimezone(UTC)


def _str(obj: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = obj.get(key, None if required else "")
    if not isinstance(value, str):
        raise WireError(f"{key} must be a string")
    return value


def _b64_list(obj: dict[str, Any], key: str) -> tuple[bytes, ...]:
    raw = obj.get(key) or []
    if not isinstance(raw, list):
        raise WireError(f"{key} must be a list")
    return tuple(b64decode(v, f"{key}[{i}]") for i, v in enumerate(raw))


def _object(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise WireError("expected a JSON object")
    return doc


@dataclass(frozen=True)
class Certs:
    """Teleport's ``proto.Certs``: an SSH cert line, a TLS cert PEM and the CAs."""

    ssh: bytes
    tls: bytes
    tls_ca_certs: tuple[bytes, ...] = ()
    ssh_ca_certs: tuple[bytes, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "ssh": b64encode(self.ssh),
            "tls": b64encode(self.tls),
            "tls_ca_certs": [b64encode(c) for c in self.tls_ca_certs],
            "ssh_ca_certs": [b64encode(c) for c in self.ssh_ca_certs],
        }

    @classmethod
    def from_json(cls, doc: object) -> Certs:
        obj = _object(doc)
        certs = cls(
            ssh=b64decode(obj.get("ssh"), "ssh"),
            tls=b64decode(obj.get("tls"), "tls"),
            tls_ca_certs=_b64_list(obj, "tls_ca_certs"),
            ssh_ca_certs=_b64_list(obj, "ssh_ca_certs"),
        )
        if not certs.ssh or not certs.tls:
            raise WireError("response has no ssh or tls certificate")
        return certs


@dataclass(frozen=True)
class PublicKeys:
    """The same key twice: PKIX PEM for TLS and an authorized_keys line for SSH."""

    tls: bytes
    ssh: bytes

    def to_json(self) -> dict[str, Any]:
        return {"public_tls_key": b64encode(self.tls), "public_ssh_key": b64encode(self.ssh)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PublicKeys:
        return cls(
            tls=b64decode(obj.get("public_tls_key"), "public_tls_key"),
            ssh=b64decode(obj.get("public_ssh_key"), "public_ssh_key"),
        )


def _optional_expires(obj: dict[str, Any]) -> datetime | None:
    raw = obj.get("expires")
    return None if raw in (None, "") else parse_time(raw, "expires")


@dataclass(frozen=True)
class RegisterUsingTokenRequest:
    """``POST /v1/webapi/host/credentials`` (Teleport's ``types.RegisterUsingTokenRequest``)."""

    token: str
    keys: PublicKeys
    role: str = ROLE_BOT
    expires: datetime | None = None
    #: The OIDC ID token (JWT) for the github, gitlab, kubernetes and generic_oidc methods.
    id_token: str = field(default="", repr=False)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "hostID": "",
            "node_name": "",
            "role": self.role,
            "token": self.token,
        }
        doc.update(self.keys.to_json())
        if self.id_token:
            doc["id_token"] = self.id_token
        if self.expires is not None:
            doc["expires"] = format_time(self.expires)
        return doc

    @classmethod
    def from_json(cls, doc: object) -> RegisterUsingTokenRequest:
        obj = _object(doc)
        return cls(
            token=_str(obj, "token"),
            role=_str(obj, "role"),
            keys=PublicKeys.from_json(obj),
            expires=_optional_expires(obj),
            id_token=_str(obj, "id_token", required=False),
        )


@dataclass(frozen=True)
class RenewRequest:
    """``POST /v1/bot/renew``: a fresh key for the bot's own renewable identity."""

    keys: PublicKeys
    expires: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.keys.to_json()
        if self.expires is not None:
            doc["expires"] = format_time(self.expires)
        return doc

    @classmethod
    def from_json(cls, doc: object) -> RenewRequest:
        obj = _object(doc)
        return cls(keys=PublicKeys.from_json(obj), expires=_optional_expires(obj))


@dataclass(frozen=True)
class ImpersonateRequest:
    """``POST /v1/bot/certs``: an impersonated, non-renewable identity for an output.

    An empty ``role_requests`` means every role the bot holds.
    """

    keys: PublicKeys
    expires: datetime | None = None
    role_requests: tuple[str, ...] = ()
    reissuable: bool = False
    route_to_cluster: str = ""
    #: Route the certificate to one app (``application`` output) or database service
    #: (``database`` output), as Teleport's RouteToApp / RouteToDatabase.
    route_to_app: str = ""
    route_to_db_service: str = ""
    route_to_db_user: str = ""
    route_to_db_name: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.keys.to_json()
        if self.expires is not None:
            doc["expires"] = format_time(self.expires)
        doc["role_requests"] = list(self.role_requests)
        doc["reissuable"] = self.reissuable
        doc["route_to_cluster"] = self.route_to_cluster
        for field_name in _ROUTE_FIELDS:
            value = getattr(self, field_name)
            if value:
                doc[field_name] = value
        return doc

    @classmethod
    def from_json(cls, doc: object) -> ImpersonateRequest:
        obj = _object(doc)
        roles = obj.get("role_requests") or []
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise WireError("role_requests must be a list of strings")
        reissuable = obj.get("reissuable", False)
        if not isinstance(reissuable, bool):
            raise WireError("reissuable must be a boolean")
        return cls(
            keys=PublicKeys.from_json(obj),
            expires=_optional_expires(obj),
            role_requests=tuple(roles),
            reissuable=reissuable,
            route_to_cluster=_str(obj, "route_to_cluster", required=False),
            route_to_app=_str(obj, "route_to_app", required=False),
            route_to_db_service=_str(obj, "route_to_db_service", required=False),
            route_to_db_user=_str(obj, "route_to_db_user", required=False),
            route_to_db_name=_str(obj, "route_to_db_name", required=False),
        )


_ROUTE_FIELDS = ("route_to_app", "route_to_db_service", "route_to_db_user", "route_to_db_name")


@dataclass(frozen=True)
class HostCertRequest:
    """``POST /v1/bot/hostcert``: an SSH host certificate for ``public_ssh_key`` (``ssh_host``)."""

    public_ssh_key: bytes
    principals: tuple[str, ...]
    expires: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "public_ssh_key": b64encode(self.public_ssh_key),
            "principals": list(self.principals),
        }
        if self.expires is not None:
            doc["expires"] = format_time(self.expires)
        return doc

    @classmethod
    def from_json(cls, doc: object) -> HostCertRequest:
        obj = _object(doc)
        principals = obj.get("principals")
        if (
            not isinstance(principals, list)
            or not principals
            or not all(isinstance(p, str) and p for p in principals)
        ):
            raise WireError("principals must be a non-empty list of non-empty strings")
        return cls(
            public_ssh_key=b64decode(obj.get("public_ssh_key"), "public_ssh_key"),
            principals=tuple(principals),
            expires=_optional_expires(obj),
        )


@dataclass(frozen=True)
class HostCertResponse:
    """The answer to :class:`HostCertRequest`: one ``<type>-cert-v01@openssh.com`` line."""

    ssh_cert: bytes

    def to_json(self) -> dict[str, Any]:
        return {"ssh_cert": b64encode(self.ssh_cert)}

    @classmethod
    def from_json(cls, doc: object) -> HostCertResponse:
        return cls(ssh_cert=b64decode(_object(doc).get("ssh_cert"), "ssh_cert"))


@dataclass(frozen=True)
class CertAuthority:
    """One CA as returned by ``GET /v1/bot/cas``: PEM certs and SSH public key lines."""

    type: str
    cluster_name: str
    tls_certs: tuple[bytes, ...] = ()
    ssh_public_keys: tuple[bytes, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "cluster_name": self.cluster_name,
            "tls_certs": [c.decode() for c in self.tls_certs],
            "ssh_public_keys": [k.decode() for k in self.ssh_public_keys],
        }

    @classmethod
    def from_json(cls, doc: object) -> CertAuthority:
        obj = _object(doc)

        def texts(key: str) -> tuple[bytes, ...]:
            raw = obj.get(key) or []
            if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
                raise WireError(f"{key} must be a list of strings")
            return tuple(v.encode() for v in raw)

        return cls(
            type=_str(obj, "type"),
            cluster_name=_str(obj, "cluster_name"),
            tls_certs=texts("tls_certs"),
            ssh_public_keys=texts("ssh_public_keys"),
        )


def cert_authorities_to_json(cas: list[CertAuthority]) -> dict[str, Any]:
    return {"cert_authorities": [ca.to_json() for ca in cas]}


def cert_authorities_from_json(doc: object) -> list[CertAuthority]:
    raw = _object(doc).get("cert_authorities")
    if not isinstance(raw, list):
        raise WireError("cert_authorities must be a list")
    return [CertAuthority.from_json(item) for item in raw]


@dataclass(frozen=True)
class PingResponse:
    """The parts of ``/webapi/find`` (``webclient.PingResponse``) the daemon uses."""

    cluster_name: str
    server_version: str
    proxy_public_addr: str = ""
    tls_routing_enabled: bool = False
    signature_algorithm_suite: str = SIGNATURE_SUITE
    min_client_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "auth": {"signature_algorithm_suite": self.signature_algorithm_suite},
            "proxy": {
                "kube": {"enabled": False},
                "ssh": {
                    "listen_addr": self.proxy_public_addr,
                    "public_addr": self.proxy_public_addr,
                    "web_listen_addr": self.proxy_public_addr,
                },
                "db": {},
                "tls_routing_enabled": self.tls_routing_enabled,
            },
            "server_version": self.server_version,
            "min_client_version": self.min_client_version,
            "cluster_name": self.cluster_name,
            "auto_update": {"tools_auto_update": False, "agent_auto_update": False},
            "edition": "community",
            "fips": False,
        }

    @classmethod
    def from_json(cls, doc: object) -> PingResponse:
        obj = _object(doc)
        proxy = obj.get("proxy") or {}
        ssh = proxy.get("ssh") or {} if isinstance(proxy, dict) else {}
        auth = obj.get("auth") or {}
        suite = auth.get("signature_algorithm_suite", "") if isinstance(auth, dict) else ""
        public_addr = ssh.get("public_addr", "") if isinstance(ssh, dict) else ""
        return cls(
            cluster_name=_str(obj, "cluster_name"),
            server_version=_str(obj, "server_version", required=False),
            proxy_public_addr=public_addr if isinstance(public_addr, str) else "",
            tls_routing_enabled=bool(proxy.get("tls_routing_enabled", False))
            if isinstance(proxy, dict)
            else False,
            # The suite may be a string on find or an integer on ping (teleport-protocol.md §1).
            signature_algorithm_suite=str(suite) if suite not in (None, "", 0) else "legacy",
            min_client_version=_str(obj, "min_client_version", required=False),
        )


def error_body(message: str) -> dict[str, Any]:
    """Teleport's trace error body."""
    return {"error": {"message": message}}


def error_message(doc: object) -> str | None:
    """The message of a trace error body, or None when ``doc`` is not one."""
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
    return None


# --- workload identity: OpenID discovery (unauthenticated) ----------------------------------------

#: The OpenID Provider metadata of the cluster as a JWT-SVID issuer.
PATH_OPENID_CONFIGURATION = "/.well-known/openid-configuration"
#: The JWKS holding the public keys that sign JWT-SVIDs.
PATH_JWKS = "/.well-known/jwks.json"

#: ``POST``: an X.509 SVID for one workload_identity resource (mTLS, bot identity).
PATH_X509_SVID = "/v1/bot/workload-identity/x509"
#: ``POST``: a JWT-SVID for one workload_identity resource (mTLS, bot identity).
PATH_JWT_SVID = "/v1/bot/workload-identity/jwt"


@dataclass(frozen=True)
class WorkloadIdentitySelector:
    """Which workload_identity resource: by ``name``, or the first by name whose labels match.

    Exactly one of ``name`` and ``labels`` is set (tbot's ``selector``).
    """

    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        if self.name:
            return {"selector": {"name": self.name}}
        return {"selector": {"labels": dict(self.labels)}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> WorkloadIdentitySelector:
        selector = obj.get("selector")
        if not isinstance(selector, dict):
            raise WireError("selector must be a JSON object with name or labels")
        name = _str(selector, "name", required=False)
        labels = selector.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise WireError("selector.labels must map strings to strings")
        if bool(name) == bool(labels):
            raise WireError("selector needs exactly one of name and labels")
        return cls(name=name, labels=labels)


@dataclass(frozen=True)
class X509SVIDRequest:
    """``POST /v1/bot/workload-identity/x509``: an X.509 SVID for ``public_key`` (PKIX PEM)."""

    selector: WorkloadIdentitySelector
    public_key: bytes
    expires: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        doc = self.selector.to_json() | {"public_key": self.public_key.decode()}
        if self.expires is not None:
            doc["expires"] = format_time(self.expires)
        return doc

    @classmethod
    def from_json(cls, doc: object) -> X509SVIDRequest:
        obj = _object(doc)
        return cls(
            selector=WorkloadIdentitySelector.from_json(obj),
            public_key=_str(obj, "public_key").encode(),
            expires=_optional_expires(obj),
        )


@dataclass(frozen=True)
class X509SVIDResponse:
    """An X.509 SVID (PEM), its SPIFFE ID and the trust bundle (the SPIFFE CA, PEM)."""

    spiffe_id: str
    svid: bytes
    bundle: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "spiffe_id": self.spiffe_id,
            "svid": self.svid.decode(),
            "bundle": self.bundle.decode(),
        }

    @classmethod
    def from_json(cls, doc: object) -> X509SVIDResponse:
        obj = _object(doc)
        return cls(
            spiffe_id=_str(obj, "spiffe_id"),
            svid=_str(obj, "svid").encode(),
            bundle=_str(obj, "bundle").encode(),
        )


@dataclass(frozen=True)
class JWTSVIDRequest:
    """``POST /v1/bot/workload-identity/jwt``: a JWT-SVID for ``audiences``."""

    selector: WorkloadIdentitySelector
    audiences: tuple[str, ...]
    expires: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        doc = self.selector.to_json() | {"audiences": list(self.audiences)}
        if self.expires is not None:
            doc["expires"] = format_time(self.expires)
        return doc

    @classmethod
    def from_json(cls, doc: object) -> JWTSVIDRequest:
        obj = _object(doc)
        audiences = obj.get("audiences")
        if (
            not isinstance(audiences, list)
            or not audiences
            or not all(isinstance(a, str) and a for a in audiences)
        ):
            raise WireError("audiences must be a non-empty list of non-empty strings")
        return cls(
            selector=WorkloadIdentitySelector.from_json(obj),
            audiences=tuple(audiences),
            expires=_optional_expires(obj),
        )


@dataclass(frozen=True)
class JWTSVIDResponse:
    """A JWT-SVID (compact JWS) and its SPIFFE ID."""

    spiffe_id: str
    jwt: str

    def to_json(self) -> dict[str, Any]:
        return {"spiffe_id": self.spiffe_id, "jwt": self.jwt}

    @classmethod
    def from_json(cls, doc: object) -> JWTSVIDResponse:
        obj = _object(doc)
        return cls(spiffe_id=_str(obj, "spiffe_id"), jwt=_str(obj, "jwt"))


# --- MCP access proxy (mTLS with the proxy bot's identity output) --------------------------------

#: ``POST``: who an MCP client is and whether it may open a session with one app.
PATH_MCP_SESSION = "/v1/proxy/mcp/session"
#: ``POST``: the MCP apps an MCP client may reach.
PATH_MCP_APPS = "/v1/proxy/mcp/apps"
#: ``POST``: the access proxy's TLS server certificate, signed by the host CA.
PATH_TLS_SERVER_CERT = "/v1/proxy/tls-cert"

MCP_APP_SOURCES = ("resource", "config")
#: Most SANs a TLS server certificate request may ask for.
MAX_SERVER_CERT_NAMES = 16


def _present(obj: dict[str, Any], key: str, default: object) -> object:
    """``obj[key]``, or ``default`` when it is missing or null (a wrong type stays wrong)."""
    value = obj.get(key)
    return default if value is None else value


def _str_tuple(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    raw = _present(obj, key, [])
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise WireError(f"{key} must be a list of strings")
    return tuple(raw)


def _labels(obj: dict[str, Any], key: str) -> dict[str, str]:
    raw = _present(obj, key, {})
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise WireError(f"{key} must map strings to strings")
    return dict(raw)


def _pem(obj: dict[str, Any], key: str) -> bytes:
    """A PEM field: JSON text, not base64."""
    value = _str(obj, key)
    if not value:
        raise WireError(f"{key} must not be empty")
    return value.encode()


def _roles(obj: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    raw = _present(obj, "roles", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise WireError("roles must be a list of JSON objects")
    return tuple(raw)


@dataclass(frozen=True)
class MCPApp:
    """An MCP app as the access proxy needs it: an app resource or one from the proxy's config.

    ``uri`` is ``mcp+stdio://...``, ``mcp+http://...`` or ``mcp+https://...``;
    ``headers`` are ``rewrite.headers`` as written (``Name: value``); ``command`` and
    ``args`` start an ``mcp+stdio`` server.
    """

    name: str
    uri: str
    labels: dict[str, str] = field(default_factory=dict)
    description: str = ""
    headers: tuple[str, ...] = ()
    command: str = ""
    args: tuple[str, ...] = ()
    source: str = "resource"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uri": self.uri,
            "labels": dict(self.labels),
            "description": self.description,
            "headers": list(self.headers),
            "command": self.command,
            "args": list(self.args),
            "source": self.source,
        }

    @classmethod
    def from_json(cls, doc: object) -> MCPApp:
        obj = _object(doc)
        source = _str(obj, "source", required=False) or "resource"
        if source not in MCP_APP_SOURCES:
            raise WireError("source must be resource or config")
        name, uri = _str(obj, "name"), _str(obj, "uri")
        if not name or not uri:
            raise WireError("an MCP app needs a name and a uri")
        return cls(
            name=name,
            uri=uri,
            labels=_labels(obj, "labels"),
            description=_str(obj, "description", required=False),
            headers=_str_tuple(obj, "headers"),
            command=_str(obj, "command", required=False),
            args=_str_tuple(obj, "args"),
            source=source,
        )


def _mcp_apps(obj: dict[str, Any], key: str) -> tuple[MCPApp, ...]:
    raw = _present(obj, key, [])
    if not isinstance(raw, list):
        raise WireError(f"{key} must be a list")
    return tuple(MCPApp.from_json(item) for item in raw)


@dataclass(frozen=True)
class MCPSessionRequest:
    """``POST /v1/proxy/mcp/session``: may the holder of ``client_cert`` use app ``app``?

    ``client_cert`` is the PEM certificate the MCP client presented to the proxy;
    ``config_app`` is the app's definition when it is in the proxy's config; ``jwt``
    asks for a JWT for the app too.
    """

    client_cert: bytes
    app: str
    config_app: MCPApp | None = None
    jwt: bool = False

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "client_cert": self.client_cert.decode(),
            "app": self.app,
            "jwt": self.jwt,
        }
        if self.config_app is not None:
            doc["config_app"] = self.config_app.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: object) -> MCPSessionRequest:
        obj = _object(doc)
        app = _str(obj, "app")
        if not app:
            raise WireError("app must not be empty")
        want_jwt = obj.get("jwt", False)
        if not isinstance(want_jwt, bool):
            raise WireError("jwt must be a boolean")
        raw_config = obj.get("config_app")
        return cls(
            client_cert=_pem(obj, "client_cert"),
            app=app,
            config_app=None if raw_config is None else MCPApp.from_json(raw_config),
            jwt=want_jwt,
        )


@dataclass(frozen=True)
class MCPSessionResponse:
    """Who the MCP client is, the roles that count (``Role.to_json()``), the app, and the end.

    ``expires`` is when the proxy must end the session: the client certificate's
    NotAfter, or the JWT's expiry when sooner. ``jwt`` is set when it was asked for.
    """

    user: str
    bot: str
    roles: tuple[dict[str, Any], ...]
    app: MCPApp
    expires: datetime
    jwt: str = field(default="", repr=False)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "user": self.user,
            "bot": self.bot,
            "roles": list(self.roles),
            "app": self.app.to_json(),
            "expires": format_time(self.expires),
        }
        if self.jwt:
            doc["jwt"] = self.jwt
        return doc

    @classmethod
    def from_json(cls, doc: object) -> MCPSessionResponse:
        obj = _object(doc)
        return cls(
            user=_str(obj, "user"),
            bot=_str(obj, "bot"),
            roles=_roles(obj),
            app=MCPApp.from_json(obj.get("app")),
            expires=parse_time(obj.get("expires"), "expires"),
            jwt=_str(obj, "jwt", required=False),
        )


@dataclass(frozen=True)
class MCPAppsRequest:
    """``POST /v1/proxy/mcp/apps``: the MCP apps the holder of ``client_cert`` may reach."""

    client_cert: bytes
    config_apps: tuple[MCPApp, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "client_cert": self.client_cert.decode(),
            "config_apps": [app.to_json() for app in self.config_apps],
        }

    @classmethod
    def from_json(cls, doc: object) -> MCPAppsRequest:
        obj = _object(doc)
        return cls(client_cert=_pem(obj, "client_cert"), config_apps=_mcp_apps(obj, "config_apps"))


@dataclass(frozen=True)
class MCPAppsResponse:
    """The MCP apps the client's roles may reach, sorted by name, and who the client is."""

    user: str
    roles: tuple[dict[str, Any], ...]
    apps: tuple[MCPApp, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "roles": list(self.roles),
            "apps": [app.to_json() for app in self.apps],
        }

    @classmethod
    def from_json(cls, doc: object) -> MCPAppsResponse:
        obj = _object(doc)
        return cls(user=_str(obj, "user"), roles=_roles(obj), apps=_mcp_apps(obj, "apps"))


@dataclass(frozen=True)
class TLSServerCertRequest:
    """``POST /v1/proxy/tls-cert``: a server certificate for ``public_key`` (PKIX PEM, P-256).

    ``dns_names`` are the DNS names and IP addresses for the SANs (1 to
    :data:`MAX_SERVER_CERT_NAMES`).
    """

    public_key: bytes
    dns_names: tuple[str, ...]
    expires: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "public_key": self.public_key.decode(),
            "dns_names": list(self.dns_names),
        }
        if self.expires is not None:
            doc["expires"] = format_time(self.expires)
        return doc

    @classmethod
    def from_json(cls, doc: object) -> TLSServerCertRequest:
        obj = _object(doc)
        names = obj.get("dns_names")
        if (
            not isinstance(names, list)
            or not 0 < len(names) <= MAX_SERVER_CERT_NAMES
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise WireError(
                f"dns_names must be a list of 1 to {MAX_SERVER_CERT_NAMES} non-empty strings"
            )
        return cls(
            public_key=_pem(obj, "public_key"),
            dns_names=tuple(names),
            expires=_optional_expires(obj),
        )


@dataclass(frozen=True)
class TLSServerCertResponse:
    """The server certificate (PEM, host CA, serverAuth), the host CA and the user CA.

    Client certificates must chain to ``user_ca``.
    """

    cert: bytes
    host_ca: bytes
    user_ca: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "cert": self.cert.decode(),
            "host_ca": self.host_ca.decode(),
            "user_ca": self.user_ca.decode(),
        }

    @classmethod
    def from_json(cls, doc: object) -> TLSServerCertResponse:
        obj = _object(doc)
        return cls(
            cert=_pem(obj, "cert"), host_ca=_pem(obj, "host_ca"), user_ca=_pem(obj, "user_ca")
        )
