"""Trust on first contact: how the daemon decides it is talking to the right cluster.

Before the bot holds an identity it has no CA to verify the server with. The
options, in tbot's terms:

- ``ca_pins``: fetch the host CA from ``/webapi/auth/export`` without
  verification, keep only the certificates whose SubjectPublicKeyInfo hash
  matches a pin, then make every further request verified against them. A
  man in the middle can answer the first fetch, but cannot produce a CA that
  matches the pin, so the join itself can never reach them.
- ``ca_path``: a PEM file holding the CA.
- ``insecure``: no verification at all; an explicit, logged opt-in.
- none of these: the system trust store (a proxy with a public certificate).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from cryptography import x509

from tbot_py.client import tls
from tbot_py.client.http import AuthClient
from tbot_py.errors import ConfigError, TrustError
from tbot_py.identity.keys import ca_pin
from tbot_py.identity.model import split_pem_certs

log = logging.getLogger("tbot_py.client")


def _load_ca_file(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"CA file {path} does not exist", yaml_path="onboarding.ca_path"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"CA file {path} cannot be read: {exc.strerror}", yaml_path="onboarding.ca_path"
        ) from None
    pems = split_pem_certs(data)
    try:
        for pem in pems:
            x509.load_pem_x509_certificate(pem)
    except ValueError:
        pems = ()
    if not pems:
        raise ConfigError(
            f"CA file {path} holds no valid PEM certificate", yaml_path="onboarding.ca_path"
        )
    return b"".join(pems).decode()


async def pinned_ca_pems(addr: str, pins: tuple[str, ...]) -> tuple[bytes, ...]:
    """Fetch the cluster's host CA and return the certificates that match ``pins``."""
    async with AuthClient(addr, tls.insecure_context()) as bootstrap:
        offered = split_pem_certs(await bootstrap.export_ca("tls-host"))
        url = bootstrap.base_url
    wanted = {p.lower() for p in pins}
    matched: list[bytes] = []
    seen: list[str] = []
    for pem in offered:
        try:
            pin = ca_pin(x509.load_pem_x509_certificate(pem))
        except ValueError:
            continue
        seen.append(pin)
        if pin in wanted:
            matched.append(pem)
    if not matched:
        offered_text = ", ".join(seen) if seen else "no CA certificate"
        raise TrustError(
            f"the server's CA does not match any configured CA pin (server offered {offered_text})",
            url=url,
        )
    return tuple(matched)


async def first_contact_context(
    addr: str, *, ca_pins: tuple[str, ...], ca_path: str | None, insecure: bool
) -> ssl.SSLContext:
    """The TLS context for requests made before the bot has an identity (the join)."""
    if insecure:
        log.warning(
            "insecure mode: the auth service at %s is not verified; anyone on the path "
            "can impersonate it",
            addr,
        )
        return tls.insecure_context()
    if ca_path:
        return tls.verified_context(cadata=_load_ca_file(ca_path))
    if ca_pins:
        pems = await pinned_ca_pems(addr, ca_pins)
        return tls.verified_context(cadata=b"".join(pems).decode())
    return tls.verified_context()
