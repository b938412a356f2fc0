"""Workload identity: the SPIFFE CA, the JWT signing keys, and the SVIDs they issue.

Pure code, like :mod:`.ca`: keys and ``now`` come from the caller.

* The SPIFFE CA is an ECDSA P-256 CA whose trust domain is the cluster name; its
  certificate carries the URI SAN ``spiffe://<cluster>`` and is the trust bundle.
  An X.509 SVID carries its SPIFFE ID as its only URI SAN (SPIFFE X509-SVID §2).
* JWT-SVIDs are ES256 compact JWS (RFC 7515) written here with ``cryptography``;
  the public keys are published as a JWKS (RFC 7517), each with a ``kid`` that is its
  RFC 7638 thumbprint, so the ``kid`` is stable across restarts and a second key
  can be listed next to the first during a rotation.
* The OpenID discovery document points a third party at that JWKS, so it can verify
  a JWT-SVID from ``/.well-known/openid-configuration`` alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tbot_py.authservice import ca
from tbot_py.authservice.errors import BadParameter
from tbot_py.identity import keys

SPIFFE_CA_TYPE = "spiffe"
JWT_ALGORITHM = "ES256"
#: SVIDs are short-lived: one hour at most, and never past the bot's own certificate.
MAX_SVID_TTL_S = 3600

# SPIFFE ID path: segments of letters, digits, '.', '-', '_'; no empty, '.' or '..' segment.
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_PATH = 2048


@dataclass(frozen=True)
class WorkloadKeys:
    """The cluster's SPIFFE CA and its JWT signing keys (the first one signs)."""

    trust_domain: str
    spiffe: ca.Authority
    jwt_keys: tuple[keys.PrivateKey, ...]

    @property
    def signing_key(self) -> keys.PrivateKey:
        """The JWT key that signs new JWT-SVIDs."""
        return self.jwt_keys[0]

    @cached_property
    def signing_kid(self) -> str:
        """The ``kid`` of :attr:`signing_key`."""
        return key_id(self.signing_key.public_key())

    @cached_property
    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set published at ``/.well-known/jwks.json``."""
        return {"keys": [public_jwk(key.public_key()) for key in self.jwt_keys]}


def create_workload_keys(trust_domain: str, now: datetime) -> WorkloadKeys:
    """A fresh SPIFFE CA and one JWT signing key for ``trust_domain``."""
    return WorkloadKeys(
        trust_domain=trust_domain,
        spiffe=ca.create_authority(SPIFFE_CA_TYPE, trust_domain, now),
        jwt_keys=(keys.generate_private_key(),),
    )


# --- SPIFFE IDs ----------------------------------------------------------------------------------


def spiffe_id(trust_domain: str, path: str) -> str:
    """``spiffe://<trust_domain><path>``; BadParameter when ``path`` is not a valid ID path."""
    problem = spiffe_path_problem(path)
    if problem:
        raise BadParameter(problem)
    return f"spiffe://{trust_domain}{path}"


def spiffe_path_problem(path: str) -> str | None:
    """Why ``path`` is not a SPIFFE ID path (``/svc/foo``), or None."""
    if not path.startswith("/") or path == "/":
        return f"invalid SPIFFE ID path {path!r}: it must start with '/' and name something"
    if len(path) > _MAX_PATH:
        return f"invalid SPIFFE ID path: longer than {_MAX_PATH} characters"
    for segment in path[1:].split("/"):
        if segment in ("", ".", "..") or not _SEGMENT_RE.match(segment):
            return (
                f"invalid SPIFFE ID path {path!r}: segments use letters, digits, '.', '-', '_' "
                "and are not empty, '.' or '..'"
            )
    return None


# --- X.509 SVIDs ---------------------------------------------------------------------------------


def issue_x509_svid(
    workload: WorkloadKeys,
    public_key: keys.PublicKey,
    *,
    svid_id: str,
    now: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """An X.509 SVID for ``svid_id`` (a full ``spiffe://`` ID), signed by the SPIFFE CA."""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, workload.trust_domain)])
    return ca.sign_leaf(
        workload.spiffe,
        subject,
        public_key,
        not_after=not_after,
        now=now,
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        sans=(x509.UniformResourceIdentifier(svid_id),),
    )


# --- JWT-SVIDs -----------------------------------------------------------------------------------


def key_id(public_key: keys.PublicKey) -> str:
    """The RFC 7638 JWK thumbprint of ``public_key``, base64url: the key's ``kid``."""
    jwk = _ec_jwk_members(public_key)
    canonical = json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


def public_jwk(public_key: keys.PublicKey) -> dict[str, str]:
    """``public_key`` as a JWK for ES256 signature verification."""
    return {
        **_ec_jwk_members(public_key),
        "kid": key_id(public_key),
        "alg": JWT_ALGORITHM,
        "use": "sig",
    }


def openid_configuration(issuer: str) -> dict[str, Any]:
    """The OpenID Provider metadata of ``issuer`` (OIDC Discovery 1.0 §3)."""
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [JWT_ALGORITHM],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "jti"],
    }


def issue_jwt_svid(
    workload: WorkloadKeys,
    *,
    issuer: str,
    svid_id: str,
    audiences: Sequence[str],
    now: datetime,
    expires: datetime,
) -> str:
    """A JWT-SVID for ``svid_id`` and ``audiences``, signed with the current JWT key."""
    if not audiences or any(not audience for audience in audiences):
        raise BadParameter("a JWT-SVID needs at least one non-empty audience")
    claims = {
        "iss": issuer,
        "sub": svid_id,
        "aud": list(audiences),
        "iat": int(now.timestamp()),
        "exp": int(expires.timestamp()),
        "jti": uuid.uuid4().hex,
    }
    return sign_jwt(workload.signing_key, claims)


def sign_jwt(key: keys.PrivateKey, claims: Mapping[str, Any]) -> str:
    """``claims`` as an ES256 compact JWS whose header names the key's ``kid``."""
    header = {"alg": JWT_ALGORITHM, "kid": key_id(key.public_key()), "typ": "JWT"}
    signing_input = f"{_b64url(_json(header))}.{_b64url(_json(claims))}".encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    # JWS ES256 signatures are R || S, 32 bytes each (RFC 7518 §3.4), not DER.
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input.decode()}.{_b64url(signature)}"


def _ec_jwk_members(public_key: keys.PublicKey) -> dict[str, str]:
    numbers = public_key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }


def _json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
