"""TLS contexts for talking to the auth service.

TLS is always verified, except under the explicit ``insecure`` opt-in. The
client key never touches the file system: ``load_cert_chain`` only accepts
paths, so on Linux we hand it an anonymous memfd.
"""

from __future__ import annotations

import os
import ssl
import tempfile


def verified_context(cadata: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the server against ``cadata``, or the system store."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cadata)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def insecure_context() -> ssl.SSLContext:
    """A client context that does not verify the server. Only for explicit opt-ins."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def load_client_identity(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Present ``cert_pem``/``key_pem`` as the client certificate on ``ctx``."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("tbot-py-identity", os.MFD_CLOEXEC)
        try:
            os.write(fd, cert_pem + b"\n" + key_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    # No memfd (not Linux): a private directory readable only by us, removed at once.
    with tempfile.TemporaryDirectory(prefix="tbot-py-") as tmp:
        path = os.path.join(tmp, "identity.pem")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_pem + b"\n" + key_pem)
        ctx.load_cert_chain(path)


def mtls_context(cert_pem: bytes, key_pem: bytes, ca_pems: tuple[bytes, ...]) -> ssl.SSLContext:
    """A context that trusts only the cluster's CAs and presents the given identity."""
    ctx = verified_context(cadata=b"".join(ca_pems).decode() if ca_pems else None)
    load_client_identity(ctx, cert_pem, key_pem)
    return ctx
