"""The background daemon against a real in-process auth service.

Each test runs ``Daemon.run()`` under ``asyncio.run`` with a recording notifier, waits (with
a deadline) for the behaviour under test, then stops it. Behaviour is triggered the way the
signal handlers would: ``renew_all_now()`` for SIGUSR1, ``reload()`` for SIGHUP, ``stop()``
for SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from tbot_py.authservice import admin
from tbot_py.authservice.server import RunningAuthService
from tbot_py.bot import schedule
from tbot_py.bot.daemon import BOT_TASK, WALL_CLOCK_TICK, Daemon
from tbot_py.config import BotConfig, load_config_text
from tbot_py.diagnostics.health import HealthRegistry, ServiceHealth, Status
from tbot_py.diagnostics.sdnotify import Notifier
from tbot_py.errors import AccessDenied, ConfigError
from tbot_py.services.base import BotContext, GenerateResult
from tests.expected import IDENTITY_FILES, artifacts
from tests.unit.conftest import BOT, create_login_roles, utc_now

T = TypeVar("T")

#: Deadline for the first join plus every output's first write.
START_TIMEOUT = 5.0
#: Deadline for anything after that.
TIMEOUT = 2.0


class FakeNotifier(Notifier):
    """Records every notification; at READY, also whether each watched file existed."""

    def __init__(self, watch: Sequence[Path] = ()) -> None:
        super().__init__(env={})
        self.events: list[str] = []
        self.statuses: list[str] = []
        self.watch = tuple(watch)
        self.missing_at_ready: list[list[Path]] = []

    def ready(self) -> bool:
        self.events.append("ready")
        self.missing_at_ready.append([p for p in self.watch if not p.exists()])
        return True

    def status(self, text: str) -> bool:
        self.statuses.append(text)
        return True

    def reloading(self) -> bool:
        self.events.append("reloading")
        return True

    def stopping(self) -> bool:
        self.events.append("stopping")
        return True

    async def run_watchdog(self, stop: asyncio.Event) -> None:
        await stop.wait()


class StatusLog:
    """A health observer that keeps every status each service went through, in order."""

    def __init__(self) -> None:
        self.history: dict[str, list[Status]] = {}

    def service_registered(self, name: str, service_type: str) -> None:
        self.history[name] = [Status.INITIALIZING]

    def service_unregistered(self, name: str) -> None:
        self.history.pop(name, None)

    def iteration_succeeded(self, health: ServiceHealth, *, attempt: int, duration: float) -> None:
        self.history[health.name].append(health.status)

    def iteration_failed(self, health: ServiceHealth, *, duration: float) -> None:
        self.history[health.name].append(health.status)


def _config(
    service: RunningAuthService, token: str, outputs: dict[str, tuple[Path, list[str]]]
) -> BotConfig:
    """Memory storage, short lifetimes, and one directory ``identity`` output per entry."""
    doc = {
        "version": "v2",
        "auth_server": service.addr,
        "onboarding": {"token": token, "ca_pins": [service.ca_pin]},
        "storage": {"type": "memory"},
        "credential_ttl": "2m",
        "renewal_interval": "40s",
        "services": [
            {
                "type": "identity",
                "name": name,
                "roles": roles,
                "destination": {"type": "directory", "path": str(path)},
            }
            for name, (path, roles) in outputs.items()
        ],
    }
    return load_config_text(json.dumps(doc), "tbot.yaml")


def _daemon(
    config: BotConfig,
    notifier: FakeNotifier,
    *,
    reload: Callable[[], BotConfig] | None = None,
    health: HealthRegistry | None = None,
    rng: random.Random | None = None,
) -> Daemon:
    return Daemon(
        config,
        notifier=notifier,
        health=health or HealthRegistry(utc_now),
        reload=reload,
        rng=rng or random.Random(1),
    )


def _drive(daemon: Daemon, scenario: Callable[[], Awaitable[T]]) -> T:
    """Run the daemon, play ``scenario`` against it, then stop it and wait for it to return."""

    async def main() -> T:
        runner = asyncio.create_task(daemon.run())
        try:
            return await scenario()
        finally:
            daemon.stop()
            await runner

    return asyncio.run(main())


async def _until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def _status(daemon: Daemon, name: str) -> Status | None:
    health = daemon.health.get(name)
    return None if health is None else health.status


def _healthy(daemon: Daemon, *names: str) -> Callable[[], bool]:
    return lambda: all(_status(daemon, name) is Status.HEALTHY for name in names)


def _files(directory: Path) -> dict[str, bytes]:
    return artifacts(directory)


def _take_down(service: RunningAuthService) -> None:
    """Stop the auth service while the daemon still holds keep-alive connections to it.

    The service's shutdown leaves its side of those TLS connections unclosed (a bug of the
    auth service, not the daemon). Collect them here, so their ResourceWarnings do not
    surface later inside the daemon's part of the test.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        service.stop()
        gc.collect()


