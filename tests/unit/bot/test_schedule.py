"""Renewal schedule, backoff and error classification: pure functions, fixed clock, seeded draws."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest

from tbot_py import errors
from tbot_py.bot.oneshot import OutputsFailed
from tbot_py.bot.schedule import (
    MIN_SPACING,
    Backoff,
    ErrorKind,
    classify,
    first_renewal,
    next_renewal,
    retry_time,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
SEC = timedelta(seconds=1)
ALMOST_ONE = 0.999_999_999


def renewal(
    *,
    ttl: timedelta,
    interval: timedelta,
    jitter: float,
    issued_ago: timedelta = timedelta(0),
    now: datetime = NOW,
) -> datetime:
    not_before = now - issued_ago
    return next_renewal(
        now=now,
        not_before=not_before,
        not_after=not_before + ttl,
        renewal_interval=interval,
        jitter=jitter,
    )


# (ttl, interval, issued_ago): the base delay and the deadline both follow from these.
CASES = [
    pytest.param(60 * MIN, 20 * MIN, timedelta(0), id="tbot-defaults"),
    pytest.param(60 * MIN, 39 * MIN, timedelta(0), id="interval-just-under-deadline"),
    pytest.param(60 * MIN, 50 * MIN, timedelta(0), id="interval-past-two-thirds"),
    pytest.param(20 * MIN, 60 * MIN, timedelta(0), id="ttl-shorter-than-interval"),
    pytest.param(24 * 60 * MIN, 20 * MIN, timedelta(0), id="long-ttl"),
    pytest.param(60 * MIN, 20 * MIN, 30 * MIN, id="loaded-half-way"),
    pytest.param(60 * MIN, 20 * MIN, 39 * MIN, id="loaded-just-before-deadline"),
    pytest.param(90 * SEC, 20 * MIN, timedelta(0), id="short-ttl"),
    pytest.param(12 * SEC, 20 * MIN, timedelta(0), id="deadline-inside-min-spacing"),
    pytest.param(5 * SEC, 20 * MIN, timedelta(0), id="lifetime-shorter-than-min-spacing"),
]


@pytest.mark.parametrize(("ttl", "interval", "issued_ago"), CASES)
def test_renewal_stays_within_jitter_of_base_before_deadline_and_after_min_spacing(
    ttl: timedelta, interval: timedelta, issued_ago: timedelta
) -> None:
    rng = random.Random(20260501)
    not_before = NOW - issued_ago
    deadline = not_before + ttl - ttl / 3
    base = min(NOW + interval, deadline)
    delay = base - NOW
    earliest = NOW + MIN_SPACING
    seen = set()
    for _ in range(2000):
        when = renewal(ttl=ttl, interval=interval, jitter=rng.uniform(-1, 1), issued_ago=issued_ago)
        seen.add(when)
        assert when >= earliest
        if deadline >= earliest:
            assert when <= deadline
            assert abs(when - base) <= delay * 0.1 + timedelta(microseconds=1)
        else:
            assert when == earliest
    if deadline - delay * 0.1 > earliest:
        assert len(seen) > 1000  # jitter spreads renewals even when the deadline caps them


def test_renewal_at_base_interval_without_jitter() -> None:
    assert renewal(ttl=60 * MIN, interval=20 * MIN, jitter=0.0) == NOW + 20 * MIN


def test_extreme_jitter_moves_renewal_by_ten_percent() -> None:
    assert renewal(ttl=60 * MIN, interval=20 * MIN, jitter=1.0) == NOW + 22 * MIN
    assert renewal(ttl=60 * MIN, interval=20 * MIN, jitter=-1.0) == NOW + 18 * MIN


def test_one_third_of_lifetime_remains_when_interval_exceeds_two_thirds() -> None:
    deadline = NOW + 40 * MIN  # 60m lifetime, renew with 20m (1/3) left
    assert renewal(ttl=60 * MIN, interval=50 * MIN, jitter=0.0) == deadline
    assert renewal(ttl=60 * MIN, interval=50 * MIN, jitter=-1.0) == deadline - 4 * MIN
    # Positive jitter would cross the deadline, so it moves the other way instead.
    assert renewal(ttl=60 * MIN, interval=50 * MIN, jitter=0.5) == deadline - 2 * MIN


def test_one_third_rule_uses_issued_validity_not_interval_for_clamped_ttl() -> None:
    # Asked for 1h, the CA issued 15m: renew after 10m, not after the 20m interval.
    assert renewal(ttl=15 * MIN, interval=20 * MIN, jitter=0.0) == NOW + 10 * MIN


def test_lifetime_shorter_than_min_spacing_waits_min_spacing() -> None:
    assert renewal(ttl=3 * SEC, interval=20 * MIN, jitter=-1.0) == NOW + MIN_SPACING
    assert renewal(ttl=3 * SEC, interval=20 * MIN, jitter=1.0) == NOW + MIN_SPACING


def test_already_expired_credential_renews_after_min_spacing() -> None:
    when = renewal(ttl=60 * MIN, interval=20 * MIN, jitter=1.0, issued_ago=3 * 60 * MIN)
    assert when == NOW + MIN_SPACING


def test_credential_past_its_deadline_renews_after_min_spacing() -> None:
    when = renewal(ttl=60 * MIN, interval=20 * MIN, jitter=0.3, issued_ago=45 * MIN)
    assert when == NOW + MIN_SPACING


def test_custom_min_spacing_is_honoured() -> None:
    when = next_renewal(
        now=NOW,
        not_before=NOW - 2 * 60 * MIN,
        not_after=NOW - 60 * MIN,
        renewal_interval=20 * MIN,
        jitter=0.0,
        min_spacing=MIN,
    )
    assert when == NOW + MIN


def test_inverted_validity_does_not_push_renewal_past_not_after() -> None:
    when = next_renewal(
        now=NOW,
        not_before=NOW + 60 * MIN,
        not_after=NOW + 30 * MIN,
        renewal_interval=60 * MIN,
        jitter=1.0,
    )
    assert NOW + MIN_SPACING <= when <= NOW + 30 * MIN


@pytest.mark.parametrize("jitter", [-1.01, 1.01, float("nan")])
def test_jitter_outside_unit_range_is_rejected(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        renewal(ttl=60 * MIN, interval=20 * MIN, jitter=jitter)


def test_chained_renewals_do_not_accumulate_jitter() -> None:
    rng = random.Random(7)
    now = NOW
    ttl, interval = 60 * MIN, 20 * MIN
    periods = []
    for _ in range(1000):
        # Each renewal issues a fresh credential at "now" and schedules the next from it.
        when = next_renewal(
            now=now,
            not_before=now,
            not_after=now + ttl,
            renewal_interval=interval,
            jitter=rng.uniform(-1, 1),
        )
        periods.append(when - now)
        now = when
    mean = sum(periods, timedelta(0)) / len(periods)
    assert abs(mean - interval) <= interval * 0.01
    assert all(interval * 0.9 <= p <= interval * 1.1 for p in periods)
    assert now - NOW == sum(periods, timedelta(0))


def test_renewal_counts_from_the_start_of_a_slow_run_not_its_end() -> None:
    """A renewal answered late (a server draining a backlog) keeps its place in the schedule."""
    started = NOW - 30 * SEC
    when = next_renewal(
        now=NOW,
        not_before=NOW,
        not_after=NOW + 60 * MIN,
        renewal_interval=20 * MIN,
        jitter=0.0,
        started=started,
    )
    assert when == started + 20 * MIN


def test_run_longer_than_the_interval_still_waits_min_spacing() -> None:
    when = next_renewal(
        now=NOW,
        not_before=NOW,
        not_after=NOW + 60 * MIN,
        renewal_interval=20 * MIN,
        jitter=-1.0,
        started=NOW - 25 * MIN,
    )
    assert when == NOW + MIN_SPACING


def test_start_after_now_as_with_a_clock_step_counts_from_now() -> None:
    when = next_renewal(
        now=NOW,
        not_before=NOW,
        not_after=NOW + 60 * MIN,
        renewal_interval=20 * MIN,
        jitter=0.0,
        started=NOW + 5 * MIN,
    )
    assert when == NOW + 20 * MIN


# -- the first renewal after a start or a recovery -------------------------------------------


def first(
    *, ttl: timedelta, interval: timedelta, rand: float, issued_ago: timedelta = timedelta(0)
) -> datetime:
    not_before = NOW - issued_ago
    return first_renewal(
        now=NOW,
        not_before=not_before,
        not_after=not_before + ttl,
        renewal_interval=interval,
        rand=rand,
    )


@pytest.mark.parametrize(("ttl", "interval", "issued_ago"), CASES)
def test_first_renewal_spreads_from_min_spacing_to_base_never_past_deadline(
    ttl: timedelta, interval: timedelta, issued_ago: timedelta
) -> None:
    deadline = NOW - issued_ago + ttl - ttl / 3
    base = min(NOW + interval, deadline)
    earliest = NOW + MIN_SPACING
    rng = random.Random(20260502)
    seen = {first(ttl=ttl, interval=interval, rand=0.0, issued_ago=issued_ago)}
    for _ in range(2000):
        seen.add(first(ttl=ttl, interval=interval, rand=rng.random(), issued_ago=issued_ago))
    if base > earliest:
        assert min(seen) == earliest
        assert earliest < max(seen) <= base <= deadline
        assert first(ttl=ttl, interval=interval, rand=0.5, issued_ago=issued_ago) == (
            earliest + (base - earliest) / 2
        )
        assert len(seen) > 1000
    else:
        assert seen == {earliest}


def test_first_renewal_with_tbot_defaults_lands_anywhere_in_the_interval() -> None:
    assert first(ttl=60 * MIN, interval=20 * MIN, rand=0.0) == NOW + MIN_SPACING
    latest = first(ttl=60 * MIN, interval=20 * MIN, rand=ALMOST_ONE)
    assert NOW + 20 * MIN - SEC < latest < NOW + 20 * MIN


@pytest.mark.parametrize("rand", [-0.01, 1.0, float("nan")])
def test_first_renewal_rejects_a_draw_outside_zero_one(rand: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        first(ttl=60 * MIN, interval=20 * MIN, rand=rand)


def _phase_peak_to_mean(times: list[datetime], interval: timedelta, buckets: int) -> float:
    """Busiest / mean bucket of the times' phases within ``interval``: 1.0 is perfectly flat."""
    width = interval / buckets
    counts = [0] * buckets
    for t in times:
        counts[int(((t - NOW) % interval) / width)] += 1
    return max(counts) / (len(times) / buckets)


