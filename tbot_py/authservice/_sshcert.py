"""SSH user certificates for ECDSA P-256 keys, encoded once and signed once.

``cryptography``'s ``SSHCertificateBuilder`` encodes the certificate, signs it, then
parses the result back into an ``SSHCertificate`` that the caller encodes again as a
line: about half the cost of an issuance went into those extra passes. This writes the
wire format of OpenSSH's PROTOCOL.certkeys directly. For the same nonce and serial the
bytes are exactly what the builder produces (``test_sshcert.py`` checks it): fields in
protocol order, extensions sorted by name, a non-empty extension value wrapped in a
string of its own, the ECDSA signature over SHA-256 as two mpints.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

KEY_TYPE = b"ecdsa-sha2-nistp256"
CERT_KEY_TYPE = KEY_TYPE + b"-cert-v01@openssh.com"
CURVE = b"nistp256"
USER_CERT = 1
NONCE_BYTES = 32


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _mpint(value: int) -> bytes:
    """A non-negative SSH mpint: big-endian, minimal, a zero byte first when the top bit is set."""
    return _string(value.to_bytes((value.bit_length() + 8) // 8, "big") if value else b"")


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"SSH certificates are only issued for P-256 keys, not {key.curve.name}")
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def sign_user_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    *,
    serial: int,
    key_id: bytes,
    principals: Sequence[bytes],
    valid_after: int,
    valid_before: int,
    extensions: Mapping[bytes, bytes],
    nonce: bytes | None = None,
) -> bytes:
    """A user certificate for ``public_key`` signed by ``ca_key``: ``<type> <base64>``, no newline.

    ``nonce`` is for tests; by default 32 random bytes, as OpenSSH and ``cryptography`` use.
    """
    if not principals:
        raise ValueError("an SSH certificate needs at least one principal")
    if valid_after > valid_before:
        raise ValueError("valid_after must be earlier than valid_before")
    exts = b"".join(
        _string(name) + _string(_string(value) if value else b"")
        for name, value in sorted(extensions.items())
    )
    signed = b"".join(
        (
            _string(CERT_KEY_TYPE),
            _string(os.urandom(NONCE_BYTES) if nonce is None else nonce),
            _string(CURVE),
            _string(_point(public_key)),
            struct.pack(">QI", serial, USER_CERT),
            _string(key_id),
            _string(b"".join(_string(p) for p in principals)),
            struct.pack(">QQ", valid_after, valid_before),
            _string(b""),  # critical options: none
            _string(exts),
            _string(b""),  # reserved
            _string(_string(KEY_TYPE) + _string(CURVE) + _string(_point(ca_key.public_key()))),
        )
    )
    r, s = decode_dss_signature(ca_key.sign(signed, ec.ECDSA(hashes.SHA256())))
    signature = _string(KEY_TYPE) + _string(_mpint(r) + _mpint(s))
    return CERT_KEY_TYPE + b" " + base64.b64encode(signed + _string(signature))
