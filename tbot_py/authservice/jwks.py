"""Issuers' signing keys (JWKS) for ID token joins: fetched over HTTPS by discovery, cached.

For an issuer ``ISSUER`` the cache reads ``ISSUER/.well-known/openid-configuration``,
checks that it names the same issuer, then reads its ``jwks_uri``. No redirects are
followed, each response is capped at 1 MiB and a whole round has one timeout.
A set is kept for ``ttl``; a refetch within ``min_refresh`` of the last attempt
reuses what is cached, so forged ``kid`` values cannot make the service hammer an
issuer. When a refetch fails, a set fetched in the last 24 hours stays in use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import jwt

from tbot_py.authservice.errors import AuthServiceError
from tbot_py.authservice.idtoken import (
    JoinAttributes,
    UnknownSigningKey,
    expected_issuer,
    issuer_allows_http,
    static_jwks_text,
    verify_id_token,
)
from tbot_py.authservice.join_tokens import JoinToken, parse_jwks

log = logging.getLogger("tbot_py.authservice")

#: Largest discovery document or JWKS read.
MAX_BODY = 1024 * 1024
#: How long a set whose refetch fails stays in use.
MAX_STALE = timedelta(hours=24)
DISCOVERY_PATH = "/.well-known/openid-configuration"


class JWKSUnavailable(AuthServiceError):
    """An issuer's signing keys cannot be fetched and none are cached (HTTP 503)."""

    status = 503


class _FetchFailed(Exception):
    """A fetch round failed; the message is the short reason."""


@dataclass(frozen=True)
class _Cached:
    keys: jwt.PyJWKSet
    fetched_at: datetime


def _utc_now() -> datetime:
    return datetime.now(UTC)


