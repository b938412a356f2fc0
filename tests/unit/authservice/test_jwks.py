"""The JWKS cache against a real HTTPS issuer on 127.0.0.1 (throwaway CA made here)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tbot_py.authservice.idtoken import IDTokenRejected, UnknownSigningKey
from tbot_py.authservice.join_tokens import JoinToken, join_token_from_data
from tbot_py.authservice.jwks import JWKSCache, JWKSUnavailable, check_id_token, keys_for_token
from tests.loopback_tls import write_loopback_tls

from .test_idtoken import CLUSTER, GENERIC_CLAIMS, jwk, times

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
KEY_1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_2 = ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    client_context: ssl.SSLContext  # trusts only the throwaway CA


def make_tls(directory: Path) -> TLSFiles:
    """A throwaway CA and a server certificate for IP 127.0.0.1 signed by it."""
    files = write_loopback_tls(directory, "jwks test CA")
    client = ssl.create_default_context(cafile=str(files.ca))
    return TLSFiles(files.cert, files.key, client)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls(tmp_path_factory.mktemp("jwks-tls"))


@dataclass
class Clock:
    now: datetime = NOW

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Issuer:
    """An OIDC issuer at ``base`` (https://127.0.0.1:PORT); state the tests change freely."""

    keys: list[dict[str, Any]] = field(default_factory=lambda: [jwk(KEY_1, "k1")])
    discovery_issuer: str | None = None  # default: the real issuer URL
    jwks_uri: str | None = None  # default: BASE/jwks
    jwks_body: bytes | None = None  # default: the keys as JSON
    chunked_body: bytes | None = None  # sent without Content-Length
    redirect: bool = False
    hits: Counter[str] = field(default_factory=Counter)
    base: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        if self.redirect:
            raise web.HTTPFound(self.base + "/elsewhere")
        if request.path == "/.well-known/openid-configuration":
            return web.json_response(
                {
                    "issuer": self.discovery_issuer or self.base,
                    "jwks_uri": self.jwks_uri or self.base + "/jwks",
                }
            )
        if request.path == "/jwks":
            if self.chunked_body is not None:
                response = web.StreamResponse()
                response.enable_chunked_encoding()
                await response.prepare(request)
                for start in range(0, len(self.chunked_body), 64 * 1024):
                    await response.write(self.chunked_body[start : start + 64 * 1024])
                await response.write_eof()
                return response
            body = self.jwks_body or json.dumps({"keys": self.keys}).encode()
            return web.Response(body=body, content_type="application/json")
        raise web.HTTPNotFound()


Scenario = Callable[[Issuer, "web.AppRunner"], Awaitable[None]]


def serve(tls: TLSFiles | None, scenario: Scenario, issuer: Issuer | None = None) -> Issuer:
    """Run ``scenario`` while ``issuer`` serves on 127.0.0.1 (HTTPS unless ``tls`` is None)."""
    issuer = issuer or Issuer()

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", issuer.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        context = None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.cert, tls.key)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        issuer.base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        try:
            await scenario(issuer, runner)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return issuer


def kids(keys: jwt.PyJWKSet) -> list[str | None]:
    return [key.key_id for key in keys.keys]


def test_discovery_and_jwks_are_fetched_once_for_many_calls(tls: TLSFiles) -> None:
    async def scenario(issuer: Issuer, _: web.AppRunner) -> None:
        cache = JWKSCache(ssl_context=tls.client_context, clock=Clock())
        try:
            many = await asyncio.gather(*(cache.keys(issuer.base + "/") for _ in range(20)))
            assert all(kids(keys) == ["k1"] for keys in many)
            assert kids(await cache.keys(issuer.base)) == ["k1"]
            assert cache.fetches == 1
        finally:
            await cache.close()

    issuer = serve(tls, scenario)
    assert issuer.hits == {"/.well-known/openid-configuration": 1, "/jwks": 1}


def test_keys_are_refetched_after_the_ttl(tls: TLSFiles) -> None:
    async def scenario(issuer: Issuer, _: web.AppRunner) -> None:
        clock = Clock()
        cache = JWKSCache(ssl_context=tls.client_context, clock=clock)
        try:
            await cache.keys(issuer.base)
            issuer.keys = [jwk(KEY_2, "k2")]
            clock.advance(minutes=9)
            assert kids(await cache.keys(issuer.base)) == ["k1"]
            clock.advance(minutes=2)
            assert kids(await cache.keys(issuer.base)) == ["k2"]
            assert cache.fetches == 2
        finally:
            await cache.close()

    serve(tls, scenario)


def oidc_token(issuer_url: str) -> JoinToken:
    return join_token_from_data(
        {
            "kind": "token",
            "version": "v2",
            "metadata": {"name": "idp"},
            "spec": {
                "join_method": "generic_oidc",
                "bot_name": "svc",
                "generic_oidc": {
                    "issuer": issuer_url,
                    "insecure_allow_http_issuer": issuer_url.startswith("http:"),
                    "allow": [{"sub": "svc-1"}],
                },
            },
        }
    )


def id_token(issuer_url: str, key: Any, kid: str, algorithm: str) -> str:
    claims = {**GENERIC_CLAIMS, "iss": issuer_url, "aud": CLUSTER, **times()}
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})


