"""The templated X.509 leaf encoder against cryptography's builder, byte for byte."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tbot_py.authservice import _x509leaf, ca
from tbot_py.identity import keys

NOW = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture(scope="module")
def user_ca() -> ca.Authority:
    return ca.create_authority("user", "example.com", NOW - timedelta(days=1))


def _subject(size: int) -> x509.Name:
    """A Teleport-like subject whose encoding grows with ``size`` (long-form DER lengths)."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "bot-ci"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "access"),
            x509.NameAttribute(NameOID.POSTAL_CODE, '{"logins":["' + "r" * size + '"]}'),
            x509.NameAttribute(x509.ObjectIdentifier("1.3.9999.2.20"), "ci"),
        ]
    )


def _both(
    authority: ca.Authority, subject: x509.Name, serial: int, not_after: datetime
) -> tuple[x509.Certificate, x509.Certificate]:
    """Ours and the builder's certificate for the same inputs."""
    public = keys.generate_private_key().public_key()
    ours = authority.identity_leaf.sign(
        authority.key,
        subject=subject,
        public_key=public,
        serial=serial,
        not_before=NOW - ca.CLOCK_SKEW,
        not_after=not_after,
    )
    builders = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(authority.cert.subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(NOW - ca.CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(ca.IDENTITY_USAGES)), critical=False)
        .add_extension(authority.authority_key_identifier, critical=False)
        .sign(authority.key, ca.hashes.SHA256())
    )
    return x509.load_der_x509_certificate(ours), builders


@pytest.mark.parametrize(
    ("serial", "size", "not_after"),
    [
        (1, 0, NOW + timedelta(hours=1)),
        (0x7F, 100, NOW + timedelta(hours=1)),  # subject just over 127 bytes
        (0x80, 300, NOW + timedelta(hours=1)),  # serial needs a zero byte; 2-byte lengths
        (2**127 + 12345, 5, datetime(2050, 1, 1, tzinfo=UTC)),  # GeneralizedTime from 2050
        (2**128 - 1, 5, datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)),  # last UTCTime
    ],
)
def test_signed_bytes_are_exactly_what_cryptographys_builder_signs(
    user_ca: ca.Authority, serial: int, size: int, not_after: datetime
) -> None:
    ours, theirs = _both(user_ca, _subject(size), serial, not_after)
    # ECDSA signatures are randomised; everything they cover must be identical.
    assert ours.tbs_certificate_bytes == theirs.tbs_certificate_bytes
    assert ours.signature_algorithm_oid == theirs.signature_algorithm_oid
    ours.verify_directly_issued_by(user_ca.cert)
    assert ours.serial_number == serial
    assert ours.not_valid_before_utc == (NOW - ca.CLOCK_SKEW).replace(microsecond=0)
    assert ours.not_valid_after_utc == not_after.replace(microsecond=0)


def test_pem_is_what_cryptography_writes(user_ca: ca.Authority) -> None:
    public = keys.generate_private_key().public_key()
    der = user_ca.identity_leaf.sign(
        user_ca.key,
        subject=_subject(200),
        public_key=public,
        serial=42,
        not_before=NOW,
        not_after=NOW + timedelta(hours=1),
    )
    cert = x509.load_der_x509_certificate(der)
    assert _x509leaf.pem(der) == cert.public_bytes(serialization.Encoding.PEM)


def test_a_sample_with_per_subject_extensions_is_refused(user_ca: ca.Authority) -> None:
    server = ca.issue_server_certificate(
        ca.ClusterCAs("example.com", user_ca, user_ca, user_ca),
        keys.generate_private_key().public_key(),
        hosts=["auth.example.com"],
        now=NOW,
    )
    with pytest.raises(ValueError, match="alternative names"):
        _x509leaf.LeafTemplate(server)


def test_der_lengths_use_the_short_form_below_128_and_the_long_form_above() -> None:
    assert _x509leaf._tlv(0x04, b"x" * 127)[:2] == b"\x04\x7f"
    assert _x509leaf._tlv(0x04, b"x" * 128)[:3] == b"\x04\x81\x80"
    assert _x509leaf._tlv(0x04, b"x" * 256)[:4] == b"\x04\x82\x01\x00"
    assert _x509leaf._integer(0) == b"\x02\x01\x00"
    assert _x509leaf._integer(0x80) == b"\x02\x02\x00\x80"
