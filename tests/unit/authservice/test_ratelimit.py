"""Join attempts are limited per source address; renewals never are."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tbot_py.authservice import audit
from tbot_py.authservice.errors import BadParameter
from tbot_py.authservice.ratelimit import (
    DEFAULT_JOIN_RATE,
    Rate,
    RateLimited,
    SourceRateLimiter,
    TokenBucket,
    parse_rate,
    source_key,
)
from tbot_py.authservice.server import RunningAuthService, start_in_thread
from tbot_py.bot.schedule import ErrorKind, classify
from tbot_py.client import wire
from tbot_py.client.http import AuthClient as DaemonClient
from tbot_py.errors import LimitExceeded
from tbot_py.identity import keys

from .conftest import AuthClient, Issued, public_keys

TWO_PER_MINUTE = Rate(count=2, period_s=60.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def service(tmp_path: Path) -> Iterator[RunningAuthService]:
    """Overrides conftest's service: joins limited to 2 per minute per source."""
    with start_in_thread(tmp_path / "auth", join_rate=TWO_PER_MINUTE) as running:
        yield running


def join_attempt(client: AuthClient, token: str, path: str = wire.PATH_JOIN) -> httpx.Response:
    req = wire.RegisterUsingTokenRequest(token=token, keys=public_keys(keys.generate_private_key()))
    return client.request("POST", path, json=req.to_json())


# -- pure parts -----------------------------------------------------------------------


def test_bucket_allows_a_burst_then_refuses_until_a_token_is_back() -> None:
    bucket = TokenBucket.full(TWO_PER_MINUTE, now=0.0)
    bucket, wait = bucket.take(TWO_PER_MINUTE, now=0.0)
    assert wait == 0.0
    bucket, wait = bucket.take(TWO_PER_MINUTE, now=1.0)
    assert wait == 0.0
    bucket, wait = bucket.take(TWO_PER_MINUTE, now=2.0)
    assert wait == pytest.approx(28.0)  # one token per 30 s; 2 s of it have passed
    bucket, wait = bucket.take(TWO_PER_MINUTE, now=29.0)
    assert wait == pytest.approx(1.0)  # a refused attempt spent nothing
    _, wait = bucket.take(TWO_PER_MINUTE, now=30.0)
    assert wait == 0.0


def test_bucket_never_holds_more_than_the_burst_and_ignores_a_clock_going_back() -> None:
    bucket = TokenBucket.full(TWO_PER_MINUTE, now=0.0)
    bucket, _ = bucket.take(TWO_PER_MINUTE, now=3600.0)
    assert bucket.tokens == 1.0
    bucket, _ = bucket.take(TWO_PER_MINUTE, now=3600.0)
    _, wait = bucket.take(TWO_PER_MINUTE, now=10.0)
    assert wait == pytest.approx(30.0)


def test_limiter_refuses_the_attempt_after_the_burst_with_whole_seconds_to_wait() -> None:
    clock = FakeClock()
    limiter = SourceRateLimiter(DEFAULT_JOIN_RATE, clock=clock)
    for _ in range(10):
        limiter.check("192.0.2.1")
    with pytest.raises(RateLimited) as refused:
        limiter.check("192.0.2.1")
    assert refused.value.status == 429
    assert refused.value.retry_after_s == 6
    assert refused.value.message == "too many join attempts from 192.0.2.1; retry in 6 s"
    limiter.check("192.0.2.2")  # another source has its own bucket
    clock.now += 5.5
    with pytest.raises(RateLimited) as refused:
        limiter.check("192.0.2.1")
    assert refused.value.retry_after_s == 1  # 0.5 s rounds up, never to 0
    clock.now += 0.5
    limiter.check("192.0.2.1")


def test_ipv6_sources_share_a_bucket_per_64_and_mapped_ipv4_is_ipv4() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2")
    assert source_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key(None) == "unknown"
    limiter = SourceRateLimiter(TWO_PER_MINUTE, clock=FakeClock())
    limiter.check("2001:db8::1")
    limiter.check("2001:db8::2")
    with pytest.raises(RateLimited, match=r"from 2001:db8::3;"):
        limiter.check("2001:db8::3")