class JWKSCache:
    """Signing keys per issuer, fetched by OIDC discovery and kept for ``ttl``.

    One fetch per issuer runs at a time; concurrent callers share it. ``fetches``
    counts the fetch rounds started (for tests and metrics).
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        ttl: timedelta = timedelta(minutes=10),
        min_refresh: timedelta = timedelta(seconds=30),
        timeout: float = 10.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._ttl = ttl
        self._min_refresh = min_refresh
        self._timeout = timeout
        self._clock = clock
        self._cached: dict[str, _Cached] = {}
        self._last_attempt: dict[str, datetime] = {}
        self._last_failure: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Task[jwt.PyJWKSet]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0

    async def keys(
        self, issuer: str, *, insecure_http: bool = False, refresh: bool = False
    ) -> jwt.PyJWKSet:
        """The signing keys of ``issuer``; ``refresh`` refetches unless fetched within
        ``min_refresh``. Raises JWKSUnavailable when there are none to give.
        """
        issuer = issuer.rstrip("/")
        now = self._clock()
        cached = self._cached.get(issuer)
        last = self._last_attempt.get(issuer)
        recent = last is not None and now - last < self._min_refresh
        usable = cached is not None and now - cached.fetched_at < MAX_STALE
        if cached is not None:
            fresh = now - cached.fetched_at < self._ttl
            if (fresh and not refresh) or (recent and usable):
                return cached.keys
        if recent and not usable and issuer not in self._inflight:
            # The last attempt failed moments ago: do not try again yet.
            raise self._unavailable(issuer, self._last_failure.get(issuer, "fetch failed"))
        task = self._inflight.get(issuer)
        if task is None:
            task = asyncio.create_task(self._fetch_round(issuer, insecure_http))
            self._inflight[issuer] = task
            task.add_done_callback(lambda done: self._fetch_done(issuer, done))
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Close the HTTP session; pending fetches are cancelled."""
        for task in list(self._inflight.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _fetch_done(self, issuer: str, task: asyncio.Task[jwt.PyJWKSet]) -> None:
        if self._inflight.get(issuer) is task:
            del self._inflight[issuer]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every caller went away

    def _unavailable(self, issuer: str, reason: str) -> JWKSUnavailable:
        return JWKSUnavailable(
            f'could not fetch the signing keys of issuer "{issuer[:200]}": {reason}'
        )

    async def _fetch_round(self, issuer: str, insecure_http: bool) -> jwt.PyJWKSet:
        self.fetches += 1
        self._last_attempt[issuer] = self._clock()
        failure: str
        try:
            async with asyncio.timeout(self._timeout):
                keys = await self._fetch(issuer, insecure_http)
        except _FetchFailed as exc:
            failure = str(exc)
        except TimeoutError:
            failure = f"timed out after {self._timeout:g}s"
        else:
            self._cached[issuer] = _Cached(keys, self._clock())
            self._last_failure.pop(issuer, None)
            return keys
        self._last_failure[issuer] = failure
        cached = self._cached.get(issuer)
        if cached is not None and self._clock() - cached.fetched_at < MAX_STALE:
            log.warning(
                'could not refresh the signing keys of issuer "%s" (%s); using the keys '
                "fetched at %s",
                issuer[:200],
                failure,
                cached.fetched_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            return cached.keys
        raise self._unavailable(issuer, failure)

    async def _fetch(self, issuer: str, insecure_http: bool) -> jwt.PyJWKSet:
        _check_scheme(issuer, insecure_http, "the issuer URL")
        discovery = await self._get_json(issuer + DISCOVERY_PATH, "discovery document")
        named = discovery.get("issuer")
        if not isinstance(named, str) or named.rstrip("/") != issuer:
            shown = json.dumps(str(named)[:100]) if named is not None else "no issuer"
            raise _FetchFailed(f"the discovery document names issuer {shown}")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise _FetchFailed("the discovery document has no jwks_uri")
        _check_scheme(jwks_uri, insecure_http, "jwks_uri")
        body = await self._get(jwks_uri, "JWKS")
        try:
            return parse_jwks(body.decode("utf-8", "replace"), what="the JWKS", limit=MAX_BODY)
        except ValueError as exc:
            raise _FetchFailed(str(exc)) from None

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        body = await self._get(url, what)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise _FetchFailed(f"the {what} is not a JSON object")
        return data

    async def _get(self, url: str, what: str) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        failure: str
        try:
            async with self._session.get(
                url,
                allow_redirects=False,
                ssl=self._ssl,
                headers={"Accept": "application/json"},
            ) as response:
                if response.status != 200:
                    raise _FetchFailed(f"the {what} request got HTTP {response.status}")
                if (response.content_length or 0) > MAX_BODY:
                    raise _FetchFailed(f"the {what} is larger than 1 MiB")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise _FetchFailed(f"the {what} is larger than 1 MiB")
                return bytes(body)
        except aiohttp.ClientConnectorCertificateError:
            failure = "TLS certificate verification failed"
        except aiohttp.ClientConnectorError as exc:
            failure = f"cannot connect to {exc.host}:{exc.port}"
        except aiohttp.ClientError as exc:
            failure = f"the {what} request failed ({type(exc).__name__})"
        raise _FetchFailed(failure)


def _check_scheme(url: str, insecure_http: bool, what: str) -> None:
    if url.startswith("https://") or (insecure_http and url.startswith("http://")):
        return
    raise _FetchFailed(f"{what} must use https")


async def keys_for_token(token: JoinToken, cache: JWKSCache) -> jwt.PyJWKSet:
    """The keys that sign ID tokens for ``token``: its ``static_jwks``, else fetched."""
    static = static_jwks_text(token)
    if static:
        return parse_jwks(static)  # checked when the resource was created
    issuer = expected_issuer(token)
    if issuer is None:  # kubernetes static_jwks always carries its keys
        raise JWKSUnavailable(f'join token "{token.name}" names no issuer and holds no keys')
    return await cache.keys(issuer, insecure_http=issuer_allows_http(token))


async def check_id_token(
    token: JoinToken, id_token: str, cache: JWKSCache, *, cluster_name: str, now: datetime
) -> JoinAttributes:
    """Verify ``id_token`` for ``token``; an unknown ``kid`` refetches the keys once.

    Raises IDTokenRejected (403) or JWKSUnavailable (503).
    """
    keys = await keys_for_token(token, cache)
    try:
        return verify_id_token(token, id_token, keys, cluster_name=cluster_name, now=now)
    except UnknownSigningKey:
        issuer = expected_issuer(token)
        if static_jwks_text(token) or issuer is None:
            raise
    keys = await cache.keys(issuer, insecure_http=issuer_allows_http(token), refresh=True)
    return verify_id_token(token, id_token, keys, cluster_name=cluster_name, now=now)
