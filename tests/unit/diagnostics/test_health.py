from __future__ import annotations

import threading
import time
from datetime import timedelta

from tbot_py.diagnostics.health import HealthRegistry, Status

from .conftest import HOUR, T0, FakeClock, succeed


def test_service_starts_initializing_with_nothing_known(registry: HealthRegistry) -> None:
    registry.register("identity", "bot")
    health = registry.get("identity")
    assert health is not None
    assert health.status is Status.INITIALIZING
    assert (health.reason, health.updated_at, health.not_after) == (None, None, None)
    assert health.type == "bot"


def test_success_makes_service_healthy_until_the_credential_expires(
    registry: HealthRegistry, clock: FakeClock
) -> None:
    registry.register("identity", "bot")
    succeed(registry, "identity", clock)
    health = registry.get("identity")
    assert health is not None
    assert health.status is Status.HEALTHY
    assert health.reason is None
    assert health.updated_at == T0
    assert health.last_success == T0
    assert health.not_after == T0 + HOUR
    assert health.next_renewal == T0 + timedelta(minutes=20)

    clock.advance(HOUR - timedelta(seconds=1))
    assert registry.overall() is Status.HEALTHY
    clock.advance(timedelta(seconds=1))  # now == not_after: expired
    expired = registry.get("identity")
    assert expired is not None
    assert expired.status is Status.UNHEALTHY
    assert expired.reason == "credential expired at 2026-01-01T13:00:00Z"
    assert expired.updated_at == T0 + HOUR
    assert registry.overall() is Status.UNHEALTHY


def test_failure_is_unhealthy_with_its_reason_and_a_later_success_recovers(
    registry: HealthRegistry, clock: FakeClock
) -> None:
    registry.register("out", "identity")
    succeed(registry, "out", clock)
    clock.advance(timedelta(minutes=20))
    retry = clock.now + timedelta(seconds=30)
    registry.report_failure("out", "auth service unreachable", next_retry=retry, duration=1.0)
    registry.report_failure("out", "auth service unreachable", next_retry=retry, duration=1.0)
    failed = registry.get("out")
    assert failed is not None
    assert failed.status is Status.UNHEALTHY
    assert failed.reason == "auth service unreachable"
    assert failed.updated_at == clock.now
    assert failed.next_renewal == retry
    assert failed.consecutive_failures == 2
    assert failed.last_success == T0  # the last good credential is still there
    assert failed.not_after == T0 + HOUR

    succeed(registry, "out", clock, attempt=2)
    recovered = registry.get("out")
    assert recovered is not None
    assert recovered.status is Status.HEALTHY
    assert recovered.consecutive_failures == 0
    assert recovered.reason is None


def test_failure_after_expiry_names_both_problems(
    registry: HealthRegistry, clock: FakeClock
) -> None:
    registry.register("out", "identity")
    succeed(registry, "out", clock)
    clock.advance(2 * HOUR)
    registry.report_failure("out", "denied", next_retry=clock.now, duration=0.1)
    health = registry.get("out")
    assert health is not None
    assert health.reason == "denied; credential expired at 2026-01-01T13:00:00Z"


def test_overall_is_healthy_only_when_every_service_is(
    registry: HealthRegistry, clock: FakeClock
) -> None:
    assert registry.overall() is Status.HEALTHY  # nothing registered
    registry.register("identity", "bot")
    registry.register("out", "identity")
    assert registry.overall() is Status.UNHEALTHY  # initializing counts against, as in tbot
    succeed(registry, "identity", clock)
    assert registry.overall() is Status.UNHEALTHY
    succeed(registry, "out", clock)
    assert registry.overall() is Status.HEALTHY


def test_snapshot_is_sorted_by_name(registry: HealthRegistry) -> None:
    for name in ("zeta", "alpha", "identity"):
        registry.register(name, "identity")
    assert [s.name for s in registry.snapshot()] == ["alpha", "identity", "zeta"]


def test_all_reported_counts_failures_and_the_named_service(
    registry: HealthRegistry, clock: FakeClock
) -> None:
    assert registry.all_reported()
    registry.register("identity", "bot")
    registry.register("out", "identity")
    assert not registry.all_reported()
    registry.report_failure("identity", "boom", next_retry=clock.now, duration=0.1)
    assert registry.all_reported("identity")
    assert not registry.all_reported("out")
    assert not registry.all_reported()
    assert not registry.all_reported("missing")
    succeed(registry, "out", clock)
    assert registry.all_reported()


def test_re_registering_forgets_everything(registry: HealthRegistry, clock: FakeClock) -> None:
    registry.register("out", "identity")
    registry.report_failure("out", "boom", next_retry=clock.now, duration=0.1)
    registry.register("out", "database")
    health = registry.get("out")
    assert health is not None
    assert (health.status, health.type, health.consecutive_failures) == (
        Status.INITIALIZING,
        "database",
        0,
    )


def test_reports_for_unregistered_services_are_ignored(
    registry: HealthRegistry, clock: FakeClock
) -> None:
    registry.register("out", "identity")
    registry.unregister("out")
    registry.unregister("never-there")
    succeed(registry, "out", clock)  # a task finishing after a reload removed it
    assert registry.get("out") is None
    assert registry.snapshot() == []


def test_wait_reported_returns_when_another_thread_reports(
    registry: HealthRegistry, clock: FakeClock
) -> None:
    registry.register("identity", "bot")
    timer = threading.Timer(0.1, succeed, (registry, "identity", clock))
    started = time.monotonic()
    timer.start()
    try:
        assert registry.wait_reported(None, timeout=5)
    finally:
        timer.cancel()
    assert 0.05 < time.monotonic() - started < 2


def test_wait_reported_times_out_and_waits_for_late_registration(
    registry: HealthRegistry, clock: FakeClock
) -> None:
    registry.register("identity", "bot")
    assert not registry.wait_reported("identity", timeout=0.05)

    def register_then_report() -> None:
        registry.register("late", "identity")
        succeed(registry, "late", clock)

    timer = threading.Timer(0.05, register_then_report)
    timer.start()
    try:
        assert registry.wait_reported("late", timeout=5)
    finally:
        timer.cancel()