def test_limiter_keeps_at_most_max_sources_dropping_the_least_recently_used() -> None:
    clock = FakeClock()
    limiter = SourceRateLimiter(Rate(count=1, period_s=3600.0), max_sources=3, clock=clock)
    for i in range(3):
        limiter.check(f"192.0.2.{i}")
    with pytest.raises(RateLimited):
        limiter.check("192.0.2.0")  # 192.0.2.0 is now the most recently used
    limiter.check("192.0.2.9")  # evicts 192.0.2.1, the least recently used
    assert len(limiter) == 3
    limiter.check("192.0.2.1")  # forgotten, so a fresh bucket: allowed
    with pytest.raises(RateLimited):
        limiter.check("192.0.2.0")  # still tracked, still empty
    for i in range(20_000):
        limiter.check(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(limiter) == 3


def test_default_limiter_is_bounded_at_ten_thousand_sources() -> None:
    limiter = SourceRateLimiter(clock=FakeClock())
    for i in range(10_050):
        limiter.check(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 10_000


@pytest.mark.parametrize(
    ("text", "rate"),
    [("10/m", Rate(10, 60.0)), ("5/s", Rate(5, 1.0)), (" 100 / h ", Rate(100, 3600.0))],
)
def test_parse_rate_accepts_count_per_unit(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate
    assert str(rate) in {"10/m", "5/s", "100/h"}


@pytest.mark.parametrize("text", ["", "10", "0/m", "-1/m", "10/d", "ten/m", "1.5/s", "10/m/s"])
def test_parse_rate_rejects_anything_else_naming_the_flag(text: str) -> None:
    with pytest.raises(BadParameter, match=r"invalid --join-rate .*e\.g\. 10/m"):
        parse_rate(text)


# -- over HTTP ------------------------------------------------------------------------


def test_third_join_in_a_burst_of_two_gets_429_with_retry_after(
    client: AuthClient, bot_token: str
) -> None:
    assert join_attempt(client, "0" * 32).status_code == 403
    assert join_attempt(client, "1" * 32, path="/webapi/host/credentials").status_code == 403
    refused = join_attempt(client, bot_token)  # even a valid token waits its turn
    assert refused.status_code == 429
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 30
    assert refused.json() == {
        "error": {"message": f"too many join attempts from 127.0.0.1; retry in {retry_after} s"}
    }
    assert join_attempt(client, bot_token, path="/webapi/host/credentials").status_code == 429
    assert client.cluster.storage.tokens.count("ci") == 1  # the token was never looked at


def test_a_refused_join_is_audited_as_a_denial(client: AuthClient) -> None:
    for _ in range(3):
        last = join_attempt(client, "0" * 32)
    lines = audit.audit_log_path(client.cluster.data_dir).read_text().splitlines()
    joins = [json.loads(line) for line in lines if '"bot.join"' in line]
    assert [j["code"] for j in joins] == [403, 403, 429]
    refused = joins[-1]
    assert refused["success"] is False
    assert refused["message"] == last.json()["error"]["message"]
    assert refused["remote_addr"] == "127.0.0.1"
    assert refused["actor"] == {}
    assert "resource" not in refused  # refused before the body was even read


def test_renewals_issuance_and_ca_fetches_are_never_limited(
    client: AuthClient, joined: Issued
) -> None:
    for _ in range(2):
        join_attempt(client, "0" * 32)
    assert join_attempt(client, "0" * 32).status_code == 429
    identity = joined
    for _ in range(5):
        identity = client.renewed(identity)
        resp, _ = client.impersonate(identity)
        assert resp.status_code == 200, resp.text
        assert client.request("GET", wire.PATH_CAS, identity=identity).status_code == 200
    assert identity.identity.generation == 6


def test_daemon_client_sees_limit_exceeded_with_retry_after_and_retries_it(
    client: AuthClient,
) -> None:
    for _ in range(2):
        join_attempt(client, "0" * 32)
    req = wire.RegisterUsingTokenRequest(
        token="0" * 32, keys=public_keys(keys.generate_private_key())
    )

    async def attempt() -> None:
        async with DaemonClient(client.service.addr, client.context()) as daemon:
            await daemon.register_using_token(req)

    with pytest.raises(LimitExceeded) as refused:
        asyncio.run(attempt())
    assert refused.value.status == 429
    text = str(refused.value)
    assert "too many join attempts from 127.0.0.1" in text
    assert "(Retry-After: " in text and text.endswith("s)")
    assert "0" * 32 not in text
    assert classify(refused.value) is ErrorKind.RETRY
