"""The access proxy's own credentials: its bot's client to the auth service, its server certificate.

The proxy is a bot like any other: a tbot-py daemon keeps its identity file fresh, and
:class:`IdentityAuth` calls the auth service with it, re-reading the file whenever it
changes. The auth service also signs the proxy's TLS server certificate (host CA), and
tells it the user CA that MCP clients' certificates must chain to
(:func:`fetch_server_cert`, :func:`server_context`).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from cryptography import x509

from tbot_py.client import tls, wire
from tbot_py.client.http import AuthClient
from tbot_py.errors import IdentityError, TrustError
from tbot_py.identity import keys
from tbot_py.identity.identityfile import read_identity_file
from tbot_py.mcp import tunnel

log = logging.getLogger("tbot_py.mcp.proxy")

_UNSPECIFIED_HOSTS = ("", "0.0.0.0", "::")  # noqa: S104 - names, not a bind


class ProxyAuth(Protocol):
    """The three auth-service calls the proxy makes (:class:`IdentityAuth` in production)."""

    async def mcp_session(self, request: wire.MCPSessionRequest) -> wire.MCPSessionResponse: ...

    async def mcp_apps(self, request: wire.MCPAppsRequest) -> wire.MCPAppsResponse: ...

    async def issue_tls_server_cert(
        self, request: wire.TLSServerCertRequest
    ) -> wire.TLSServerCertResponse: ...


# --- the proxy's bot ---------------------------------------------------------------------


def file_version(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class IdentityAuth:
    """The auth service, called with the proxy bot's identity file; re-read when it changes.

    With ``ca_pins`` the auth service is verified only against the file's CAs that
    match a pin; otherwise against all the file's CAs.
    """

    def __init__(self, addr: str, identity: str | Path, ca_pins: Sequence[str] = ()) -> None:
        self.addr = addr
        self.identity = Path(identity)
        self.ca_pins = frozenset(pin.lower() for pin in ca_pins)
        self._client: AuthClient | None = None
        self._version: tuple[int, int, int] | None = None

    async def _current(self) -> AuthClient:
        version = file_version(self.identity)
        if self._client is not None and version == self._version:
            return self._client
        identity = read_identity_file(self.identity)
        if not identity.private_key_pem or not identity.tls_cert_pem or not identity.tls_ca_pems:
            raise IdentityError(
                f"identity file {self.identity} needs a key, a TLS certificate and the TLS CAs"
            )
        client = AuthClient(
            self.addr,
            tls.mtls_context(
                identity.tls_cert_pem, identity.private_key_pem, self._trusted(identity.tls_ca_pems)
            ),
        )
        old, self._client, self._version = self._client, client, version
        if old is not None:
            log.info("identity file %s changed; using the new certificate", self.identity)
            await old.close()
        return client

    def _trusted(self, ca_pems: tuple[bytes, ...]) -> tuple[bytes, ...]:
        if not self.ca_pins:
            return ca_pems
        pinned = tuple(
            pem
            for pem in ca_pems
            if keys.ca_pin(x509.load_pem_x509_certificate(pem)) in self.ca_pins
        )
        if not pinned:
            raise TrustError(f"no CA in the identity file {self.identity} matches ca_pins")
        return pinned

    async def mcp_session(self, request: wire.MCPSessionRequest) -> wire.MCPSessionResponse:
        return await (await self._current()).mcp_session(request)

    async def mcp_apps(self, request: wire.MCPAppsRequest) -> wire.MCPAppsResponse:
        return await (await self._current()).mcp_apps(request)

    async def issue_tls_server_cert(
        self, request: wire.TLSServerCertRequest
    ) -> wire.TLSServerCertResponse:
        return await (await self._current()).issue_tls_server_cert(request)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# --- the server certificate --------------------------------------------------------------


@dataclass(frozen=True)
class ServerCert:
    """The proxy's TLS server certificate and key, and the CA its clients must chain to."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    user_ca_pem: bytes
    not_before: datetime
    not_after: datetime

    @property
    def renew_at(self) -> datetime:
        """When to renew: 2/3 into the certificate's life."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3


def server_names(listen_host: str, public_hosts: Sequence[str]) -> tuple[str, ...]:
    """The SANs to ask for: the listen host (the host name for a wildcard), then the others."""
    first = socket.gethostname() if listen_host in _UNSPECIFIED_HOSTS else listen_host
    return tuple(dict.fromkeys([first, *public_hosts]))


async def fetch_server_cert(auth: ProxyAuth, names: Sequence[str]) -> ServerCert:
    """A new key and a certificate for it from the auth service."""
    key = keys.generate_private_key()
    answer = await auth.issue_tls_server_cert(
        wire.TLSServerCertRequest(
            public_key=keys.public_key_pem(key.public_key()), dns_names=tuple(names)
        )
    )
    cert = x509.load_pem_x509_certificate(answer.cert)
    return ServerCert(
        cert_pem=answer.cert,
        key_pem=keys.private_key_pem(key),
        user_ca_pem=answer.user_ca,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def server_context(cert: ServerCert) -> ssl.SSLContext:
    """TLS 1.2+, ALPN :data:`.tunnel.ALPN`, a client certificate from the user CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([tunnel.ALPN])
    ctx.num_tickets = 0  # no resumption: every connection presents its current certificate
    load_server_cert(ctx, cert)
    return ctx


def load_server_cert(ctx: ssl.SSLContext, cert: ServerCert) -> None:
    """Serve ``cert`` on new connections and trust its user CA (added to the ones known)."""
    ctx.load_verify_locations(cadata=cert.user_ca_pem.decode())
    tls.load_client_identity(ctx, cert.cert_pem, cert.key_pem)
