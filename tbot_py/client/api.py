"""The one interface services use to reach the cluster.

The HTTPS implementation is :class:`tbot_py.client.http.AuthClient`. A
Teleport gRPC backend can be added later by implementing this protocol,
without touching services.
"""

from __future__ import annotations

from typing import Protocol

from tbot_py.client import wire


class AuthAPI(Protocol):
    """Calls the daemon makes to the auth service."""

    async def ping(self) -> wire.PingResponse: ...

    async def register_using_token(self, request: wire.RegisterUsingTokenRequest) -> wire.Certs: ...

    async def renew_bot(self, request: wire.RenewRequest) -> wire.Certs: ...

    async def issue_impersonated(self, request: wire.ImpersonateRequest) -> wire.Certs: ...

    async def issue_host_cert(self, request: wire.HostCertRequest) -> wire.HostCertResponse: ...

    async def issue_x509_svid(self, request: wire.X509SVIDRequest) -> wire.X509SVIDResponse: ...

    async def issue_jwt_svid(self, request: wire.JWTSVIDRequest) -> wire.JWTSVIDResponse: ...

    async def cert_authorities(self) -> list[wire.CertAuthority]: ...

    async def mcp_session(self, request: wire.MCPSessionRequest) -> wire.MCPSessionResponse: ...

    async def mcp_apps(self, request: wire.MCPAppsRequest) -> wire.MCPAppsResponse: ...

    async def issue_tls_server_cert(
        self, request: wire.TLSServerCertRequest
    ) -> wire.TLSServerCertResponse: ...

    async def close(self) -> None: ...
