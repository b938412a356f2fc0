"""Key generation and the encodings Teleport uses for keys.

One ECDSA P-256 key per identity, used for both the X.509 and the SSH
certificate (Teleport's balanced suite). A fresh key on every renewal.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tbot_py.errors import IdentityError

PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = ec.EllipticCurvePublicKey


def generate_private_key() -> PrivateKey:
    """Return a fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 ``PRIVATE KEY`` PEM, as Teleport writes ECDSA keys."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(pem: bytes) -> PrivateKey:
    """Load a PKCS#8 or SEC1 PEM ECDSA key; raise IdentityError otherwise."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"private key is not a valid unencrypted PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"private key has unsupported type {type(key).__name__}")
    return key


def public_key_pem(key: PublicKey) -> bytes:
    """PKIX ``PUBLIC KEY`` PEM, the join and renewal wire encoding of the TLS key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key_pem(pem: bytes) -> PublicKey:
    """Load a PKIX PEM ECDSA public key; raise IdentityError otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"public key is not a valid PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError(f"public key has unsupported type {type(key).__name__}")
    return key


def ssh_public_key_line(key: PublicKey) -> bytes:
    """The authorized_keys line of ``key``, newline-terminated."""
    return (
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )


def load_ssh_public_key_line(line: bytes) -> PublicKey:
    """Parse an authorized_keys line (``type base64 [comment]``) holding an ECDSA key."""
    try:
        key = serialization.load_ssh_public_key(b" ".join(line.strip().split(b" ")[:2]))
    except (ValueError, TypeError, IndexError) as exc:
        raise IdentityError(f"SSH public key is not valid: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError(f"SSH public key has unsupported type {type(key).__name__}")
    return key


def spki_der(key: PublicKey) -> bytes:
    """DER SubjectPublicKeyInfo of ``key``."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def same_public_key(a: PublicKey, b: PublicKey) -> bool:
    """True when ``a`` and ``b`` are the same key."""
    return spki_der(a) == spki_der(b)


def ca_pin(cert: x509.Certificate) -> str:
    """Teleport's CA pin: ``sha256:`` + hex SHA-256 of the certificate's SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def token_hash(token: str) -> str:
    """Lowercase hex SHA-256 of a join token value (tbot's ``tokenhash`` artifact)."""
    return hashlib.sha256(token.encode()).hexdigest()
