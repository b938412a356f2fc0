"""When to renew and when to retry: small pure functions over an injected ``now``.

Nothing here sleeps, reads a clock or draws a random number; the daemon passes ``now`` and the
random draws in, so every schedule is reproducible in a test. Renewal times are wall-clock
deadlines computed from the *issued* validity (never from the requested TTL), so a CA that
clamps the TTL, or a host that was suspended, cannot make the daemon renew too late.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from tbot_py.errors import (
    AccessDenied,
    BadParameter,
    ConfigError,
    ConnectionProblem,
    DestinationError,
    Error,
    IdentityError,
    LimitExceeded,
    NotFound,
    ProtocolError,
    ServerError,
    TrustError,
)

__all__ = [
    "JITTER_FRACTION",
    "MIN_SPACING",
    "Backoff",
    "ErrorKind",
    "classify",
    "first_renewal",
    "next_renewal",
    "retry_time",
]

MIN_SPACING: timedelta = timedelta(seconds=10)  # never renew the same credential twice within this
JITTER_FRACTION = 0.1  # renewals spread over +-10 % of the delay
_REMAINING_FRACTION = 3  # renew while at least 1/3 of the lifetime remains
_RETRY_MARGIN = timedelta(seconds=1)


def next_renewal(
    *,
    now: datetime,
    not_before: datetime,
    not_after: datetime,
    renewal_interval: timedelta,
    jitter: float,
    min_spacing: timedelta = MIN_SPACING,
    started: datetime | None = None,
) -> datetime:
    """When to renew a credential just issued (or loaded), computed from the *issued* validity.

    The base time is ``started + renewal_interval`` (as in tbot), but never later than the
    deadline ``not_after - lifetime/3``. ``started`` is when the run that got the credential
    began (``now`` if not given): counting from it, like tbot's fixed ticker, keeps a slow
    answer from shifting the schedule, so renewals that a busy server answered all at once
    (a backlog draining) do not come back together. ``jitter`` in [-1, 1] moves the time by up
    to 10 % of the delay; where that would cross the deadline it moves the other way instead,
    so a fleet whose interval hits the deadline still spreads out. The result is never sooner
    than ``now + min_spacing``, which stops a renew-immediately loop when the CA issues short
    lifetimes, a run takes longer than the interval, or clocks skew.
    """
    if not -1.0 <= jitter <= 1.0:  # also rejects NaN
        raise ValueError(f"jitter must be in [-1, 1], got {jitter!r}")
    begun = now if started is None else min(started, now)
    base, deadline = _base_and_deadline(begun, not_before, not_after, renewal_interval)
    earliest = now + min_spacing
    if base <= now:
        return earliest  # past the deadline (or the run outlasted the interval): soon, no loop
    shift = (base - begun) * (JITTER_FRACTION * jitter)
    when = base + shift
    if when > deadline:
        when = base - abs(shift)
    return max(when, earliest)


def first_renewal(
    *,
    now: datetime,
    not_before: datetime,
    not_after: datetime,
    renewal_interval: timedelta,
    rand: float,
    min_spacing: timedelta = MIN_SPACING,
) -> datetime:
    """When to renew first after the daemon started, or after a run of failures ended.

    Uniform over the whole delay: from ``now + min_spacing`` to the base time of
    ``next_renewal`` (``now + renewal_interval``, never past the 1/3-lifetime deadline), with
    ``rand`` drawn by the caller from [0, 1). Later renewals go back to ``next_renewal``.

    Why: daemons restarted together (a config push, a reboot, an upgrade) or back from the
    same outage renew together, and +-10 % jitter takes many cycles to undo that. tbot renews
    at start, then on a fixed ticker without jitter (``RunOnInterval`` in
    lib/tbot/internal/loop.go), so its herd never spreads. SPIRE agents rotate at half-life
    +-10 % (pkg/common/rotationutil); Vault's ``LifetimeWatcher`` sleeps 2/3 of the lease
    plus a third of a random 10-20 % grace (api/lifetime_watcher.go): jitter of 10 % of the
    delay or less, which undoes a herd as slowly as ours. A delay uniform over one whole
    interval makes the renewal's phase within the interval uniform whatever the start times
    were, so one cycle after a restart the load is flat, and later +-10 % jitter keeps it
    flat. A narrower window (the second half of the interval, say) would leave part of each
    interval empty and the rest up to twice as busy. The cost: on average half a renewal
    more per start or recovery.
    """
    if not 0.0 <= rand < 1.0:  # also rejects NaN
        raise ValueError(f"rand must be in [0, 1), got {rand!r}")
    base, _ = _base_and_deadline(now, not_before, not_after, renewal_interval)
    earliest = now + min_spacing
    if base <= earliest:
        return earliest  # no room to spread: as next_renewal, never sooner than min_spacing
    return earliest + (base - earliest) * rand


def _base_and_deadline(
    begun: datetime, not_before: datetime, not_after: datetime, renewal_interval: timedelta
) -> tuple[datetime, datetime]:
    """``(begun + renewal_interval, but never past the deadline; the deadline)``."""
    lifetime = max(not_after - not_before, timedelta(0))
    deadline = not_after - lifetime / _REMAINING_FRACTION
    return min(begun + renewal_interval, deadline), deadline


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter, an immutable value (like urllib3's Retry).

    ``increment()`` after a failure and ``reset()`` after a success return new values; the
    ``n``-th consecutive failure waits a uniform time in ``[0, min(cap, base * 2**(n-1)))``.
    """

    base: timedelta = timedelta(seconds=1)
    cap: timedelta = timedelta(minutes=5)
    failures: int = 0

    def __post_init__(self) -> None:
        if self.base <= timedelta(0) or self.cap < self.base:
            raise ValueError(f"need 0 < base <= cap, got base={self.base} cap={self.cap}")
        if self.failures < 0:
            raise ValueError(f"failures must not be negative, got {self.failures}")

    def increment(self) -> Backoff:
        """One more consecutive failure."""
        return replace(self, failures=self.failures + 1)

    def reset(self) -> Backoff:
        """No failures: the state after a success."""
        return replace(self, failures=0)

    def ceiling(self) -> timedelta:
        """The longest delay for the current failure count: ``min(cap, base * 2**(failures-1))``."""
        if self.failures == 0:
            return timedelta(0)
        # Compare exponents rather than multiply, so a long outage cannot overflow timedelta.
        doublings = math.log2(self.cap / self.base)
        if self.failures - 1 >= doublings:
            return self.cap
        return self.base * (1 << (self.failures - 1))

    def delay(self, rand: float) -> timedelta:
        """Full jitter: ``rand * ceiling()``, with ``rand`` drawn by the caller from [0, 1)."""
        if not 0.0 <= rand < 1.0:  # also rejects NaN
            raise ValueError(f"rand must be in [0, 1), got {rand!r}")
        return self.ceiling() * rand


