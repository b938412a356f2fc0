"""The direct SSH certificate encoder against cryptography's builder, byte for byte."""

from __future__ import annotations

import base64
import struct
from unittest import mock

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import ssh

from tbot_py.authservice import _sshcert
from tbot_py.identity import keys

NONCE = bytes(range(32))
SERIAL = 0xFEDCBA9876543210
EXTENSIONS = {
    b"permit-pty": b"",
    b"teleport-roles": b'{"roles":["access"]}',
    b"bot-name@goteleport.com": b"ci",
    b"generation": b"3",
}
PRINCIPALS = [b"root", b"-teleport-internal-join"]


def _signed_part(line: bytes) -> bytes:
    """The bytes a certificate's signature covers: everything before the signature field."""
    blob = base64.b64decode(line.split(b" ")[1])
    pos = 0

    def skip_string() -> None:
        nonlocal pos
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        pos += 4 + length

    for _ in range(4):  # type, nonce, curve, public point
        skip_string()
    pos += 8 + 4  # serial, type
    skip_string()  # key id
    skip_string()  # principals
    pos += 8 + 8  # valid after, valid before
    for _ in range(4):  # critical options, extensions, reserved, signature key
        skip_string()
    return blob[:pos]


def _parse(line: bytes) -> ssh.SSHCertificate:
    cert = ssh.load_ssh_public_identity(line)
    assert isinstance(cert, ssh.SSHCertificate)
    return cert


def _ours(ca_key: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey) -> bytes:
    return _sshcert.sign_user_certificate(
        ca_key,
        public,
        serial=SERIAL,
        key_id=b"bot-ci",
        principals=PRINCIPALS,
        valid_after=1_900_000_000,
        valid_before=1_900_003_600,
        extensions=EXTENSIONS,
        nonce=NONCE,
    )


def _builders(ca_key: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey) -> bytes:
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(public)
        .serial(SERIAL)
        .type(ssh.SSHCertificateType.USER)
        .key_id(b"bot-ci")
        .valid_principals(PRINCIPALS)
        .valid_after(1_900_000_000)
        .valid_before(1_900_003_600)
    )
    for name, value in EXTENSIONS.items():
        builder = builder.add_extension(name, value)
    with mock.patch("os.urandom", return_value=NONCE):
        return builder.sign(ca_key).public_bytes()


def test_certificate_is_byte_for_byte_what_cryptographys_builder_signs() -> None:
    ca_key, public = keys.generate_private_key(), keys.generate_private_key().public_key()
    ours, theirs = _ours(ca_key, public), _builders(ca_key, public)
    assert ours.split(b" ")[0] == theirs.split(b" ")[0] == _sshcert.CERT_KEY_TYPE
    # ECDSA signatures are randomised; everything they cover must be identical.
    assert _signed_part(ours) == _signed_part(theirs)


def test_certificate_parses_verifies_and_carries_every_field() -> None:
    ca_key, public = keys.generate_private_key(), keys.generate_private_key().public_key()
    for _ in range(20):  # both signature halves with and without a leading zero byte
        cert = _parse(_ours(ca_key, public))
        cert.verify_cert_signature()
    assert keys.same_public_key(cert.signature_key(), ca_key.public_key())  # type: ignore[arg-type]
    assert keys.same_public_key(cert.public_key(), public)  # type: ignore[arg-type]
    assert cert.nonce == NONCE and cert.serial == SERIAL
    assert cert.type == ssh.SSHCertificateType.USER and cert.key_id == b"bot-ci"
    assert cert.valid_principals == PRINCIPALS
    assert (cert.valid_after, cert.valid_before) == (1_900_000_000, 1_900_003_600)
    assert cert.critical_options == {} and cert.extensions == EXTENSIONS


def test_a_fresh_nonce_per_certificate_by_default() -> None:
    ca_key, public = keys.generate_private_key(), keys.generate_private_key().public_key()
    args = {"serial": 1, "key_id": b"k", "valid_after": 0, "valid_before": 1, "extensions": {}}
    lines = [
        _sshcert.sign_user_certificate(ca_key, public, principals=[b"p"], **args)  # type: ignore[arg-type]
        for _ in range(3)
    ]
    assert len({_parse(line).nonce for line in lines}) == 3


def test_mpints_are_minimal_with_a_zero_byte_before_a_set_top_bit() -> None:
    assert _sshcert._mpint(0) == b"\0\0\0\0"
    assert _sshcert._mpint(0x7F) == b"\0\0\0\x01\x7f"
    assert _sshcert._mpint(0x80) == b"\0\0\0\x02\x00\x80"
    assert _sshcert._mpint(0x0100) == b"\0\0\0\x02\x01\x00"


def test_refuses_keys_other_than_p256_and_certificates_without_principals() -> None:
    ca_key = keys.generate_private_key()
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    args = {"serial": 1, "key_id": b"k", "valid_after": 0, "valid_before": 1, "extensions": {}}
    with pytest.raises(ValueError, match="P-256"):
        _sshcert.sign_user_certificate(ca_key, p384, principals=[b"p"], **args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="principal"):
        _sshcert.sign_user_certificate(ca_key, ca_key.public_key(), principals=[], **args)  # type: ignore[arg-type]