def _generation(daemon: Daemon) -> int:
    bot = daemon._bot
    assert bot is not None, "the daemon holds no bot identity yet"
    return bot.identity.tls_identity.generation


# -- start-up ---------------------------------------------------------------------------


def test_ready_is_sent_once_after_every_output_is_written(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    outputs = {"dev-out": (tmp_path / "dev", ["dev"]), "access-out": (tmp_path / "acc", ["access"])}
    watch = [path / name for path, _ in outputs.values() for name in sorted(IDENTITY_FILES)]
    notifier = FakeNotifier(watch)
    daemon = _daemon(_config(service, token, outputs), notifier)

    async def scenario() -> None:
        await _until(lambda: "ready" in notifier.events, "READY", START_TIMEOUT)
        await asyncio.sleep(0.2)  # a second READY would be sent right away, if at all

    _drive(daemon, scenario)

    assert notifier.events == ["ready", "stopping"]
    assert notifier.missing_at_ready == [[]]
    assert notifier.statuses == ["joining the cluster", "2 output(s) fresh"]


def test_identity_and_every_output_go_from_initializing_to_healthy(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    observer = StatusLog()
    health = HealthRegistry(utc_now, observer=observer)
    outputs = {"a": (tmp_path / "a", ["dev"]), "b": (tmp_path / "b", ["access"])}
    daemon = _daemon(_config(service, token, outputs), FakeNotifier(), health=health)
    assert _status(daemon, BOT_TASK) is Status.INITIALIZING

    async def scenario() -> None:
        await _until(_healthy(daemon, BOT_TASK, "a", "b"), "every service healthy", START_TIMEOUT)

    _drive(daemon, scenario)

    assert observer.history == {
        BOT_TASK: [Status.INITIALIZING, Status.HEALTHY],
        "a": [Status.INITIALIZING, Status.HEALTHY],
        "b": [Status.INITIALIZING, Status.HEALTHY],
    }
    assert health.overall() is Status.HEALTHY


def test_fatal_join_error_without_stored_identity_makes_run_raise_promptly(
    service: RunningAuthService, tmp_path: Path
) -> None:
    config = _config(service, "no-such-token", {"a": (tmp_path / "a", ["dev"])})
    notifier = FakeNotifier()
    daemon = _daemon(config, notifier)

    with pytest.raises(AccessDenied):
        asyncio.run(asyncio.wait_for(daemon.run(), timeout=TIMEOUT))

    assert "ready" not in notifier.events
    assert not (tmp_path / "a" / "tlscert").exists()


# -- output isolation -------------------------------------------------------------------


def test_output_asking_for_a_role_the_bot_lacks_fails_alone_and_is_not_hammered(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    outputs = {"good": (tmp_path / "good", ["dev"]), "bad": (tmp_path / "bad", ["admin"])}
    notifier = FakeNotifier()
    daemon = _daemon(_config(service, token, outputs), notifier)

    async def scenario() -> ServiceHealth:
        await _until(
            lambda: (
                _status(daemon, "good") is Status.HEALTHY
                and _status(daemon, "bad") is Status.UNHEALTHY
            ),
            "good healthy and bad unhealthy",
            START_TIMEOUT,
        )
        await asyncio.sleep(1.0)  # long enough for a few backoff retries, were there any
        bad = daemon.health.get("bad")
        assert bad is not None
        return bad

    bad = _drive(daemon, scenario)

    assert set(_files(tmp_path / "good")) >= IDENTITY_FILES
    assert not (tmp_path / "bad" / "tlscert").exists()
    assert bad.reason is not None and '"admin"' in bad.reason
    assert bad.consecutive_failures == 1
    assert bad.next_renewal is not None and bad.next_renewal - utc_now() > timedelta(minutes=1)
    assert "ready" not in notifier.events


# -- renewals ---------------------------------------------------------------------------


def test_renew_all_now_reissues_outputs_and_renews_the_bot(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    notifier = FakeNotifier()
    daemon = _daemon(_config(service, token, {"a": (tmp_path / "a", ["dev"])}), notifier)
    tlscert = tmp_path / "a" / "tlscert"

    async def scenario() -> tuple[bytes, int]:
        await _until(lambda: "ready" in notifier.events, "READY", START_TIMEOUT)
        before, generation = tlscert.read_bytes(), _generation(daemon)
        daemon.renew_all_now()
        await _until(
            lambda: tlscert.read_bytes() != before and _generation(daemon) > generation,
            "a new tlscert and a renewed bot identity",
        )
        return before, generation

    before, generation = _drive(daemon, scenario)

    assert tlscert.read_bytes() != before
    assert _generation(daemon) == generation + 1


def test_server_down_makes_renewal_retry_with_growing_backoff_and_keeps_files(
    service: RunningAuthService, token: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = FakeNotifier()
    daemon = _daemon(_config(service, token, {"a": (tmp_path / "a", ["dev"])}), notifier)

    async def scenario() -> dict[str, bytes]:
        await _until(lambda: "ready" in notifier.events, "READY", START_TIMEOUT)
        written = _files(tmp_path / "a")
        _take_down(service)
        daemon.renew_all_now()
        await _until(lambda: daemon._tasks["a"].backoff.failures >= 2, "a second failure")
        return written

    with caplog.at_level(logging.WARNING, logger="tbot_py.bot"):
        written = _drive(daemon, scenario)

    assert _files(tmp_path / "a") == written
    health = daemon.health.get("a")
    assert health is not None and health.status is Status.UNHEALTHY
    backoff = daemon._tasks["a"].backoff
    assert backoff.ceiling() > backoff.reset().increment().ceiling()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("a: attempt 1 failed:") for m in messages)
    assert not any("will not recover" in m for m in messages)


def test_retry_due_at_once_still_runs(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    class ZeroRandom(random.Random):
        """Every draw at the low end of [0, 1): a full-jitter delay of zero."""

        def random(self) -> float:
            return 0.0

    notifier = FakeNotifier()
    config = _config(service, token, {"a": (tmp_path / "a", ["dev"])})
    daemon = _daemon(config, notifier, rng=ZeroRandom())

    async def scenario() -> None:
        await _until(lambda: "ready" in notifier.events, "READY", START_TIMEOUT)
        _take_down(service)
        daemon.renew_all_now()
        await _until(lambda: daemon._tasks["a"].backoff.failures >= 2, "a second failure")

    _drive(daemon, scenario)


def test_overdue_job_runs_within_seconds_as_after_a_suspend(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    notifier = FakeNotifier()
    daemon = _daemon(_config(service, token, {"a": (tmp_path / "a", ["dev"])}), notifier)
    tlscert = tmp_path / "a" / "tlscert"

    async def scenario() -> None:
        await _until(lambda: "ready" in notifier.events, "READY", START_TIMEOUT)
        scheduler = daemon._scheduler
        assert scheduler is not None
        tick = scheduler.get_job("wall-clock-tick")
        assert tick is not None and tick.trigger.interval == WALL_CLOCK_TICK
        before = tlscert.read_bytes()
        daemon._schedule("a", utc_now() + timedelta(days=1))
        await asyncio.sleep(0.1)
        assert tlscert.read_bytes() == before
        # The host slept through the run: its date is now an hour in the past.
        daemon._schedule("a", utc_now() - timedelta(hours=1))
        await _until(lambda: tlscert.read_bytes() != before, "the overdue run")

    _drive(daemon, scenario)


# -- reload -----------------------------------------------------------------------------


def test_reload_with_a_broken_config_keeps_the_running_services(
    service: RunningAuthService, token: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> BotConfig:
        raise ConfigError("unknown field", source="tbot.yaml", line=3)

    notifier = FakeNotifier()
    config = _config(service, token, {"a": (tmp_path / "a", ["dev"])})
    daemon = _daemon(config, notifier, reload=broken)

    async def scenario() -> None:
        await _until(lambda: "ready" in notifier.events, "READY", START_TIMEOUT)
        # READY is sent inside the run; its next run is booked just after the run ends.
        scheduler = daemon._scheduler
        assert scheduler is not None
        await _until(lambda: scheduler.get_job("a") is not None, "a's next run booked")
        tasks = dict(daemon._tasks)
        with caplog.at_level(logging.ERROR, logger="tbot_py.bot"):
            await daemon.reload()
        assert daemon._tasks.keys() == tasks.keys()
        assert all(daemon._tasks[name] is task for name, task in tasks.items())
        assert daemon.config is config
        assert _healthy(daemon, BOT_TASK, "a")()
        assert scheduler.get_job("a") is not None

    _drive(daemon, scenario)

    assert any(
        "reload failed" in r.getMessage() and "tbot.yaml:3" in r.getMessage()
        for r in caplog.records
    )
    assert notifier.events == ["ready", "reloading", "ready", "stopping"]


def test_reload_that_adds_an_output_starts_it(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    first = {"a": (tmp_path / "a", ["dev"])}
    second = {**first, "b": (tmp_path / "b", ["access"])}
    notifier = FakeNotifier()
    daemon = _daemon(
        _config(service, token, first),
        notifier,
        reload=lambda: _config(service, token, second),
    )

    async def scenario() -> None:
        await _until(lambda: "ready" in notifier.events, "READY", START_TIMEOUT)
        assert daemon.health.get("b") is None
        await daemon.reload()
        await _until(_healthy(daemon, "a", "b"), "the new output healthy")

    _drive(daemon, scenario)

    assert set(_files(tmp_path / "b")) >= IDENTITY_FILES


def test_reload_that_removes_an_output_unregisters_it(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    first = {"a": (tmp_path / "a", ["dev"]), "b": (tmp_path / "b", ["access"])}
    second = {"a": first["a"]}
    notifier = FakeNotifier()
    daemon = _daemon(
        _config(service, token, first),
        notifier,
        reload=lambda: _config(service, token, second),
    )

    async def scenario() -> None:
        await _until(lambda: "ready" in notifier.events, "READY", START_TIMEOUT)
        await daemon.reload()
        assert daemon.health.get("b") is None
        assert "b" not in daemon._tasks
        scheduler = daemon._scheduler
        assert scheduler is not None and scheduler.get_job("b") is None
        await _until(_healthy(daemon, "a"), "the kept output healthy")

    _drive(daemon, scenario)

    assert [s.name for s in daemon.health.snapshot()] == ["a", BOT_TASK]


def test_reload_before_every_output_was_written_does_not_send_ready(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    outputs = {"good": (tmp_path / "good", ["dev"]), "bad": (tmp_path / "bad", ["admin"])}
    config = _config(service, token, outputs)
    notifier = FakeNotifier()
    daemon = _daemon(config, notifier, reload=lambda: config)

    async def scenario() -> None:
        await _until(
            lambda: _status(daemon, "bad") is Status.UNHEALTHY, "bad unhealthy", START_TIMEOUT
        )
        await daemon.reload()

    _drive(daemon, scenario)

    assert "ready" not in notifier.events


# -- shutdown ---------------------------------------------------------------------------


def test_stop_during_a_run_lets_it_finish_writing(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    notifier = FakeNotifier()
    daemon = _daemon(_config(service, token, {"a": (tmp_path / "a", ["dev"])}), notifier)

    async def scenario() -> None:
        await asyncio.sleep(0)  # run() prepares the outputs, then waits for the join
        assert len(daemon._pending_outputs) == 1
        output = daemon._pending_outputs[0].output
        assert output is not None
        generate = output.generate

        async def stop_then_generate(bot: BotContext) -> GenerateResult:
            daemon.stop()  # SIGTERM arrives while this run is in flight
            await asyncio.sleep(0)
            return await generate(bot)

        output.generate = stop_then_generate  # type: ignore[method-assign]
        await _until(lambda: "stopping" in notifier.events, "stopping", START_TIMEOUT)

    _drive(daemon, scenario)

    assert set(_files(tmp_path / "a")) >= IDENTITY_FILES


def test_stop_closes_the_client_a_renewal_replaced(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    notifier = FakeNotifier()
    daemon = _daemon(_config(service, token, {"a": (tmp_path / "a", ["dev"])}), notifier)

    async def main() -> tuple[bool, bool]:
        runner = asyncio.create_task(daemon.run())
        try:
            await _until(lambda: "ready" in notifier.events, "READY", START_TIMEOUT)
            assert daemon._bot is not None
            replaced, generation = daemon._bot.client, _generation(daemon)
            daemon.renew_all_now()
            await _until(lambda: _generation(daemon) > generation, "a renewed bot identity")
        finally:
            daemon.stop()
            await runner
        assert daemon._bot is not None
        closed = daemon._bot.client._http.is_closed, replaced._http.is_closed
        # Whatever the verdict, release its connections before the service stops: left open,
        # they make the service leak its side of them, which pytest reports at exit.
        await replaced.close()
        return closed

    current_closed, replaced_closed = asyncio.run(main())

    assert current_closed
    assert replaced_closed


def test_a_fresh_bot_identity_retries_failed_outputs_at_once(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    """An output refused for good (fatal, slow retry) comes back as soon as the bot renews.

    The admin grants the missing role; the next bot renewal (here forced) must retry the
    failed output right away instead of after its slow fatal-retry delay (minutes).
    """
    outputs = {"late": (tmp_path / "late", ["ops"])}
    daemon = _daemon(_config(service, token, outputs), FakeNotifier())

    async def scenario() -> None:
        await _until(lambda: _status(daemon, "late") is Status.UNHEALTHY, "late to fail")
        create_login_roles(service.cluster, "ops")
        admin.update_bot_roles(service.cluster, BOT, add=("ops",))
        daemon._schedule(BOT_TASK, utc_now())
        await _until(lambda: _status(daemon, "late") is Status.HEALTHY, "late to recover", 5)

    _drive(daemon, scenario)
    assert set(_files(tmp_path / "late")) >= IDENTITY_FILES


def test_a_bot_renewal_renews_outputs_the_old_identity_cut_short_and_only_those(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    """An output that would expire with the old bot identity before its next run is renewed
    right after the bot; one that will be renewed in time keeps its schedule.

    "short" pretends to hold a certificate the old identity capped to 5 s (its next run is
    ~40 s away); "long" keeps the real one (capped near the bot's 2 min, its run due well
    before that).
    """
    outputs = {"short": (tmp_path / "short", ["dev"]), "long": (tmp_path / "long", ["dev"])}
    daemon = _daemon(_config(service, token, outputs), FakeNotifier())

    def last_success(name: str) -> object:
        health = daemon.health.get(name)
        return None if health is None else health.last_success

    async def scenario() -> tuple[object, object]:
        await _until(_healthy(daemon, BOT_TASK, "short", "long"), "first writes", START_TIMEOUT)
        await _until(lambda: not daemon._next_runs, "the next runs to be scheduled")
        before = last_success("short"), last_success("long")
        daemon._tasks["short"].not_after = utc_now() + timedelta(seconds=5)
        daemon._schedule(BOT_TASK, utc_now())
        await _until(lambda: last_success("short") != before[0], "short to be renewed")
        return before[1], last_success("long")

    long_before, long_after = _drive(daemon, scenario)
    assert long_after == long_before


# -- the first renewal after a start or a recovery --------------------------------------


class LowestRandom(random.Random):
    """Every draw at the low end: ``random()`` 0.0, so ``uniform(-1, 1)`` is -1."""

    def random(self) -> float:
        return 0.0


def _planned_delay(daemon: Daemon, name: str) -> timedelta:
    """How long after its last success the task's next renewal is planned."""
    health = daemon.health.get(name)
    assert health is not None and health.next_renewal and health.last_success
    return health.next_renewal - health.last_success


def _about(delay: timedelta, seconds: float) -> bool:
    return abs(delay.total_seconds() - seconds) < 1.0


#: With the test config (interval 40 s) and every draw at its lowest: the first renewal
#: after a start or a recovery at the minimum spacing, any later one at -10 % of 40 s.
SPREAD_LOWEST_S = schedule.MIN_SPACING.total_seconds()
JITTER_LOWEST_S = 36.0


def test_first_renewals_after_start_spread_over_the_interval_later_ones_use_the_jitter(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    notifier = FakeNotifier()
    config = _config(service, token, {"a": (tmp_path / "a", ["dev"])})
    daemon = _daemon(config, notifier, rng=LowestRandom())

    async def scenario() -> tuple[timedelta, timedelta, timedelta, timedelta]:
        await _until(lambda: "ready" in notifier.events, "READY", START_TIMEOUT)
        after_start = _planned_delay(daemon, BOT_TASK), _planned_delay(daemon, "a")
        generation, output = _generation(daemon), daemon.health.get("a")
        daemon.renew_all_now()
        await _until(
            lambda: _generation(daemon) > generation and daemon.health.get("a") != output,
            "the bot and the output renewed",
        )
        return *after_start, _planned_delay(daemon, BOT_TASK), _planned_delay(daemon, "a")

    bot_first, output_first, bot_later, output_later = _drive(daemon, scenario)

    assert _about(bot_first, SPREAD_LOWEST_S) and _about(output_first, SPREAD_LOWEST_S)
    assert _about(bot_later, JITTER_LOWEST_S) and _about(output_later, JITTER_LOWEST_S)


def test_an_output_back_from_failures_spreads_its_next_renewal_over_the_interval(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    outputs = {"late": (tmp_path / "late", ["ops"])}
    daemon = _daemon(_config(service, token, outputs), FakeNotifier(), rng=LowestRandom())

    async def scenario() -> tuple[timedelta, timedelta]:
        await _until(lambda: _status(daemon, "late") is Status.UNHEALTHY, "late to fail")
        create_login_roles(service.cluster, "ops")
        admin.update_bot_roles(service.cluster, BOT, add=("ops",))
        daemon._schedule(BOT_TASK, utc_now())
        await _until(lambda: _status(daemon, "late") is Status.HEALTHY, "late to recover", 5)
        return _planned_delay(daemon, BOT_TASK), _planned_delay(daemon, "late")

    bot, late = _drive(daemon, scenario)

    assert _about(late, SPREAD_LOWEST_S)  # back from a failure: spread
    assert _about(bot, JITTER_LOWEST_S)  # renewed without a failure: the usual jitter
