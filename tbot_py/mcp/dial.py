"""Reaching the access proxy: mTLS with the identity file, the hello, and the file's renewals.

:func:`open_tunnel` dials the proxy with the certificate in a tsh-format identity file,
checks the proxy against that file's CAs (and the name dialled), requires ALPN
:data:`.tunnel.ALPN`, sends the hello and returns the proxy's ok answer.
:func:`watch_identity` notices when tbot-py renews the file. Light on purpose (no
aiohttp, no auth service): the MCP client starts the connector for every session.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbot_py.client.tls import mtls_context
from tbot_py.errors import Error, IdentityError
from tbot_py.identity.identityfile import IdentityFile, read_identity_file
from tbot_py.mcp import tunnel

#: How often the identity file is checked for a renewed certificate.
POLL_INTERVAL_S = 1.0


class ProxyError(Error):
    """The access proxy could not be reached or verified, or it refused the hello."""


@dataclass(frozen=True)
class ProxyAddress:
    """Where the access proxy listens; ``host`` is also the name its certificate must hold."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def tls_context(identity: IdentityFile, source: str) -> ssl.SSLContext:
    """The client context: the identity's certificate, its CAs as the only trust, our ALPN.

    ``source`` names the identity file in errors (never its content).
    """
    if not identity.private_key_pem or not identity.tls_cert_pem:
        raise IdentityError(f"{source}: the identity file has no TLS certificate and key")
    if not identity.tls_ca_pems:
        raise IdentityError(f"{source}: the identity file has no TLS CAs to verify the proxy with")
    try:
        ctx = mtls_context(identity.tls_cert_pem, identity.private_key_pem, identity.tls_ca_pems)
    except (ssl.SSLError, ValueError):
        # OpenSSL's reason is not useful here, and a message must never quote the key.
        raise IdentityError(
            f"{source}: the identity file's TLS certificate, key or CAs do not load"
        ) from None
    ctx.set_alpn_protocols([tunnel.ALPN])
    return ctx


async def open_tunnel(
    proxy: ProxyAddress, identity_path: Path, hello: tunnel.Hello
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    """Connect to ``proxy`` as the identity in ``identity_path``, send ``hello``, read the answer.

    Returns the streams and the proxy's ok answer. ProxyError when the proxy cannot be
    reached or verified, or refuses (its one-line reason is kept); IdentityError when
    the identity file is unusable.
    """
    ctx = tls_context(read_identity_file(identity_path), str(identity_path))
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                proxy.host,
                proxy.port,
                ssl=ctx,
                server_hostname=proxy.host,
                limit=tunnel.stream_limit(),
            ),
            tunnel.HELLO_TIMEOUT_S,
        )
    except ssl.SSLCertVerificationError as exc:
        raise ProxyError(
            f"cannot verify the access proxy at {proxy}: {exc.verify_message}"
        ) from None
    except TimeoutError:
        raise ProxyError(f"cannot reach the access proxy at {proxy}: timed out") from None
    except OSError as exc:
        raise ProxyError(f"cannot reach the access proxy at {proxy}: {_reason(exc)}") from None
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != tunnel.ALPN:
            raise ProxyError(f"{proxy} is not an MCP access proxy (ALPN {tunnel.ALPN} refused)")
        writer.write(tunnel.encode_line(hello.to_json()))
        line = await asyncio.wait_for(tunnel.read_line(reader), tunnel.HELLO_TIMEOUT_S)
        if line is None:
            raise ProxyError(f"the access proxy at {proxy} closed the connection without answering")
        answer = tunnel.parse_answer(tunnel.decode_line(line))
    except tunnel.TunnelError as exc:
        writer.transport.abort()
        raise ProxyError(f"the access proxy at {proxy} refused: {exc}") from None
    except TimeoutError:
        writer.transport.abort()
        raise ProxyError(f"the access proxy at {proxy} did not answer the hello") from None
    except OSError as exc:
        writer.transport.abort()
        raise ProxyError(
            f"the access proxy at {proxy} dropped the connection: {_reason(exc)}"
        ) from None
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer, answer


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or "TLS error"
    return exc.strerror or str(exc) or type(exc).__name__


async def list_apps(proxy: ProxyAddress, identity_path: Path) -> dict[str, Any]:
    """The proxy's answer to a list hello: ``{"ok": true, "user": ..., "apps": [...]}``."""
    _, writer, answer = await open_tunnel(proxy, identity_path, tunnel.Hello(list=True))
    writer.transport.abort()  # the proxy closes after its answer; no close_notify to wait for
    return answer


def watch_identity(path: Path, interval: float = POLL_INTERVAL_S) -> AsyncIterator[None]:
    """Yield each time the content of the identity file at ``path`` changes from now on.

    Polled: renewals replace the file by rename, which inotify-less systems and
    bind mounts would miss anyway. A missing or unreadable file is not a change.
    """
    first = _digest(path)  # now, not at the first iteration: a change meanwhile counts

    async def changes() -> AsyncIterator[None]:
        last = first
        while True:
            await asyncio.sleep(interval)
            now = _digest(path)
            if now is not None and now != last:
                last = now
                yield

    return changes()


def _digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None
