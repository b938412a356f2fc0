"""A settable clock and a registry for the diagnostics tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tbot_py.diagnostics.health import HealthRegistry

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> HealthRegistry:
    return HealthRegistry(clock)


def succeed(registry: HealthRegistry, name: str, clock: FakeClock, *, attempt: int = 0) -> None:
    """Report a success whose credential lasts an hour."""
    registry.report_success(
        name,
        not_after=clock.now + HOUR,
        next_renewal=clock.now + timedelta(minutes=20),
        duration=0.25,
        attempt=attempt,
    )
