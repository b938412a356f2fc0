"""The auth service client over HTTPS (our own small HTTP/1.1 client, :mod:`._http1`).

Every call returns a typed value from :mod:`tbot_py.client.wire` or raises one
:class:`tbot_py.errors.ClientError` subclass whose message is one safe line:
the URL, the status and the server's error message, never the request body.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from tbot_py import __version__
from tbot_py.client import wire
from tbot_py.client._http1 import ConnectionPool, HTTPProtocolError, Response
from tbot_py.errors import (
    AccessDenied,
    BadParameter,
    ClientError,
    ConnectionProblem,
    LimitExceeded,
    NotFound,
    ProtocolError,
    ServerError,
    TrustError,
)

T = TypeVar("T")


class _Request(Protocol):
    """A wire request: what it sends is its JSON."""

    def to_json(self) -> dict[str, Any]: ...


log = logging.getLogger(__name__)

_STATUS_ERRORS: dict[int, type[ClientError]] = {
    400: BadParameter,
    403: AccessDenied,
    404: NotFound,
    429: LimitExceeded,
}
_MAX_MESSAGE = 512
DEFAULT_PORT = 443


def normalize_addr(addr: str) -> str:
    """``host:port`` from ``host``, ``host:port`` or ``https://host:port``."""
    addr = addr.strip().removeprefix("https://").rstrip("/")
    if addr.startswith("["):  # [v6]:port
        return addr if "]:" in addr else f"{addr}:{DEFAULT_PORT}"
    return addr if ":" in addr else f"{addr}:{DEFAULT_PORT}"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def _request_error(exc: OSError | HTTPProtocolError, url: str) -> ClientError:
    """Classify a failed request: TLS trust, TLS or HTTP protocol, or plain connectivity."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        return TrustError(
            f"cannot verify the server's TLS certificate ({reason}); "
            "check ca_pins/ca_path and the address",
            url=url,
        )
    if isinstance(exc, ssl.SSLError):
        return ProtocolError(
            f"TLS handshake failed ({exc.reason or exc}); is this a tbot-py auth "
            "service speaking HTTPS?",
            url=url,
        )
    if isinstance(exc, TimeoutError):
        return ConnectionProblem("timed out waiting for the auth service", url=url)
    if isinstance(exc, HTTPProtocolError):
        return ProtocolError(f"server broke the HTTP protocol: {_one_line(str(exc))}", url=url)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return ConnectionProblem(f"cannot reach the auth service: {_one_line(reason)}", url=url)


class AuthClient:
    """Talks to one auth service address with one TLS context (verified, or mTLS)."""

    def __init__(self, addr: str, ctx: ssl.SSLContext, *, timeout: float = 30.0) -> None:
        self.addr = normalize_addr(addr)
        self.base_url = f"https://{self.addr}"
        try:
            self._http = ConnectionPool(
                self.addr, ctx, timeout=timeout, user_agent=f"tbot-py/{__version__}"
            )
        except ValueError:
            raise ConnectionProblem(
                "the address is not host:port with a port from 1 to 65535", url=self.base_url
            ) from None

    async def __aenter__(self) -> AuthClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        url = self.base_url + path
        content = None
        if body is not None:
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            response = await self._http.request(method, path, content, "application/json")
        except (OSError, HTTPProtocolError) as exc:
            raise _request_error(exc, url) from None
        log.debug("%s %s: HTTP %d", method, url, response.status)
        if response.status == 200:
            return response.body
        raise self._status_error(response, url, plain_text_ok=body is None)

    @staticmethod
    def _status_error(response: Response, url: str, *, plain_text_ok: bool) -> ClientError:
        status = response.status
        content_type = response.headers.get("content-type", "")
        try:
            message = wire.error_message(json.loads(response.body))
        except ValueError:
            message = None
        text = response.body.decode("utf-8", errors="replace").strip()
        if message is None and plain_text_ok and text and content_type.startswith("text/plain"):
            # Teleport's export endpoint answers errors in plain text. Only trusted for
            # requests without a body: a server reflecting a join request would echo the token.
            message = text.splitlines()[0]
        if message is None:
            message = f"unexpected answer ({content_type or 'no content type'})"
        message = _one_line(message)
        retry_after = response.headers.get("retry-after", "").strip()
        if status == 429 and re.fullmatch(r"[0-9]{1,9}", retry_after):
            message += f" (Retry-After: {retry_after}s)"
        cls = _STATUS_ERRORS.get(status) or (ServerError if status >= 500 else ProtocolError)
        return cls(message, url=url, status=status)

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> object:
        content = await self._request(method, path, body)
        try:
            return json.loads(content)
        except ValueError:
            raise ProtocolError(
                "server answered with something that is not JSON", url=self.base_url + path
            ) from None

    async def call_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> object:
        """Any other JSON endpoint (the CLI's admin commands use it): the decoded answer."""
        return await self._json(method, path, body)

    async def _call(
        self,
        method: str,
        path: str,
        parse: Callable[[object], T],
        request: _Request | None = None,
    ) -> T:
        """Send ``request`` as JSON and ``parse`` the JSON answer; ProtocolError if it does not."""
        doc = await self._json(method, path, None if request is None else request.to_json())
        try:
            return parse(doc)
        except wire.WireError as exc:
            raise ProtocolError(f"unexpected response: {exc}", url=self.base_url + path) from None

    async def ping(self) -> wire.PingResponse:
        """``GET /webapi/find``: cluster name, version and proxy addresses."""
        return await self._call("GET", wire.PATH_FIND, wire.PingResponse.from_json)

    async def export_ca(self, ca_type: str) -> bytes:
        """``GET /webapi/auth/export?type=...``: public CA material, unauthenticated."""
        return await self._request("GET", f"{wire.PATH_EXPORT}?type={ca_type}")

    async def register_using_token(self, request: wire.RegisterUsingTokenRequest) -> wire.Certs:
        """The token join: trade a join token and a public key for a bot identity."""
        return await self._call("POST", wire.PATH_JOIN, wire.Certs.from_json, request)

    async def renew_bot(self, request: wire.RenewRequest) -> wire.Certs:
        """Renew the bot's own identity (mTLS with the current bot certificate)."""
        return await self._call("POST", wire.PATH_RENEW, wire.Certs.from_json, request)

    async def issue_impersonated(self, request: wire.ImpersonateRequest) -> wire.Certs:
        """Issue a short-lived identity for an output (mTLS with the bot certificate)."""
        return await self._call("POST", wire.PATH_CERTS, wire.Certs.from_json, request)

    async def issue_host_cert(self, request: wire.HostCertRequest) -> wire.HostCertResponse:
        """Sign an SSH host certificate with the cluster's host CA (mTLS, ``ssh_host`` output)."""
        return await self._call(
            "POST", wire.PATH_HOST_CERT, wire.HostCertResponse.from_json, request
        )

    async def cert_authorities(self) -> list[wire.CertAuthority]:
        """The cluster's host, user and database CAs (public parts only)."""
        return await self._call("GET", wire.PATH_CAS, wire.cert_authorities_from_json)

    async def issue_x509_svid(self, request: wire.X509SVIDRequest) -> wire.X509SVIDResponse:
        """An X.509 SVID for a workload_identity the bot's roles allow, and the trust bundle."""
        return await self._call(
            "POST", wire.PATH_X509_SVID, wire.X509SVIDResponse.from_json, request
        )

    async def issue_jwt_svid(self, request: wire.JWTSVIDRequest) -> wire.JWTSVIDResponse:
        """A JWT-SVID for a workload_identity the bot's roles allow, for ``audiences``."""
        return await self._call("POST", wire.PATH_JWT_SVID, wire.JWTSVIDResponse.from_json, request)

    async def mcp_session(self, request: wire.MCPSessionRequest) -> wire.MCPSessionResponse:
        """Who an MCP client is and whether it may use an app (the access proxy's mTLS)."""
        return await self._call(
            "POST", wire.PATH_MCP_SESSION, wire.MCPSessionResponse.from_json, request
        )

    async def mcp_apps(self, request: wire.MCPAppsRequest) -> wire.MCPAppsResponse:
        """The MCP apps an MCP client may reach (the access proxy's mTLS)."""
        return await self._call("POST", wire.PATH_MCP_APPS, wire.MCPAppsResponse.from_json, request)

    async def issue_tls_server_cert(
        self, request: wire.TLSServerCertRequest
    ) -> wire.TLSServerCertResponse:
        """A TLS server certificate from the host CA for the access proxy (``host_cert`` rule)."""
        return await self._call(
            "POST", wire.PATH_TLS_SERVER_CERT, wire.TLSServerCertResponse.from_json, request
        )
