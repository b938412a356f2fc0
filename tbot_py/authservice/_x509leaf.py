"""X.509 leaf certificates from a template: the constant parts encoded once, signed once.

``cryptography``'s ``CertificateBuilder`` builds and encodes every part of a certificate
on each call, the issuer and the extensions included: about two thirds of the cost of an
identity's X.509 certificate, the signature being the rest. A :class:`LeafTemplate` takes
the parts every leaf of one CA repeats (version, signature algorithm, issuer, extensions)
byte for byte from one certificate the builder signed, and for each leaf encodes only
what changes (serial, validity, subject, public key) before signing once. For the same
inputs the signed bytes are exactly the builder's (``test_x509leaf.py`` checks it).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

_SEQUENCE = 0x30
_INTEGER = 0x02
_BIT_STRING = 0x03
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_VERSION_TAG = 0xA0  # [0] EXPLICIT
_EXTENSIONS_TAG = 0xA3  # [3] EXPLICIT
#: Extensions that describe the subject: a template would hand every leaf the sample's.
_PER_SUBJECT = (ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length (short or long form), content."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def _integer(value: int) -> bytes:
    """A non-negative DER INTEGER: minimal, with a zero byte first when the top bit is set."""
    return _tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _time(t: datetime) -> bytes:
    """RFC 5280 validity time: UTCTime through 2049, GeneralizedTime after; whole seconds."""
    t = t.astimezone(UTC)
    if t.year < 2050:
        return _tlv(_UTC_TIME, t.strftime("%y%m%d%H%M%SZ").encode())
    return _tlv(_GENERALIZED_TIME, t.strftime("%Y%m%d%H%M%SZ").encode())


def _elements(sequence: bytes) -> list[bytes]:
    """The elements of one DER SEQUENCE, each with its own tag and length."""
    if sequence[0] != _SEQUENCE:
        raise ValueError("not a DER SEQUENCE")
    out = []
    pos = _content_start(sequence, 0)
    while pos < len(sequence):
        start = pos
        pos = _content_start(sequence, pos)
        pos += _content_length(sequence, start)
        out.append(sequence[start:pos])
    return out


def _content_start(der: bytes, pos: int) -> int:
    first = der[pos + 1]
    return pos + 2 + (first & 0x7F if first & 0x80 else 0)


def _content_length(der: bytes, pos: int) -> int:
    first = der[pos + 1]
    if not first & 0x80:
        return first
    return int.from_bytes(der[pos + 2 : pos + 2 + (first & 0x7F)], "big")


class LeafTemplate:
    """The parts of a CA's ECDSA P-256 leaves that never change, taken from ``sample``.

    ``sample`` is any leaf the CA signed with ``CertificateBuilder`` with the extensions
    every leaf carries; its serial, validity, subject and key are replaced in each leaf.
    Extensions that describe the subject (key identifier, alternative names) cannot be
    templated and are refused.
    """

    def __init__(self, sample: x509.Certificate) -> None:
        if sample.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
            raise ValueError("a leaf template needs an ECDSA with SHA-256 certificate")
        if any(ext.oid in _PER_SUBJECT for ext in sample.extensions):
            raise ValueError("subject key identifiers and alternative names cannot be templated")
        parts = _elements(sample.tbs_certificate_bytes)
        if len(parts) != 8 or parts[0][0] != _VERSION_TAG or parts[7][0] != _EXTENSIONS_TAG:
            raise ValueError("a leaf template needs a v3 certificate with extensions")
        self._version, _, self._algorithm, self._issuer, _, _, _, self._extensions = parts

    def sign(
        self,
        ca_key: ec.EllipticCurvePrivateKey,
        *,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        serial: int,
        not_before: datetime,
        not_after: datetime,
    ) -> bytes:
        """The DER certificate for ``public_key`` and ``subject``, signed by ``ca_key``."""
        spki = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        tbs = _tlv(
            _SEQUENCE,
            b"".join(
                (
                    self._version,
                    _integer(serial),
                    self._algorithm,
                    self._issuer,
                    _tlv(_SEQUENCE, _time(not_before) + _time(not_after)),
                    subject.public_bytes(),
                    spki,
                    self._extensions,
                )
            ),
        )
        signature = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        return _tlv(_SEQUENCE, tbs + self._algorithm + _tlv(_BIT_STRING, b"\0" + signature))


def pem(der: bytes) -> bytes:
    """``der`` as a PEM ``CERTIFICATE``: base64 in lines of 64, as ``cryptography`` writes it."""
    text = base64.b64encode(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"