def test_unknown_kid_refetches_once_then_verifies(tls: TLSFiles) -> None:
    async def scenario(issuer: Issuer, _: web.AppRunner) -> None:
        clock = Clock()
        cache = JWKSCache(ssl_context=tls.client_context, clock=clock)
        resource = oidc_token(issuer.base)
        try:
            first = id_token(issuer.base, KEY_1, "k1", "RS256")
            check = check_id_token(resource, first, cache, cluster_name=CLUSTER, now=NOW)
            assert (await check).claims == {"sub": "svc-1"}
            issuer.keys = [jwk(KEY_1, "k1"), jwk(KEY_2, "k2")]  # the issuer rotates a key in
            clock.advance(seconds=31)
            rotated = id_token(issuer.base, KEY_2, "k2", "ES256")
            check = check_id_token(resource, rotated, cache, cluster_name=CLUSTER, now=NOW)
            assert (await check).claims == {"sub": "svc-1"}
            assert cache.fetches == 2
            # Known now: no further fetch.
            await check_id_token(resource, rotated, cache, cluster_name=CLUSTER, now=NOW)
            assert cache.fetches == 2
        finally:
            await cache.close()

    issuer = serve(tls, scenario)
    assert issuer.hits["/jwks"] == 2


def test_refetch_for_unknown_kids_is_rate_limited(tls: TLSFiles) -> None:
    async def scenario(issuer: Issuer, _: web.AppRunner) -> None:
        clock = Clock()
        cache = JWKSCache(ssl_context=tls.client_context, clock=clock)
        resource = oidc_token(issuer.base)
        forged = id_token(issuer.base, KEY_2, "made-up", "ES256")
        try:
            await cache.keys(issuer.base)
            for _attempt in range(5):
                with pytest.raises(UnknownSigningKey):
                    await check_id_token(resource, forged, cache, cluster_name=CLUSTER, now=NOW)
            assert cache.fetches == 1
            clock.advance(seconds=31)
            with pytest.raises(UnknownSigningKey):
                await check_id_token(resource, forged, cache, cluster_name=CLUSTER, now=NOW)
            assert cache.fetches == 2
        finally:
            await cache.close()

    serve(tls, scenario)


def unavailable(cache: JWKSCache, url: str, **kwargs: bool) -> Awaitable[str]:
    async def attempt() -> str:
        with pytest.raises(JWKSUnavailable) as caught:
            await cache.keys(url, **kwargs)
        assert caught.value.status == 503
        return caught.value.message

    return attempt()


def test_discovery_naming_another_issuer_is_refused(tls: TLSFiles) -> None:
    async def scenario(issuer: Issuer, _: web.AppRunner) -> None:
        cache = JWKSCache(ssl_context=tls.client_context, clock=Clock())
        try:
            assert await unavailable(cache, issuer.base) == (
                f'could not fetch the signing keys of issuer "{issuer.base}": '
                'the discovery document names issuer "https://evil.example.com"'
            )
        finally:
            await cache.close()

    issuer = serve(tls, scenario, Issuer(discovery_issuer="https://evil.example.com"))
    assert issuer.hits["/jwks"] == 0


def test_http_is_refused_unless_insecure(tls: TLSFiles) -> None:
    async def scenario(issuer: Issuer, _: web.AppRunner) -> None:
        cache = JWKSCache(ssl_context=tls.client_context, clock=Clock())
        try:
            assert await unavailable(cache, issuer.base) == (
                f'could not fetch the signing keys of issuer "{issuer.base}": '
                "the issuer URL must use https"
            )
            assert issuer.hits.total() == 0
            cache = JWKSCache(ssl_context=tls.client_context, clock=Clock())
            assert kids(await cache.keys(issuer.base, insecure_http=True)) == ["k1"]
        finally:
            await cache.close()

    serve(None, scenario)


def test_http_jwks_uri_under_an_https_issuer_is_refused(tls: TLSFiles) -> None:
    async def scenario(issuer: Issuer, _: web.AppRunner) -> None:
        cache = JWKSCache(ssl_context=tls.client_context, clock=Clock())
        try:
            assert (await unavailable(cache, issuer.base)).endswith(": jwks_uri must use https")
        finally:
            await cache.close()

    serve(tls, scenario, Issuer(jwks_uri="http://127.0.0.1:1/jwks"))


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_is_refused(tls: TLSFiles, chunked: bool) -> None:
    big = b'{"keys": [], "pad": "' + b"x" * (1024 * 1024) + b'"}'

    async def scenario(issuer: Issuer, _: web.AppRunner) -> None:
        cache = JWKSCache(ssl_context=tls.client_context, clock=Clock())
        try:
            assert (await unavailable(cache, issuer.base)).endswith(
                ": the JWKS is larger than 1 MiB"
            )
        finally:
            await cache.close()

    state = Issuer(chunked_body=big) if chunked else Issuer(jwks_body=big)
    serve(tls, scenario, state)


