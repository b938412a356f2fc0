"""Abuse limits for the unauthenticated join endpoint: a token bucket per source address.

Joins carry no client certificate, so the join token is the only secret an
attacker can guess; each source may try ``Rate.count`` times per period, in a
burst of at most that many. Only joins are limited: renewals are authenticated
by the bot's certificate and must never be turned away.

The source is the TCP peer address (``request.remote``), never a forwarded-for
header, which the caller controls. IPv6 sources are grouped by /64, the block
one host usually gets, so an attacker cannot escape the limit by rotating
addresses within it. At most ``MAX_TRACKED_SOURCES`` buckets are kept (least
recently used first out); a forgotten bucket was most likely full again anyway.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tbot_py.authservice.errors import BadParameter, LimitExceeded

MAX_TRACKED_SOURCES = 10_000

#: Seconds on a monotonic clock; tests pass their own.
MonotonicClock = Callable[[], float]

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d{1,9})\s*/\s*([smh])\s*$")


@dataclass(frozen=True)
class Rate:
    """``count`` attempts per ``period_s`` seconds, in bursts of at most ``count``."""

    count: int
    period_s: float

    @property
    def per_second(self) -> float:
        """How fast a bucket refills."""
        return self.count / self.period_s

    def __str__(self) -> str:
        for unit, seconds in _PERIODS.items():
            if seconds == self.period_s:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.period_s:g}s"


DEFAULT_JOIN_RATE = Rate(count=10, period_s=60.0)


def parse_rate(text: str, *, what: str = "--join-rate") -> Rate:
    """Parse ``COUNT/UNIT`` with UNIT ``s``, ``m`` or ``h`` (``10/m``); BadParameter otherwise."""
    match = _RATE_RE.match(text)
    if not match or int(match.group(1)) < 1:
        raise BadParameter(
            f"invalid {what} {text!r}: use COUNT/UNIT with COUNT at least 1 and UNIT s, m or h, "
            "e.g. 10/m"
        )
    return Rate(count=int(match.group(1)), period_s=_PERIODS[match.group(2)])


@dataclass(frozen=True)
class TokenBucket:
    """An immutable token bucket: ``tokens`` left at monotonic time ``updated``."""

    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: Rate, now: float) -> TokenBucket:
        """A bucket for a source not seen before."""
        return cls(tokens=float(rate.count), updated=now)

    def take(self, rate: Rate, now: float) -> tuple[TokenBucket, float]:
        """Spend one token at ``now``: the new bucket, and 0.0 or the seconds until one is back.

        A refused attempt spends nothing, so a flood does not push the next
        allowed attempt further away.
        """
        elapsed = max(0.0, now - self.updated)  # a clock that steps back refills nothing
        tokens = min(float(rate.count), self.tokens + elapsed * rate.per_second)
        if tokens >= 1.0:
            return TokenBucket(tokens=tokens - 1.0, updated=now), 0.0
        return TokenBucket(tokens=tokens, updated=now), (1.0 - tokens) / rate.per_second


class RateLimited(LimitExceeded):
    """Too many join attempts from one source (HTTP 429, with ``Retry-After``)."""

    def __init__(self, source: str, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"too many join attempts from {source}; retry in {retry_after_s} s")


def source_key(remote: str | None) -> str:
    """The bucket a peer address counts against: the IPv4 address or the IPv6 /64."""
    if not remote:
        return "unknown"
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class SourceRateLimiter:
    """Token buckets keyed by :func:`source_key`, at most ``max_sources`` of them.

    Used from the server's event loop only; ``check`` never awaits, so it needs no lock.
    """

    def __init__(
        self,
        rate: Rate = DEFAULT_JOIN_RATE,
        *,
        max_sources: int = MAX_TRACKED_SOURCES,
        clock: MonotonicClock = time.monotonic,
    ) -> None:
        self.rate = rate
        self.max_sources = max_sources
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, remote: str | None) -> None:
        """Count one attempt from ``remote``; raise RateLimited when its bucket is empty."""
        now = self._clock()
        key = source_key(remote)
        bucket = self._buckets.pop(key, None) or TokenBucket.full(self.rate, now)
        bucket, wait_s = bucket.take(self.rate, now)
        self._buckets[key] = bucket  # (re)inserted last: the most recently used
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        if wait_s > 0:
            raise RateLimited(remote or "unknown", max(1, math.ceil(wait_s)))
