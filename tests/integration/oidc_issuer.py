"""A local OIDC issuer for the join tests: its own CA, keys, discovery and JWKS on loopback.

The auth service is a separate process; it reaches this server over real HTTPS and
trusts it through ``SSL_CERT_FILE=<directory>/ca.pem``. Any path prefix is an issuer::

    GET P/.well-known/openid-configuration -> {"issuer": BASE+P, "jwks_uri": BASE+P+JWKS}
    GET P/.well-known/jwks  (JWKS)         -> the published keys (every key ever rotated in)
    GET /gh/token?audience=X               -> a GitHub Actions ID token (needs the runtime bearer)

``hits`` counts requests per path (query string dropped), so tests can prove that the
auth service caches the JWKS, or never fetched it at all (``static_jwks``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.loopback_tls import write_loopback_tls

#: The audience a bot asks for by default: the auth service's default cluster name.
CLUSTER_NAME = "tbot-py.local"
#: The issuer path GitHub Enterprise Server uses (``https://HOST/_services/token``).
GITHUB_ISSUER_PATH = "/_services/token"
GITHUB_TOKEN_PATH = "/gh/token"
_DISCOVERY = "/.well-known/openid-configuration"
_JWKS = "/.well-known/jwks"


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hmac_jwt(body: dict[str, Any], headers: dict[str, str], alg: str, secret: bytes) -> str:
    """A JWT MACed with ``secret`` by hand: PyJWT refuses a PEM key as an HMAC secret."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    header = {"alg": alg, "typ": "JWT", **headers}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
    return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), digest).digest())}"


class LocalOIDCIssuer:
    """An HTTPS OIDC issuer on 127.0.0.1 in a daemon thread; use as a context manager.

    ``mint`` signs with the current key (``rsa-1`` until :meth:`rotate`); ``other_key``
    shares the kid ``rsa-1`` but is never published, for wrong-signature cases.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        files = write_loopback_tls(directory, "local OIDC issuer test CA")
        self.ca_path, self._cert_path, self._key_path = files.ca, files.cert, files.key
        self.hits: Counter[str] = Counter()
        self._last_hit: dict[str, float] = {}  # time.monotonic() of the latest request
        #: What a GitHub runner would get in ACTIONS_ID_TOKEN_REQUEST_TOKEN.
        self.runtime_token = secrets.token_urlsafe(24)
        #: The claims ``/gh/token`` puts in its ID tokens (tests set repository, ref, ...).
        self.github_claims: dict[str, Any] = {}
        #: Every JWT handed out, so tests can assert none of them leaks into output.
        self.minted: list[str] = []
        self._lock = threading.Lock()
        self._published: list[tuple[str, rsa.RSAPrivateKey]] = [("rsa-1", _rsa_key())]
        self.other_key = _rsa_key()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> LocalOIDCIssuer:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self._cert_path, self._key_path)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as a token's ``gitlab.domain`` or GHES host names it."""
        assert self._server is not None, "the issuer is not started"
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def base(self) -> str:
        return f"https://{self.host}"

    def issuer(self, path: str = "") -> str:
        """The issuer URL served under the path prefix ``path``."""
        return self.base + path

    def fetches(self, path: str = "") -> tuple[int, int]:
        """How often (discovery, JWKS) of the issuer at ``path`` were requested."""
        with self._lock:
            return self.hits[path + _DISCOVERY], self.hits[path + _JWKS]

    def seconds_since_jwks_fetch(self, path: str = "") -> float:
        """Seconds since the JWKS of the issuer at ``path`` was last requested (inf: never)."""
        with self._lock:
            last = self._last_hit.get(path + _JWKS)
        return float("inf") if last is None else time.monotonic() - last

    def hits_under(self, path: str) -> int:
        """Requests for any path under the prefix ``path``."""
        with self._lock:
            return sum(n for p, n in self.hits.items() if p.startswith(path + "/"))

    # -- keys ------------------------------------------------------------------------

    def rotate(self) -> str:
        """Publish a new key and sign with it from now on; returns its kid."""
        with self._lock:
            kid = f"rsa-{len(self._published) + 1}"
            self._published.append((kid, _rsa_key()))
            return kid

    def jwks(self) -> dict[str, Any]:
        """The published JWKS (every key, old and current)."""
        with self._lock:
            published = list(self._published)
        keys = []
        for kid, key in published:
            jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": keys}

    def jwks_json(self) -> str:
        """The JWKS as text, for a token resource's inline ``static_jwks``."""
        return json.dumps(self.jwks())

    def mint(
        self,
        claims: dict[str, Any],
        *,
        issuer_path: str = "",
        audience: str | list[str] = CLUSTER_NAME,
        expires_in: int = 300,
        not_before: int | None = None,
        key: Literal["current", "other"] = "current",
        kid: str | None = None,
        alg: str = "RS256",
    ) -> str:
        """A signed JWT: ``iss``/``aud``/``iat``/``exp`` filled in, then ``claims`` on top.

        ``not_before`` is seconds from now for ``nbf``; a claim set to None is dropped
        (e.g. ``{"exp": None}`` for a token without expiry). ``key="other"`` signs with the
        unpublished key under kid ``rsa-1``; ``alg="HS256"`` (384, 512) is the algorithm
        confusion attack: HMAC keyed with the signing key's public PEM.
        """
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer(issuer_path),
            "aud": audience,
            "iat": now,
            "exp": now + expires_in,
        }
        if not_before is not None:
            body["nbf"] = now + not_before
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        with self._lock:
            current_kid, signer = self._published[-1]
        if key == "other":
            current_kid, signer = "rsa-1", self.other_key
        headers = {"kid": kid or current_kid}
        if alg.startswith("HS"):
            # Algorithm confusion: the published public key as an HMAC secret.
            public = signer.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            token = _hmac_jwt(body, headers, alg, public)
        else:
            token = jwt.encode(body, signer, algorithm=alg, headers=headers)
        with self._lock:
            self.minted.append(token)
        return token

    # -- requests (called on the server's threads) -----------------------------------

    def _answer(self, path: str, query: dict[str, list[str]], auth: str) -> tuple[int, Any]:
        with self._lock:
            self.hits[path] += 1
            self._last_hit[path] = time.monotonic()
        if path.endswith(_DISCOVERY):
            prefix = path.removesuffix(_DISCOVERY)
            return 200, {
                "issuer": self.issuer(prefix),
                "jwks_uri": self.issuer(prefix) + _JWKS,
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        if path.endswith(_JWKS):
            return 200, self.jwks()
        if path == GITHUB_TOKEN_PATH:
            if not secrets.compare_digest(auth, f"Bearer {self.runtime_token}"):
                return 401, {"message": "bad credentials"}
            owner = str(self.github_claims.get("repository_owner", ""))
            audience = query.get("audience", [f"https://github.com/{owner}"])[0]
            value = self.mint(
                dict(self.github_claims), issuer_path=GITHUB_ISSUER_PATH, audience=audience
            )
            return 200, {"count": 1, "value": value}
        return 404, {"message": "not found"}


def _handler_for(issuer: LocalOIDCIssuer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            status, doc = issuer._answer(
                url.path, urllib.parse.parse_qs(url.query), self.headers.get("Authorization", "")
            )
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the test output clean; ``hits`` is the record

    return Handler
