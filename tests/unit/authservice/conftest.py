"""A real auth service on 127.0.0.1 (own thread, tmp data dir) and helpers to talk to it."""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tbot_py.authservice import admin
from tbot_py.authservice.cluster import Cluster
from tbot_py.authservice.server import RunningAuthService, start_in_thread
from tbot_py.client import wire
from tbot_py.identity import keys
from tbot_py.identity.tlsid import TLSIdentity
from tests.unit.conftest import create_login_roles


@dataclass(frozen=True)
class Issued:
    """An identity the service issued: the key we generated and what came back."""

    key: keys.PrivateKey
    certs: wire.Certs
    key_path: Path
    cert_path: Path

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certs.tls)

    @property
    def identity(self) -> TLSIdentity:
        return TLSIdentity.from_subject(self.cert.subject)


def lock_id_in(message: str) -> str:
    """The id of the lock a 403 message names."""
    found = re.search(r"\(lock ([0-9a-f-]{36})\)", message)
    assert found is not None, message
    return found.group(1)


def theft_denial(message: str, *, bot: str, instance: str, stored: int, presented: int) -> str:
    """The 403 of an instance locked on a generation mismatch; the lock id is from ``message``."""
    lock = lock_id_in(message)
    return (
        f"bot instance {bot}/{instance} is locked: certificate generation mismatch "
        f"(stored={stored}, presented={presented}): possible stolen credentials (lock {lock}); "
        f"give the bot a new token with tbot-py auth bots instances add {bot} and keep the lock"
    )


def public_keys(key: keys.PrivateKey) -> wire.PublicKeys:
    return wire.PublicKeys(
        tls=keys.public_key_pem(key.public_key()), ssh=keys.ssh_public_key_line(key.public_key())
    )


class AuthClient:
    """httpx against the running service, trusting exactly what a bot would trust."""

    def __init__(self, service: RunningAuthService, tmp: Path) -> None:
        self.service = service
        self.cluster: Cluster = service.cluster
        self.tmp = tmp
        self._count = 0

    def context(self, identity: Issued | None = None) -> ssl.SSLContext:
        # Trust both cluster CAs, as the daemon does with tls_ca_certs.
        cadata = b"".join(self.cluster.cas.tls_ca_certs).decode()
        ctx = ssl.create_default_context(cadata=cadata)
        if identity is not None:
            ctx.load_cert_chain(identity.cert_path, identity.key_path)
        return ctx

    def request(
        self, method: str, path: str, *, identity: Issued | None = None, **kwargs: object
    ) -> httpx.Response:
        with httpx.Client(
            verify=self.context(identity), base_url=f"https://{self.service.addr}"
        ) as client:
            return client.request(method, path, **kwargs)  # type: ignore[arg-type]

    def save(self, key: keys.PrivateKey, certs: wire.Certs) -> Issued:
        self._count += 1
        key_path = self.tmp / f"id{self._count}.key"
        cert_path = self.tmp / f"id{self._count}.crt"
        key_path.write_bytes(keys.private_key_pem(key))
        cert_path.write_bytes(certs.tls)
        return Issued(key=key, certs=certs, key_path=key_path, cert_path=cert_path)

    def join(self, token: str, *, expires: datetime | None = None) -> Issued:
        key = keys.generate_private_key()
        req = wire.RegisterUsingTokenRequest(token=token, keys=public_keys(key), expires=expires)
        resp = self.request("POST", wire.PATH_JOIN, json=req.to_json())
        assert resp.status_code == 200, resp.text
        return self.save(key, wire.Certs.from_json(resp.json()))

    def renew(
        self,
        identity: Issued,
        *,
        expires: datetime | None = None,
        key: keys.PrivateKey | None = None,
    ) -> tuple[httpx.Response, keys.PrivateKey]:
        """Renew as ``identity`` for ``key`` (a new one by default)."""
        key = key or keys.generate_private_key()
        req = wire.RenewRequest(keys=public_keys(key), expires=expires)
        resp = self.request("POST", wire.PATH_RENEW, identity=identity, json=req.to_json())
        return resp, key

    def renewed(self, identity: Issued) -> Issued:
        resp, key = self.renew(identity)
        assert resp.status_code == 200, resp.text
        return self.save(key, wire.Certs.from_json(resp.json()))

    def impersonate(
        self, identity: Issued, **fields: object
    ) -> tuple[httpx.Response, keys.PrivateKey]:
        key = keys.generate_private_key()
        req = wire.ImpersonateRequest(keys=public_keys(key), **fields)  # type: ignore[arg-type]
        resp = self.request("POST", wire.PATH_CERTS, identity=identity, json=req.to_json())
        return resp, key


@pytest.fixture
def service(tmp_path: Path) -> Iterator[RunningAuthService]:
    with start_in_thread(tmp_path / "auth") as running:
        yield running


@pytest.fixture
def client(service: RunningAuthService, tmp_path: Path) -> AuthClient:
    return AuthClient(service, tmp_path)


@pytest.fixture
def bot_token(client: AuthClient) -> str:
    """A join token for bot "ci" with roles access,dev and login root."""
    create_login_roles(client.cluster, "dev")
    created = admin.add_bot(client.cluster, "ci", roles=("access", "dev"), logins=("root",))
    return created.token.token


@pytest.fixture
def joined(client: AuthClient, bot_token: str) -> Issued:
    return client.join(bot_token)


class ShiftedClock:
    """The server's clock: real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture
def clock() -> ShiftedClock:
    return ShiftedClock()


@pytest.fixture
def clocked_client(tmp_path: Path, clock: ShiftedClock) -> Iterator[AuthClient]:
    with start_in_thread(tmp_path / "auth-clocked", clock=clock) as running:
        yield AuthClient(running, tmp_path)
