"""Prometheus metrics for the daemon, under tbot's names (tbot.md §7.9) plus a few of our own.

This is the only module that imports prometheus_client, and only the daemon
imports it. Wire it to the health registry once; every report then updates the
metrics, so no service has to touch them::

    metrics = Metrics()
    registry = HealthRegistry(clock, observer=metrics)
    server = DiagnosticsServer(addr, registry, metrics)

One report is one iteration: ``report_success`` and ``report_failure`` each add
one to ``tbot_task_iterations_total`` and observe their duration.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from tbot_py.diagnostics.health import ServiceHealth

#: The task label tbot gives the bot identity's loop and every other service's loop.
TASK_BOT_IDENTITY = "bot-identity-renewal"
TASK_OUTPUT = "output-renewal"
IDENTITY_SERVICE = "identity"

_TASK_LABELS = ("service", "name")
_SERVICE_LABELS = ("service",)


def task_name(service: str) -> str:
    """The ``name`` label tbot uses for a service's renewal loop."""
    return TASK_BOT_IDENTITY if service == IDENTITY_SERVICE else TASK_OUTPUT


def _exponential_buckets(start: float, factor: float, count: int) -> list[float]:
    # Multiplied step by step like Go's prometheus.ExponentialBuckets, so the
    # bucket bounds print exactly as tbot's do.
    buckets = []
    for _ in range(count):
        buckets.append(start)
        start *= factor
    return buckets


class Metrics:
    """The daemon's metrics in a private registry; a ``HealthObserver`` for ``HealthRegistry``.

    Exposed with tbot's exact names: ``tbot_task_iterations_failed`` has no
    ``_total`` suffix in tbot, which prometheus_client cannot print for a
    counter, so it is exposed untyped (PromQL's ``rate`` works the same). The
    ``_created`` series prometheus_client adds are dropped, as tbot has none.
    """

    #: The classic text format, which every Prometheus version scrapes.
    content_type: ClassVar[str] = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # prometheus_client declares a counter without its "_total" suffix and
        # adds it back when printing.
        self._iterations = Counter(
            "tbot_task_iterations",
            "Number of task iteration attempts, not counting retries",
            _TASK_LABELS,
            registry=self.registry,
        )
        self._successes = Histogram(
            "tbot_task_iterations_successful",
            "Histogram of task iterations that ended in success, counted by number of retries",
            _TASK_LABELS,
            buckets=(0, 1, 2, 3, 4, 5),
            registry=self.registry,
        )
        self._failures = Counter(
            "tbot_task_iterations_failed",
            "Number of task iterations that ended in failure",
            _TASK_LABELS,
            registry=self.registry,
        )
        self._duration = Histogram(
            "tbot_task_iteration_duration_seconds",
            "Time taken for a task iteration in seconds",
            _TASK_LABELS,
            buckets=_exponential_buckets(0.1, 1.75, 6),
            registry=self.registry,
        )
        self._not_after = Gauge(
            "tbot_py_credential_not_after_timestamp_seconds",
            "Unix time at which the service's current credential expires",
            _SERVICE_LABELS,
            registry=self.registry,
        )
        self._next_renewal = Gauge(
            "tbot_py_next_renewal_timestamp_seconds",
            "Unix time of the service's next renewal or retry",
            _SERVICE_LABELS,
            registry=self.registry,
        )
        self._last_success = Gauge(
            "tbot_py_last_success_timestamp_seconds",
            "Unix time of the service's last successful renewal",
            _SERVICE_LABELS,
            registry=self.registry,
        )
        self._consecutive_failures = Gauge(
            "tbot_py_consecutive_failures",
            "Failed renewals of the service since its last success",
            _SERVICE_LABELS,
            registry=self.registry,
        )
        self._exposition = _TbotExposition(self.registry, untyped={"tbot_task_iterations_failed"})

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (see ``content_type``)."""
        return generate_latest(self._exposition)

    # -- HealthObserver --------------------------------------------------------

    def service_registered(self, name: str, service_type: str) -> None:
        """Start the service's series from zero, so dashboards see it before its first run."""
        self.service_unregistered(name)
        task = task_name(name)
        for metric in (self._iterations, self._successes, self._failures, self._duration):
            metric.labels(name, task)
        self._consecutive_failures.labels(name).set(0)

    def service_unregistered(self, name: str) -> None:
        """Drop every series of the service."""
        task = task_name(name)
        for per_task in (self._iterations, self._successes, self._failures, self._duration):
            per_task.remove(name, task)
        for gauge in self._gauges():
            gauge.remove(name)

    def iteration_succeeded(self, health: ServiceHealth, *, attempt: int, duration: float) -> None:
        """Count a successful iteration that followed ``attempt`` failures."""
        self._count_iteration(health, duration)
        self._successes.labels(health.name, task_name(health.name)).observe(attempt)

    def iteration_failed(self, health: ServiceHealth, *, duration: float) -> None:
        """Count a failed iteration."""
        self._count_iteration(health, duration)
        self._failures.labels(health.name, task_name(health.name)).inc()

    def _count_iteration(self, health: ServiceHealth, duration: float) -> None:
        task = task_name(health.name)
        self._iterations.labels(health.name, task).inc()
        self._duration.labels(health.name, task).observe(duration)
        self._consecutive_failures.labels(health.name).set(health.consecutive_failures)
        for gauge, when in (
            (self._not_after, health.not_after),
            (self._next_renewal, health.next_renewal),
            (self._last_success, health.last_success),
        ):
            if when is not None:
                gauge.labels(health.name).set(when.timestamp())

    def _gauges(self) -> tuple[Gauge, ...]:
        return (self._not_after, self._next_renewal, self._last_success, self._consecutive_failures)


class _TbotExposition:
    """A view of a registry with tbot's exact names: a Collector for ``generate_latest``."""

    def __init__(self, registry: CollectorRegistry, *, untyped: set[str]) -> None:
        self._registry = registry
        self._untyped = frozenset(untyped)

    def collect(self) -> Iterable[Metric]:
        """The registry's families without ``_created``, some counters renamed and untyped."""
        for family in self._registry.collect():
            created = family.name + "_created"
            samples = [s for s in family.samples if s.name != created]
            if family.name in self._untyped:
                renamed = Metric(family.name, family.documentation, "unknown")
                for sample in samples:
                    renamed.add_sample(family.name, sample.labels, sample.value)
                yield renamed
            else:
                family.samples = samples
                yield family
