"""The admin commands against a running auth service: ``--auth-server H:P -i FILE``.

The daemon's client (:class:`~tbot_py.client.http.AuthClient`), called
synchronously, on the server's ``/v1/admin/`` API. Everything it trusts and
presents comes from the identity file (``auth start --write-admin-identity``):
the server must chain to the file's TLS CAs, and the file's certificate and key
are the client certificate. Errors are the same safe, one-line
:class:`~tbot_py.errors.ClientError` the daemon's client raises.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tbot_py.client import tls
from tbot_py.client.http import AuthClient
from tbot_py.errors import IdentityError
from tbot_py.identity import keys
from tbot_py.identity.identityfile import IdentityFile, parse_identity_file

ADMIN_PREFIX = "/v1/admin"


class RemoteAdmin:
    """Calls the admin API of the auth service at ``addr`` as the identity in ``identity``."""

    def __init__(self, addr: str, identity: IdentityFile, *, timeout: float = 30.0) -> None:
        if not identity.private_key_pem or not identity.tls_cert_pem or not identity.tls_ca_pems:
            raise IdentityError(
                "the identity file needs a key, a TLS certificate and the cluster's TLS CAs; "
                "use the file auth start --write-admin-identity wrote"
            )
        self.identity = identity
        self.addr = addr
        self._ctx = tls.mtls_context(
            identity.tls_cert_pem, identity.private_key_pem, identity.tls_ca_pems
        )
        self._timeout = timeout

    @classmethod
    def from_file(cls, addr: str, path: Path) -> RemoteAdmin:
        """Read the identity file at ``path``; IdentityError naming it when that fails."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read identity file {path}: {exc.strerror}") from None
        try:
            return cls(addr, parse_identity_file(data))
        except IdentityError as exc:
            raise IdentityError(f"identity file {path}: {exc}") from None

    @property
    def ca_pin(self) -> str:
        """The cluster's CA pin: the host CA, last of the file's TLS CAs (user, then host)."""
        from cryptography import x509

        return keys.ca_pin(x509.load_pem_x509_certificate(self.identity.tls_ca_pems[-1]))

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """``method`` ``/v1/admin/<path>`` with a JSON ``body``; the decoded JSON answer."""
        return asyncio.run(self._call(method, f"{ADMIN_PREFIX}/{path}", body))

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> object:
        async with AuthClient(self.addr, self._ctx, timeout=self._timeout) as client:
            return await client.call_json(method, path, body)
