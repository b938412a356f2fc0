"""The daemon with many outputs: concurrent but bounded renewals, and the watcher during them.

Same harness as ``test_daemon.py``: a real in-process auth service, ``Daemon.run()`` under
``asyncio.run``, behaviour triggered the way the signal handlers would.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

from tbot_py.authservice.server import RunningAuthService
from tbot_py.bot.daemon import Daemon
from tbot_py.diagnostics.health import HealthRegistry
from tbot_py.services.base import BotContext, GenerateResult, OutputService
from tests.unit.bot.test_daemon import (
    START_TIMEOUT,
    TIMEOUT,
    FakeNotifier,
    _config,
    _drive,
    _until,
)
from tests.unit.conftest import utc_now

Generate = Callable[[BotContext], Awaitable[GenerateResult]]


def _daemon(service: RunningAuthService, token: str, outputs: dict[str, Path], **kw: int) -> Daemon:
    config = _config(service, token, {name: (path, ["dev"]) for name, path in outputs.items()})
    return Daemon(
        config,
        notifier=FakeNotifier(),
        health=HealthRegistry(utc_now),
        rng=random.Random(1),
        **kw,  # type: ignore[arg-type]
    )


def _outputs(daemon: Daemon) -> list[OutputService]:
    """The outputs run() prepared; call right after it started (they wait for the join)."""
    outputs = [task.output for task in daemon._pending_outputs]
    assert outputs and all(output is not None for output in outputs)
    return [output for output in outputs if output is not None]


def _wrap(
    output: OutputService, wrapper: Callable[[Generate, BotContext], Awaitable[GenerateResult]]
) -> None:
    generate = output.generate

    async def wrapped(bot: BotContext) -> GenerateResult:
        return await wrapper(generate, bot)

    output.generate = wrapped  # type: ignore[method-assign]


def _ready(daemon: Daemon) -> Callable[[], bool]:
    notifier = daemon.notifier
    assert isinstance(notifier, FakeNotifier)
    return lambda: "ready" in notifier.events


def test_outputs_renew_concurrently_but_never_more_than_the_bound(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    daemon = _daemon(
        service, token, {f"o{i}": tmp_path / f"o{i}" for i in range(6)}, output_concurrency=2
    )
    in_flight, peaks = 0, []

    async def counted(generate: Generate, bot: BotContext) -> GenerateResult:
        nonlocal in_flight
        in_flight += 1
        peaks.append(in_flight)
        try:
            await asyncio.sleep(0.05)  # long enough for every other output to try to start
            return await generate(bot)
        finally:
            in_flight -= 1

    async def scenario() -> None:
        await asyncio.sleep(0)
        for output in _outputs(daemon):
            _wrap(output, counted)
        await _until(_ready(daemon), "READY", START_TIMEOUT)
        peaks.clear()
        daemon.renew_all_now()
        await _until(lambda: len(peaks) == 6 and in_flight == 0, "a second cycle")

    _drive(daemon, scenario)

    assert max(peaks) == 2


def test_a_change_reported_while_an_output_renews_does_not_run_it_again(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    """Writes run in a worker thread, so the watcher may judge an output mid-write.

    What it reports then must not cost another renewal: the run's own booking wins.
    """
    daemon = _daemon(service, token, {"a": tmp_path / "a"})
    runs = 0

    async def reported_mid_run(generate: Generate, bot: BotContext) -> GenerateResult:
        nonlocal runs
        runs += 1
        daemon._on_tampered("a")  # as the watcher would, judging files mid-write
        return await generate(bot)

    async def scenario() -> None:
        await asyncio.sleep(0)
        _wrap(_outputs(daemon)[0], reported_mid_run)
        await _until(_ready(daemon), "READY", START_TIMEOUT)
        await asyncio.sleep(1.5)  # a rerun would come within 1 s (the job is busy, retry +1 s)

    _drive(daemon, scenario)

    assert runs == 1


def test_renewals_keep_watching_outputs_without_watching_them_again(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    daemon = _daemon(service, token, {"a": tmp_path / "a"})
    identity, tlscert = tmp_path / "a" / "identity", tmp_path / "a" / "tlscert"
    watch_calls = 0

    async def scenario() -> None:
        nonlocal watch_calls
        await _until(_ready(daemon), "READY", START_TIMEOUT)
        files = daemon._files
        assert files is not None
        watch = files.watch

        def counting_watch(*args: object, **kwargs: object) -> None:
            nonlocal watch_calls
            watch_calls += 1
            watch(*args, **kwargs)  # type: ignore[arg-type]

        files.watch = counting_watch  # type: ignore[method-assign]
        before = tlscert.read_bytes()
        daemon.renew_all_now()
        await _until(lambda: tlscert.read_bytes() != before, "a renewed output")
        await asyncio.sleep(0.2)  # the run ends after its write
        identity.unlink()
        await _until(identity.exists, "the deleted file to come back", TIMEOUT + 1)

    _drive(daemon, scenario)

    assert watch_calls == 0


def test_renew_all_now_as_a_run_ends_still_renews_that_output(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    """SIGUSR1 between the end of a run and the scheduler booking its next one is not lost."""
    daemon = _daemon(service, token, {"a": tmp_path / "a"})
    notifier = daemon.notifier
    assert isinstance(notifier, FakeNotifier)
    runs = 0

    async def counted(generate: Generate, bot: BotContext) -> GenerateResult:
        nonlocal runs
        runs += 1
        return await generate(bot)

    def renew_when_ready() -> bool:
        # READY is sent from the last output's run, once it has booked its next run.
        daemon.renew_all_now()
        return FakeNotifier.ready(notifier)

    notifier.ready = renew_when_ready  # type: ignore[method-assign]

    async def scenario() -> None:
        await asyncio.sleep(0)
        _wrap(_outputs(daemon)[0], counted)
        await _until(lambda: runs == 2, "a second run of a", START_TIMEOUT)

    _drive(daemon, scenario)
