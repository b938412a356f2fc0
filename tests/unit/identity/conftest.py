"""Real keys and certificates for the artifact tests, made with cryptography."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import ssh
from cryptography.x509.oid import NameOID

from tbot_py.identity import keys


@dataclass(frozen=True)
class Material:
    """One identity's worth of PEM and OpenSSH bytes."""

    private_key_pem: bytes
    ssh_cert: bytes  # authorized_keys line, newline-terminated
    tls_cert_pem: bytes
    tls_ca_pem: bytes
    host_ca_key_line: bytes  # authorized_keys line of the SSH host CA


def _self_signed(key: keys.PrivateKey, cn: str, org: str, *, ca: bool) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _ssh_user_cert(key: keys.PrivateKey, ca: keys.PrivateKey) -> bytes:
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    cert = (
        ssh.SSHCertificateBuilder()
        .public_key(key.public_key())
        .serial(1)
        .type(ssh.SSHCertificateType.USER)
        .key_id(b"bot-ci")
        .valid_principals([b"root", b"-teleport-internal-join"])
        .valid_after(now - 60)
        .valid_before(now + 3600)
        .add_extension(b"permit-pty", b"")
        .sign(ca)
    )
    return cert.public_bytes() + b"\n"


def make_material() -> Material:
    """A fresh, internally consistent set of credentials."""
    key = keys.generate_private_key()
    user_ca = keys.generate_private_key()
    host_ca = keys.generate_private_key()
    tls_ca = keys.generate_private_key()
    return Material(
        private_key_pem=keys.private_key_pem(key),
        ssh_cert=_ssh_user_cert(key, user_ca),
        tls_cert_pem=_self_signed(key, "bot-ci", "bot-ci", ca=False),
        tls_ca_pem=_self_signed(tls_ca, "example.com", "example.com", ca=True),
        host_ca_key_line=keys.ssh_public_key_line(host_ca.public_key()),
    )


@pytest.fixture(scope="session")
def material() -> Material:
    return make_material()


@pytest.fixture(scope="session")
def other_material() -> Material:
    return make_material()
