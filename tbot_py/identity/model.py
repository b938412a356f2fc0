"""An identity: one private key, the SSH and X.509 certificates issued for it, and the CAs.

This is where received credentials are checked before anything is written:
the key must match both certificates, the SSH certificate must carry
principals and the TLS issuer must name the cluster (tbot.md §4.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives.serialization import ssh

from tbot_py.client.wire import Certs
from tbot_py.errors import IdentityError
from tbot_py.identity import keys
from tbot_py.identity.tlsid import TLSIdentity, cluster_name_of

# tbot's storage files (tbot.md §4.1). CA lists are joined with "$".
ARTIFACT_KEY = "key"
ARTIFACT_PUBLIC_KEY = "key.pub"
ARTIFACT_SSH_CERT = "key-cert.pub"
ARTIFACT_TLS_CERT = "tlscert"
ARTIFACT_TLS_CAS = "tlscacerts"
ARTIFACT_SSH_CAS = "sshcacerts"
ARTIFACT_TOKEN_HASH = "tokenhash"  # noqa: S105 - a file name, not a secret
BOT_ARTIFACTS = (
    ARTIFACT_KEY,
    ARTIFACT_PUBLIC_KEY,
    ARTIFACT_SSH_CERT,
    ARTIFACT_TLS_CERT,
    ARTIFACT_TLS_CAS,
    ARTIFACT_SSH_CAS,
    ARTIFACT_TOKEN_HASH,
)
_CA_SEPARATOR = b"$"


def split_pem_certs(data: bytes) -> tuple[bytes, ...]:
    """Split concatenated PEM certificates into one PEM block each."""
    end = b"-----END CERTIFICATE-----"
    blocks = []
    for chunk in data.split(end)[:-1]:
        start = chunk.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            blocks.append(chunk[start:] + end + b"\n")
    return tuple(blocks)


@dataclass(frozen=True)
class Identity:
    """A private key with its SSH and TLS certificates, as issued by the auth service."""

    private_key_pem: bytes
    ssh_cert: bytes
    tls_cert_pem: bytes
    tls_ca_pems: tuple[bytes, ...] = ()
    ssh_ca_lines: tuple[bytes, ...] = ()

    @classmethod
    def from_certs(cls, key: keys.PrivateKey, certs: Certs) -> Identity:
        """Build and validate an identity from a fresh key and the server's answer."""
        identity = cls(
            private_key_pem=keys.private_key_pem(key),
            ssh_cert=certs.ssh if certs.ssh.endswith(b"\n") else certs.ssh + b"\n",
            tls_cert_pem=certs.tls,
            tls_ca_pems=tuple(c for pem in certs.tls_ca_certs for c in split_pem_certs(pem)),
            ssh_ca_lines=tuple(line.strip() + b"\n" for line in certs.ssh_ca_certs),
        )
        identity.validate()
        return identity

    @cached_property
    def private_key(self) -> keys.PrivateKey:
        return keys.load_private_key_pem(self.private_key_pem)

    @cached_property
    def public_ssh_key(self) -> bytes:
        """The ``key.pub`` artifact: the authorized_keys line of the private key."""
        return keys.ssh_public_key_line(self.private_key.public_key())

    @cached_property
    def tls_cert(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.tls_cert_pem)
        except ValueError as exc:
            raise IdentityError(f"TLS certificate is not valid PEM: {exc}") from None

    @cached_property
    def ssh_certificate(self) -> ssh.SSHCertificate:
        try:
            return ssh.load_ssh_public_identity(self.ssh_cert.strip())  # type: ignore[return-value]
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"SSH certificate is not valid: {exc}") from None

    @cached_property
    def tls_identity(self) -> TLSIdentity:
        return TLSIdentity.from_subject(self.tls_cert.subject)

    @property
    def cluster_name(self) -> str:
        return cluster_name_of(self.tls_cert)

    @property
    def username(self) -> str:
        return self.tls_identity.username

    @property
    def roles(self) -> tuple[str, ...]:
        return self.tls_identity.groups

    @property
    def principals(self) -> tuple[str, ...]:
        return tuple(p.decode() for p in self.ssh_certificate.valid_principals)

    @property
    def not_before(self) -> datetime:
        return self.tls_cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.tls_cert.not_valid_after_utc

    def is_valid_at(self, now: datetime) -> bool:
        """True when ``now`` is within the TLS certificate's validity window."""
        return self.not_before <= now < self.not_after

    def validate(self) -> None:
        """Check the invariants tbot checks on load; raise IdentityError on the first failure."""
        cert = self.ssh_certificate
        if not isinstance(cert, ssh.SSHCertificate):
            raise IdentityError("SSH certificate artifact holds a plain key, not a certificate")
        if not cert.valid_principals or any(not p for p in cert.valid_principals):
            raise IdentityError("SSH certificate has no principals or an empty principal")
        if not self.cluster_name:
            raise IdentityError("TLS certificate issuer has no Organization (cluster name)")
        public = self.private_key.public_key()
        tls_public = self.tls_cert.public_key()
        ssh_public = cert.public_key()
        if not isinstance(tls_public, keys.PublicKey) or not keys.same_public_key(
            public, tls_public
        ):
            raise IdentityError("private key does not match the TLS certificate")
        if not isinstance(ssh_public, keys.PublicKey) or not keys.same_public_key(
            public, ssh_public
        ):
            raise IdentityError("private key does not match the SSH certificate")
        for pem in self.tls_ca_pems:
            try:
                x509.load_pem_x509_certificate(pem)
            except ValueError:
                raise IdentityError("a TLS CA certificate is not valid PEM") from None

    def to_bot_artifacts(self, token_hash: str) -> dict[str, bytes]:
        """The bot-internal storage files (tbot's ``BotKinds``), in a safe write order.

        Certificates go before the key so that a reader pairing files by name
        sees the new key only once its certificates are in place.
        """
        return {
            ARTIFACT_TLS_CAS: _CA_SEPARATOR.join(self.tls_ca_pems),
            ARTIFACT_SSH_CAS: _CA_SEPARATOR.join(self.ssh_ca_lines),
            ARTIFACT_TOKEN_HASH: token_hash.encode(),
            ARTIFACT_TLS_CERT: self.tls_cert_pem,
            ARTIFACT_SSH_CERT: self.ssh_cert,
            ARTIFACT_PUBLIC_KEY: self.public_ssh_key,
            ARTIFACT_KEY: self.private_key_pem,
        }

    @classmethod
    def from_bot_artifacts(cls, files: dict[str, bytes | None]) -> tuple[Identity, str] | None:
        """Load a stored bot identity and its token hash.

        Returns None when any required file is missing or empty (nothing stored
        yet); raises IdentityError when the files exist but do not form a valid
        identity.
        """
        required = (ARTIFACT_KEY, ARTIFACT_SSH_CERT, ARTIFACT_TLS_CERT, ARTIFACT_TLS_CAS)
        if any(not files.get(name) for name in required):
            return None

        def ca_list(name: str) -> tuple[bytes, ...]:
            raw = files.get(name) or b""
            return tuple(part for part in raw.split(_CA_SEPARATOR) if part.strip())

        identity = cls(
            private_key_pem=files[ARTIFACT_KEY] or b"",
            ssh_cert=files[ARTIFACT_SSH_CERT] or b"",
            tls_cert_pem=files[ARTIFACT_TLS_CERT] or b"",
            tls_ca_pems=ca_list(ARTIFACT_TLS_CAS),
            ssh_ca_lines=ca_list(ARTIFACT_SSH_CAS),
        )
        identity.validate()
        try:
            token_hash = (files.get(ARTIFACT_TOKEN_HASH) or b"").decode("ascii").strip()
        except UnicodeDecodeError:
            raise IdentityError(f"{ARTIFACT_TOKEN_HASH} is not a hex digest") from None
        return identity, token_hash