def test_a_fleet_restarted_at_once_renews_evenly_from_the_first_cycle_on() -> None:
    """10,000 daemons restarted within one minute: flat load from the next cycle, and it stays."""
    rng = random.Random(11)
    ttl, interval = 60 * MIN, 20 * MIN
    starts = [NOW + MIN * rng.random() for _ in range(10_000)]
    spread = [
        first_renewal(
            now=t, not_before=t, not_after=t + ttl, renewal_interval=interval, rand=rng.random()
        )
        for t in starts
    ]
    herd = [
        next_renewal(
            now=t,
            not_before=t,
            not_after=t + ttl,
            renewal_interval=interval,
            jitter=rng.uniform(-1, 1),
        )
        for t in starts
    ]
    assert _phase_peak_to_mean(herd, interval, 20) > 4  # +-10 % alone: still a herd
    assert _phase_peak_to_mean(spread, interval, 20) < 1.15
    later = spread
    for _ in range(3):  # and the +-10 % jitter of the renewals after it keeps it flat
        later = [
            next_renewal(
                now=t, not_before=t, not_after=t + ttl, renewal_interval=interval,
                jitter=rng.uniform(-1, 1),
            )
            for t in later
        ]  # fmt: skip
    assert _phase_peak_to_mean(later, interval, 20) < 1.15


