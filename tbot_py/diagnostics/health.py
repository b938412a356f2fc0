"""The health of every service: the source of truth for /readyz, /wait and the metrics.

Services report the outcome of each renewal; the status itself is computed when
it is read, with the injected clock, so a credential that expires while nobody
reports anything still turns the service unhealthy on time (tbot.md §7.9).

The daemon reports from its asyncio loop while the diagnostics server reads from
its own threads, so every access goes through one lock, and ``wait_reported``
blocks on a condition variable rather than polling.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from tbot_py.client.wire import format_time

log = logging.getLogger("tbot_py.diagnostics")


class Status(enum.Enum):
    """A service's status, spelled as tbot's readyz endpoint spells it."""

    INITIALIZING = "initializing"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class ServiceHealth:
    """One service's view, computed at read time.

    ``next_renewal`` is when the next attempt is due: the planned renewal after a
    success, the retry after a failure. ``not_after`` and ``last_success`` survive
    failures, since the last good credential is still on disk.
    """

    name: str
    type: str
    status: Status
    reason: str | None
    updated_at: datetime | None
    not_after: datetime | None
    next_renewal: datetime | None
    last_success: datetime | None
    consecutive_failures: int


class HealthObserver(Protocol):
    """Told about every change, under the registry's lock; must not call back into it.

    ``health`` is the service's view right after the report.
    """

    def service_registered(self, name: str, service_type: str) -> None:
        """A service was (re-)registered; forget anything known about it."""

    def service_unregistered(self, name: str) -> None:
        """A service is gone; drop what is kept about it."""

    def iteration_succeeded(self, health: ServiceHealth, *, attempt: int, duration: float) -> None:
        """A renewal succeeded after ``attempt`` consecutive failures."""

    def iteration_failed(self, health: ServiceHealth, *, duration: float) -> None:
        """A renewal failed."""


@dataclass
class _Record:
    """What we remember about one service; the status is derived from it on read."""

    type: str
    reported: bool = False
    last_failed: bool = False
    reason: str | None = None
    updated_at: datetime | None = None
    not_after: datetime | None = None
    next_renewal: datetime | None = None
    last_success: datetime | None = None
    consecutive_failures: int = 0


class HealthRegistry:
    """Thread-safe status of every registered service.

    Pass ``observer`` (for instance a ``tbot_py.diagnostics.metrics.Metrics``) to
    have every registration and report mirrored elsewhere.
    """

    def __init__(
        self, clock: Callable[[], datetime], observer: HealthObserver | None = None
    ) -> None:
        self._clock = clock
        self._observer = observer
        self._records: dict[str, _Record] = {}
        self._changed = threading.Condition(threading.Lock())

    def register(self, name: str, service_type: str) -> None:
        """Add ``name`` as INITIALIZING; registering it again starts it from scratch."""
        with self._changed:
            self._records[name] = _Record(type=service_type)
            if self._observer is not None:
                self._observer.service_registered(name, service_type)
            self._changed.notify_all()

    def unregister(self, name: str) -> None:
        """Forget ``name``; unknown names are ignored."""
        with self._changed:
            if self._records.pop(name, None) is not None and self._observer is not None:
                self._observer.service_unregistered(name)
            self._changed.notify_all()

    def report_success(
        self,
        name: str,
        *,
        not_after: datetime,
        next_renewal: datetime,
        duration: float,
        attempt: int,
    ) -> None:
        """Record a successful renewal.

        ``attempt`` is the number of consecutive failures before this success
        (0 = first try) and ``duration`` the seconds this attempt took.
        """
        with self._changed:
            record = self._reporting(name)
            if record is None:
                return
            now = self._clock()
            record.reported = True
            record.last_failed = False
            record.reason = None
            record.updated_at = now
            record.not_after = not_after
            record.next_renewal = next_renewal
            record.last_success = now
            record.consecutive_failures = 0
            if self._observer is not None:
                health = self._view(name, record, now)
                self._observer.iteration_succeeded(health, attempt=attempt, duration=duration)
            self._changed.notify_all()

    def report_failure(
        self, name: str, reason: str, *, next_retry: datetime, duration: float
    ) -> None:
        """Record a failed renewal; the service is UNHEALTHY with ``reason`` until a success."""
        with self._changed:
            record = self._reporting(name)
            if record is None:
                return
            now = self._clock()
            record.reported = True
            record.last_failed = True
            record.reason = reason
            record.updated_at = now
            record.next_renewal = next_retry
            record.consecutive_failures += 1
            if self._observer is not None:
                self._observer.iteration_failed(self._view(name, record, now), duration=duration)
            self._changed.notify_all()

    def snapshot(self) -> list[ServiceHealth]:
        """Every service's view, sorted by name."""
        with self._changed:
            now = self._clock()
            return [self._view(n, r, now) for n, r in sorted(self._records.items())]

    def get(self, name: str) -> ServiceHealth | None:
        """The view of ``name``, or None if it is not registered."""
        with self._changed:
            record = self._records.get(name)
            return None if record is None else self._view(name, record, self._clock())

    def overall(self) -> Status:
        """HEALTHY only if every service is; with no services at all, HEALTHY."""
        return overall_status(self.snapshot())

    def all_reported(self, name: str | None = None) -> bool:
        """Whether every service (or the named one) has reported at least once."""
        with self._changed:
            return self._reported(name)

    def wait_reported(self, name: str | None, timeout: float) -> bool:
        """Block until ``all_reported(name)`` holds or ``timeout`` seconds pass.

        A name that is not registered yet is waited for too: it may be
        registered and report before the timeout.
        """
        with self._changed:
            return self._changed.wait_for(lambda: self._reported(name), timeout=max(timeout, 0))

    # -- under the lock ------------------------------------------------------

    def _reporting(self, name: str) -> _Record | None:
        record = self._records.get(name)
        if record is None:
            # A task finishing after its service was unregistered (say, during a
            # reload) is not an error worth crashing that task for.
            log.debug("ignoring a report for unregistered service %r", name)
        return record

    def _reported(self, name: str | None) -> bool:
        if name is not None:
            record = self._records.get(name)
            return record is not None and record.reported
        return all(r.reported for r in self._records.values())

    @staticmethod
    def _view(name: str, record: _Record, now: datetime) -> ServiceHealth:
        status, reason, updated_at = _status(record, now)
        return ServiceHealth(
            name=name,
            type=record.type,
            status=status,
            reason=reason,
            updated_at=updated_at,
            not_after=record.not_after,
            next_renewal=record.next_renewal,
            last_success=record.last_success,
            consecutive_failures=record.consecutive_failures,
        )


def _status(record: _Record, now: datetime) -> tuple[Status, str | None, datetime | None]:
    """Status, reason and the time the status last changed."""
    if not record.reported:
        return Status.INITIALIZING, None, None
    expired = record.not_after is not None and now >= record.not_after
    if record.last_failed:
        reason = record.reason
        if expired and record.not_after is not None:
            reason = f"{reason}; credential expired at {format_time(record.not_after)}"
        return Status.UNHEALTHY, reason, record.updated_at
    if expired and record.not_after is not None:
        # The status changed when the credential expired, not at the last report.
        reason = f"credential expired at {format_time(record.not_after)}"
        return Status.UNHEALTHY, reason, record.not_after
    return Status.HEALTHY, None, record.updated_at


def overall_status(services: list[ServiceHealth]) -> Status:
    """HEALTHY only if every service is HEALTHY, else UNHEALTHY.

    As in tbot, a service still initializing makes the whole bot unhealthy, so
    /readyz answers 503 until every service has succeeded once.
    """
    healthy = all(s.status is Status.HEALTHY for s in services)
    return Status.HEALTHY if healthy else Status.UNHEALTHY