class ErrorKind(enum.Enum):
    """What the daemon should do after a failed renewal."""

    RETRY = "retry"  # back off and try again; the credential may still be valid
    REJOIN = "rejoin"  # the presented credential is no longer accepted: join again if possible
    FATAL = "fatal"  # retrying cannot help: report it and stop


_RETRYABLE: tuple[type[Error], ...] = (
    ConnectionProblem,
    ServerError,
    LimitExceeded,
    ProtocolError,  # e.g. a proxy's HTML error page
    TrustError,  # e.g. a transient TLS failure
    DestinationError,  # e.g. a full disk, which can clear
    IdentityError,  # a malformed certificate received from the server
)
_FATAL: tuple[type[Error], ...] = (BadParameter, ConfigError, NotFound)
_VALIDITY_WORDS = ("expired", "not yet valid")


def classify(exc: BaseException) -> ErrorKind:
    """Sort a renewal failure into retry, re-join or fatal (see ``ErrorKind``).

    Only errors known to be permanent are fatal. Anything else, including an unexpected
    exception from a bug, is retried: the daemon must not give up while credentials are valid.
    ``AccessDenied`` means re-join when it says the presented certificate expired or is not yet
    valid, and fatal otherwise (a bad token, a deleted or locked bot). A ``BaseException`` that
    is not an ``Exception`` (cancellation, KeyboardInterrupt, SystemExit) is fatal: it is a
    request to stop, not a failure to retry.
    """
    if isinstance(exc, AccessDenied):
        message = exc.message.lower()
        if any(word in message for word in _VALIDITY_WORDS):
            return ErrorKind.REJOIN
        return ErrorKind.FATAL
    if isinstance(exc, _FATAL):
        return ErrorKind.FATAL
    if isinstance(exc, _RETRYABLE):
        return ErrorKind.RETRY
    if not isinstance(exc, Exception):
        return ErrorKind.FATAL
    return ErrorKind.RETRY


def retry_time(
    *, now: datetime, backoff: Backoff, rand: float, not_after: datetime | None
) -> datetime:
    """When to retry after a failure: ``now + backoff.delay(rand)``, but before ``not_after``.

    A retry that would land after the credential expires is pulled to
    ``max(now + 1s, not_after - 1s)``, so the last attempt is made while it is still valid.
    """
    when = now + backoff.delay(rand)
    if not_after is not None and when > not_after:
        when = max(now + _RETRY_MARGIN, not_after - _RETRY_MARGIN)
    return when