def test_redirects_are_not_followed(tls: TLSFiles) -> None:
    async def scenario(issuer: Issuer, _: web.AppRunner) -> None:
        cache = JWKSCache(ssl_context=tls.client_context, clock=Clock())
        try:
            assert (await unavailable(cache, issuer.base)).endswith(
                ": the discovery document request got HTTP 302"
            )
        finally:
            await cache.close()

    issuer = serve(tls, scenario, Issuer(redirect=True))
    assert issuer.hits == {"/.well-known/openid-configuration": 1}


def test_an_untrusted_certificate_is_refused(tls: TLSFiles) -> None:
    async def scenario(issuer: Issuer, _: web.AppRunner) -> None:
        cache = JWKSCache(ssl_context=ssl.create_default_context(), clock=Clock())
        try:
            assert (await unavailable(cache, issuer.base)).endswith(
                ": TLS certificate verification failed"
            )
        finally:
            await cache.close()

    serve(tls, scenario)


def test_server_down_with_a_cached_set_keeps_using_it(
    tls: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(issuer: Issuer, runner: web.AppRunner) -> None:
        clock = Clock()
        cache = JWKSCache(ssl_context=tls.client_context, clock=clock)
        try:
            await cache.keys(issuer.base)
            await runner.cleanup()
            clock.advance(minutes=11)
            with caplog.at_level(logging.WARNING, "tbot_py.authservice"):
                assert kids(await cache.keys(issuer.base)) == ["k1"]
            assert cache.fetches == 2
            [record] = caplog.records
            assert record.getMessage().startswith(
                f'could not refresh the signing keys of issuer "{issuer.base}" (cannot connect'
            )
            # Within min_refresh of the failed attempt: no new attempt.
            assert kids(await cache.keys(issuer.base, refresh=True)) == ["k1"]
            assert cache.fetches == 2
            # After 24 hours the stale set is no longer used.
            clock.advance(hours=24)
            assert "cannot connect to 127.0.0.1:" in await unavailable(cache, issuer.base)
        finally:
            await cache.close()

    serve(tls, scenario)


def test_server_down_without_a_cached_set_is_unavailable(tls: TLSFiles) -> None:
    async def scenario(issuer: Issuer, runner: web.AppRunner) -> None:
        await runner.cleanup()
        clock = Clock()
        cache = JWKSCache(ssl_context=tls.client_context, clock=clock)
        port = issuer.base.rsplit(":", 1)[1]
        resource = oidc_token(issuer.base)
        try:
            with pytest.raises(JWKSUnavailable) as caught:
                await check_id_token(
                    resource,
                    id_token(issuer.base, KEY_1, "k1", "RS256"),
                    cache,
                    cluster_name=CLUSTER,
                    now=NOW,
                )
            assert caught.value.message == (
                f'could not fetch the signing keys of issuer "{issuer.base}": '
                f"cannot connect to 127.0.0.1:{port}"
            )
            assert not isinstance(caught.value, IDTokenRejected)
            await unavailable(cache, issuer.base)  # negative-cached: no second attempt
            assert cache.fetches == 1
            clock.advance(seconds=31)
            await unavailable(cache, issuer.base)
            assert cache.fetches == 2
        finally:
            await cache.close()

    serve(tls, scenario)


def test_static_jwks_are_never_fetched() -> None:
    resource = join_token_from_data(
        {
            "kind": "token",
            "version": "v2",
            "metadata": {"name": "k8s"},
            "spec": {
                "join_method": "kubernetes",
                "bot_name": "kube",
                "kubernetes": {
                    "type": "static_jwks",
                    "static_jwks": {"jwks": json.dumps({"keys": [jwk(KEY_2, "s1")]})},
                    "allow": [{"service_account": "apps:deployer"}],
                },
            },
        }
    )
    claims = {
        "aud": CLUSTER,
        "sub": "system:serviceaccount:apps:deployer",
        **times(),
    }

    async def main() -> None:
        cache = JWKSCache(clock=Clock())
        assert kids(await keys_for_token(resource, cache)) == ["s1"]
        good = jwt.encode(claims, KEY_2, algorithm="ES256", headers={"kid": "s1"})
        attributes = await check_id_token(resource, good, cache, cluster_name=CLUSTER, now=NOW)
        assert attributes.claims == {"service_account": "apps:deployer"}
        unknown = jwt.encode(claims, KEY_2, algorithm="ES256", headers={"kid": "other"})
        with pytest.raises(UnknownSigningKey):
            await check_id_token(resource, unknown, cache, cluster_name=CLUSTER, now=NOW)
        assert cache.fetches == 0
        await cache.close()

    asyncio.run(main())