# -- Backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_from_one_second_up_to_five_minute_cap() -> None:
    backoff = Backoff()
    delays = []
    for _ in range(12):
        backoff = backoff.increment()
        delays.append(backoff.delay(ALMOST_ONE).total_seconds())
    expected = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert delays == pytest.approx(expected, rel=1e-6)


def test_backoff_without_failures_does_not_wait() -> None:
    assert Backoff().delay(ALMOST_ONE) == timedelta(0)
    assert Backoff(failures=5).reset().delay(ALMOST_ONE) == timedelta(0)


def test_backoff_is_an_immutable_value() -> None:
    first = Backoff()
    second = first.increment()
    assert (first.failures, second.failures) == (0, 1)
    assert second.reset() == first
    with pytest.raises(AttributeError):
        second.failures = 3  # type: ignore[misc]


def test_backoff_full_jitter_stays_within_zero_and_ceiling() -> None:
    rng = random.Random(3)
    for failures in (1, 4, 9, 30):
        backoff = Backoff(failures=failures)
        ceiling = backoff.ceiling()
        draws = [backoff.delay(rng.random()) for _ in range(2000)]
        assert all(timedelta(0) <= d < ceiling for d in draws)
        assert min(draws) < ceiling * 0.05  # full jitter reaches down to zero
        assert max(draws) > ceiling * 0.95
    assert Backoff(failures=1).delay(0.0) == timedelta(0)


def test_backoff_survives_a_very_long_outage() -> None:
    assert Backoff(failures=10_000).delay(0.5) == timedelta(seconds=150)


def test_backoff_with_custom_base_and_cap() -> None:
    backoff = Backoff(base=timedelta(milliseconds=100), cap=timedelta(seconds=1), failures=3)
    assert backoff.ceiling() == timedelta(milliseconds=400)
    assert backoff.increment().increment().ceiling() == timedelta(seconds=1)


@pytest.mark.parametrize("rand", [-0.1, 1.0, float("nan")])
def test_backoff_rejects_rand_outside_unit_interval(rand: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        Backoff(failures=1).delay(rand)


@pytest.mark.parametrize(
    "kwargs",
    [{"base": timedelta(0)}, {"cap": timedelta(milliseconds=10)}, {"failures": -1}],
)
def test_backoff_rejects_nonsense_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]


