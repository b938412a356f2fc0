"""The ``workload-identity-x509`` and ``workload-identity-jwt`` output services.

Per cycle (tbot.md §2.3, §4) the x509 output generates a fresh key, has the cluster's
SPIFFE CA sign an X.509 SVID for the selected ``workload_identity`` resource and writes
``svid.pem``, ``svid_key.pem`` and ``svid_bundle.pem`` (spiffe-helper's names, as tbot).
The jwt output has the cluster sign a JWT-SVID for its audiences and writes ``jwt_svid``.
Each answer is checked before anything is written.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tbot_py.client import wire
from tbot_py.errors import IdentityError
from tbot_py.identity import keys
from tbot_py.services.base import (
    BotContext,
    CertValidity,
    DestinationOutput,
    GenerateResult,
    write_output,
)

log = logging.getLogger("tbot_py.services.workload_identity")

#: tbot's artifact names (tbot.md §4).
ARTIFACT_SVID = "svid.pem"
ARTIFACT_SVID_KEY = "svid_key.pem"
ARTIFACT_SVID_BUNDLE = "svid_bundle.pem"
ARTIFACT_JWT_SVID = "jwt_svid"


@dataclass(frozen=True)
class X509SVIDOutputSettings:
    """The parts of a ``workload-identity-x509`` service's config this service acts on."""

    name: str
    selector: wire.WorkloadIdentitySelector
    ttl: timedelta


@dataclass(frozen=True)
class JWTSVIDOutputSettings:
    """The parts of a ``workload-identity-jwt`` service's config this service acts on."""

    name: str
    selector: wire.WorkloadIdentitySelector
    audiences: tuple[str, ...]
    ttl: timedelta


def describe_selector(selector: wire.WorkloadIdentitySelector) -> str:
    """``name=foo`` or ``labels=k=v,...``: for log lines."""
    if selector.name:
        return f"name={selector.name}"
    return "labels=" + ",".join(f"{k}={v}" for k, v in sorted(selector.labels.items()))


def check_x509_svid(
    answer: wire.X509SVIDResponse, key: keys.PrivateKey
) -> tuple[x509.Certificate, CertValidity]:
    """The SVID must parse, carry the SPIFFE ID as URI SAN and certify ``key``."""
    if not answer.spiffe_id.startswith("spiffe://"):
        raise IdentityError("the server sent an SVID without a spiffe:// ID")
    try:
        cert = x509.load_pem_x509_certificate(answer.svid)
    except ValueError:
        raise IdentityError("the X.509 SVID from the server does not parse") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("the X.509 SVID from the server has no URI SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [answer.spiffe_id]:
        raise IdentityError("the X.509 SVID from the server does not name its SPIFFE ID")
    certified = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if certified != keys.spki_der(key.public_key()):
        raise IdentityError("the X.509 SVID from the server is for another key")
    try:
        bundle = x509.load_pem_x509_certificates(answer.bundle)
    except ValueError:
        raise IdentityError("the SPIFFE trust bundle from the server does not parse") from None
    if not bundle:
        raise IdentityError("the server sent an empty SPIFFE trust bundle")
    validity = CertValidity(
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc
    )
    return cert, validity


def check_jwt_svid(answer: wire.JWTSVIDResponse, audiences: tuple[str, ...]) -> CertValidity:
    """The JWT must be compact (3 parts) with ``sub``, ``aud`` and ``exp`` as asked.

    The signature is the workload's to verify (against the JWKS); here we only make sure
    we do not write something that is not a JWT-SVID for our audiences.
    """
    parts = answer.jwt.split(".")
    if len(parts) != 3 or not all(parts):
        raise IdentityError("the JWT-SVID from the server is not a compact JWT")
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, UnicodeDecodeError):
        raise IdentityError("the JWT-SVID from the server has unreadable claims") from None
    if not isinstance(claims, dict):
        raise IdentityError("the JWT-SVID from the server has unreadable claims")
    if claims.get("sub") != answer.spiffe_id or not answer.spiffe_id.startswith("spiffe://"):
        raise IdentityError("the JWT-SVID from the server does not name its SPIFFE ID")
    aud = claims.get("aud")
    got = {aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else set()
    if got != set(audiences):
        raise IdentityError("the JWT-SVID from the server has other audiences")
    exp, iat = claims.get("exp"), claims.get("iat", claims.get("nbf"))
    if not isinstance(exp, int | float) or not isinstance(iat, int | float):
        raise IdentityError("the JWT-SVID from the server has no exp or iat")
    return CertValidity(
        not_before=datetime.fromtimestamp(iat, UTC), not_after=datetime.fromtimestamp(exp, UTC)
    )


class WorkloadIdentityX509Service(DestinationOutput[X509SVIDOutputSettings]):
    """Writes tbot's ``workload-identity-x509`` artifacts to one destination."""

    async def generate(self, bot: BotContext) -> GenerateResult:
        """Have a fresh key's SVID signed and write the SVID, key and bundle."""
        key = keys.generate_private_key()
        answer = await bot.client.issue_x509_svid(
            wire.X509SVIDRequest(
                selector=self.settings.selector,
                public_key=keys.public_key_pem(key.public_key()),
                expires=bot.clock() + self.settings.ttl,
            )
        )
        _, validity = check_x509_svid(answer, key)
        files = {
            ARTIFACT_SVID: answer.svid.strip() + b"\n",
            ARTIFACT_SVID_KEY: keys.private_key_pem(key),
            ARTIFACT_SVID_BUNDLE: answer.bundle.strip() + b"\n",
        }
        return await write_output(
            self.name,
            self.destination,
            files,
            validity,
            what=f"X.509 SVID {answer.spiffe_id} for {describe_selector(self.settings.selector)}",
            log=log,
        )


class WorkloadIdentityJWTService(DestinationOutput[JWTSVIDOutputSettings]):
    """Writes tbot's ``workload-identity-jwt`` artifact to one destination."""

    async def generate(self, bot: BotContext) -> GenerateResult:
        """Have a JWT-SVID signed for the audiences and write it."""
        answer = await bot.client.issue_jwt_svid(
            wire.JWTSVIDRequest(
                selector=self.settings.selector,
                audiences=self.settings.audiences,
                expires=bot.clock() + self.settings.ttl,
            )
        )
        validity = check_jwt_svid(answer, self.settings.audiences)
        files = {ARTIFACT_JWT_SVID: answer.jwt.encode()}
        audiences = ",".join(self.settings.audiences)
        return await write_output(
            self.name,
            self.destination,
            files,
            validity,
            what=f"JWT-SVID {answer.spiffe_id} for {describe_selector(self.settings.selector)}, "
            f"audiences {audiences}",
            log=log,
        )