# -- classify ---------------------------------------------------------------------------------


CLASSIFIED: list[tuple[BaseException, ErrorKind]] = [
    (errors.ConnectionProblem("connection refused"), ErrorKind.RETRY),
    (errors.ServerError("internal error", status=500), ErrorKind.RETRY),
    (errors.LimitExceeded("slow down", status=429), ErrorKind.RETRY),
    (errors.ProtocolError("not JSON (an HTML error page?)", status=502), ErrorKind.RETRY),
    (errors.TrustError("certificate verify failed"), ErrorKind.RETRY),
    (errors.ClientError("unexpected answer"), ErrorKind.RETRY),
    (errors.DestinationError("no space left on device", path="/out"), ErrorKind.RETRY),
    (errors.AclError("setfacl: Operation not supported", path="/out"), ErrorKind.RETRY),
    (errors.StorageLockedError("locked by pid 42", path="/var/lib"), ErrorKind.RETRY),
    (errors.IdentityError("TLS certificate is not valid PEM"), ErrorKind.RETRY),
    (errors.AccessDenied("bot instance ci/1 not found", status=403), ErrorKind.FATAL),
    (errors.AccessDenied("the token is not valid", status=403), ErrorKind.FATAL),
    (
        errors.AccessDenied("client certificate has expired or is not yet valid"),
        ErrorKind.REJOIN,
    ),
    (errors.AccessDenied("Certificate EXPIRED"), ErrorKind.REJOIN),
    (errors.AccessDenied("certificate is not yet valid"), ErrorKind.REJOIN),
    (errors.BadParameter("malformed", status=400), ErrorKind.FATAL),
    (errors.NotFound("no such bot", status=404), ErrorKind.FATAL),
    (errors.ConfigError("bad config", source="tbot.yaml", line=3), ErrorKind.FATAL),
    (errors.Error("some other tbot-py error"), ErrorKind.RETRY),
    (OutputsFailed([("out", errors.Error("x"))], total=1), ErrorKind.RETRY),
    (KeyError("bug"), ErrorKind.RETRY),
    (ValueError("bug"), ErrorKind.RETRY),
    (OSError(28, "No space left on device"), ErrorKind.RETRY),
    (TimeoutError(), ErrorKind.RETRY),
    (KeyboardInterrupt(), ErrorKind.FATAL),
    (SystemExit(1), ErrorKind.FATAL),
]


@pytest.mark.parametrize(
    ("exc", "kind"),
    CLASSIFIED,
    ids=[f"{type(exc).__name__}-{i}" for i, (exc, _) in enumerate(CLASSIFIED)],
)
def test_classify_sorts_every_error_class(exc: BaseException, kind: ErrorKind) -> None:
    assert classify(exc) is kind


def test_classify_table_covers_every_class_in_errors_module() -> None:
    classes = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.Error)
    }
    assert classes <= {type(exc) for exc, _ in CLASSIFIED}


def test_cancellation_is_not_retried() -> None:
    assert classify(asyncio.CancelledError()) is ErrorKind.FATAL


# -- retry_time -------------------------------------------------------------------------------


def test_retry_time_is_now_plus_backoff_delay() -> None:
    backoff = Backoff(failures=3)
    when = retry_time(now=NOW, backoff=backoff, rand=0.5, not_after=NOW + 60 * MIN)
    assert when == NOW + 2 * SEC
    assert retry_time(now=NOW, backoff=backoff, rand=0.5, not_after=None) == NOW + 2 * SEC


def test_retry_time_is_pulled_before_not_after() -> None:
    backoff = Backoff(failures=20)  # up to 5 minutes
    when = retry_time(now=NOW, backoff=backoff, rand=ALMOST_ONE, not_after=NOW + MIN)
    assert when == NOW + MIN - SEC


def test_retry_time_waits_at_least_a_second_when_expiry_is_imminent() -> None:
    backoff = Backoff(failures=20)
    when = retry_time(now=NOW, backoff=backoff, rand=ALMOST_ONE, not_after=NOW + SEC / 2)
    assert when == NOW + SEC
    expired = retry_time(now=NOW, backoff=backoff, rand=ALMOST_ONE, not_after=NOW - MIN)
    assert expired == NOW + SEC


def test_retry_time_over_many_draws_never_lands_after_not_after() -> None:
    rng = random.Random(11)
    not_after = NOW + 90 * SEC
    backoff = Backoff()
    for _ in range(200):
        backoff = backoff.increment()
        when = retry_time(now=NOW, backoff=backoff, rand=rng.random(), not_after=not_after)
        assert NOW <= when <= not_after - SEC
