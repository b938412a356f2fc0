"""Background mode: keep the bot identity and every output fresh until told to stop.

One *task* per credential: the bot's own identity (named ``identity``, as in
tbot) and one per output service. Each task runs, then schedules its own next
run from the certificate it actually got (:mod:`tbot_py.bot.schedule`):

- success: at ``renewal_interval`` (±10 %) from the start of the run, never later
  than ⅓ of the issued lifetime before NotAfter, never sooner than a minimum spacing
  after its end; the first success after a start or after failures draws its next
  run from the whole interval instead, so a fleet restarted together does not stay
  in step;
- failure: capped exponential backoff with full jitter, always before the
  credential expires, and slowly (never hammering) for errors retrying cannot fix.

Runs are APScheduler 3 date jobs on the wall clock (``misfire_grace_time=None``:
a late run is never skipped). asyncio timers use the monotonic clock, which
stops while the host is suspended, so a 10 s tick keeps the scheduler looking
at the wall clock: an overdue renewal runs within seconds of waking up.

Outputs are isolated: each is its own task with its own backoff, and they
share only the bot's client. Up to ``OUTPUT_CONCURRENCY`` of them renew at once,
over that client's kept-alive connections, and their files are written in worker
threads. Output directories are watched (inotify): a file deleted, replaced or
chmodded by someone else is rewritten at once.

Signals: SIGUSR1 renews everything now; SIGHUP re-reads and validates the
config and swaps services (a broken file is logged and the running config
kept); SIGTERM/SIGINT let in-flight writes finish and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MAX_INSTANCES
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from tbot_py.bot import schedule
from tbot_py.bot.identity import Clock, JoinParams, describe, obtain_bot_identity
from tbot_py.bot.oneshot import build_destination, build_services, join_params, utc_now
from tbot_py.client import tls, wire
from tbot_py.client.http import AuthClient
from tbot_py.config.schema import BotConfig
from tbot_py.destinations import Destination
from tbot_py.errors import Error
from tbot_py.identity.model import Identity
from tbot_py.services.base import BotContext, OutputService, Validity
from tbot_py.services.hooks import Hook, run_hooks

if TYPE_CHECKING:
    from tbot_py.bot.watch import ConfigWatcher, DirectoryWatcher
    from tbot_py.diagnostics.health import HealthRegistry
    from tbot_py.diagnostics.sdnotify import Notifier

log = logging.getLogger("tbot_py.bot")

BOT_TASK = "identity"
#: How often the scheduler re-reads the wall clock (suspend/resume, clock jumps).
WALL_CLOCK_TICK = timedelta(seconds=10)
#: How long SIGTERM waits for runs in flight to finish their writes.
SHUTDOWN_GRACE = 30.0
#: A client replaced by a renewal stays open this long for requests still using it.
OLD_CLIENT_GRACE = 60.0
#: A run due this close to its output's expiry comes too late (see ``Daemon._cut_short``).
EXPIRY_MARGIN = timedelta(seconds=2)
#: How many outputs renew at once. They share the bot's client: a bound lets a cycle of
#: many outputs reuse a few kept-alive connections instead of opening one per output.
OUTPUT_CONCURRENCY = 8


@dataclass
class BotState:
    """The bot's current identity and the client and cluster facts built from it."""

    identity: Identity
    client: AuthClient
    ping: wire.PingResponse
    cert_authorities: tuple[wire.CertAuthority, ...]


@dataclass
class Task:
    """One credential the daemon keeps fresh, with its own schedule and failure state."""

    name: str
    service_type: str
    interval: timedelta
    output: OutputService | None = None
    hooks: tuple[Hook, ...] = ()
    backoff: schedule.Backoff = field(default_factory=schedule.Backoff)
    not_after: datetime | None = None
    succeeded_once: bool = False
    #: The directory and file names the watcher was last given for this output.
    watched: tuple[str, frozenset[str]] | None = None


class Daemon:
    """Runs one validated config in background mode until stopped."""

    def __init__(
        self,
        config: BotConfig,
        *,
        clock: Clock = utc_now,
        executable: str = "tbot-py",
        reload: Callable[[], BotConfig] | None = None,
        notifier: Notifier | None = None,
        health: HealthRegistry | None = None,
        rng: random.Random | None = None,
        after_renew_response: Callable[[], None] | None = None,
        watch_config: str | None = None,
        output_concurrency: int = OUTPUT_CONCURRENCY,
    ) -> None:
        from tbot_py.diagnostics.health import HealthRegistry

        self.config = config
        self.clock = clock
        self.executable = executable
        self._reload = reload
        self.notifier = notifier
        self.health = health or HealthRegistry(clock)
        self.rng = rng or random.SystemRandom()
        self._after_renew_response = after_renew_response
        self._tasks: dict[str, Task] = {}
        self._bot: BotState | None = None
        self._params: JoinParams | None = None
        self._storage: Destination | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._ready_sent = False
        self._next_runs: dict[str, datetime] = {}
        self._retired_clients: list[AuthClient] = []
        self._watch_config = watch_config
        self._files: DirectoryWatcher | None = None
        self._config_watcher: ConfigWatcher | None = None
        self._pending_outputs: list[Task] = []
        self._output_slots = asyncio.Semaphore(output_concurrency)
        # Registered at once: /readyz must never be healthy before anything was written.
        self.health.register(BOT_TASK, "bot")

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (returns) or a fatal start-up error (raises)."""
        loop = asyncio.get_running_loop()
        storage = build_destination(self.config.storage)
        storage.init()
        self._params = join_params(self.config)
        # Fail fast on a bad destination, before any network; report each output as
        # initializing from now on, so /readyz is never healthy before they are written.
        self._pending_outputs = self._prepare_outputs(self.config)
        for output_task in self._pending_outputs:
            self.health.register(output_task.name, output_task.service_type)
        with storage.lock():
            self._storage = storage
            self._install_signal_handlers(loop)
            self._scheduler = AsyncIOScheduler(
                timezone=UTC,
                job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
            )
            self._scheduler.add_listener(
                self._on_job_event, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MAX_INSTANCES
            )
            self._scheduler.start()
            self._scheduler.add_job(
                _wall_clock_tick,
                "interval",
                seconds=WALL_CLOCK_TICK.total_seconds(),
                id="wall-clock-tick",
            )
            self._tasks[BOT_TASK] = Task(BOT_TASK, "bot", self.config.renewal_interval)
            self._start_watchers(loop)
            self._schedule(BOT_TASK, self.clock())
            if self.notifier is not None:
                self._spawn(self.notifier.run_watchdog(self._stop))
                self.notifier.status("joining the cluster")
            try:
                await self._stop.wait()
            finally:
                await self._shutdown()
        if self._fatal is not None:
            raise self._fatal

    def stop(self) -> None:
        """Ask the daemon to finish what is in flight and return."""
        self._stop.set()

    def _start_watchers(self, loop: asyncio.AbstractEventLoop) -> None:
        from tbot_py.bot.watch import ConfigWatcher, DirectoryWatcher

        self._files = DirectoryWatcher(loop)
        self._files.start()
        if self._watch_config:
            self._config_watcher = ConfigWatcher(
                loop, self._watch_config, lambda: self._spawn(self.reload())
            )
            self._config_watcher.start()

    def _on_tampered(self, name: str) -> None:
        """An output's files were deleted or changed by someone else: rewrite them now."""
        if name in self._tasks:
            self._schedule(name, self.clock())

    async def _shutdown(self) -> None:
        if self.notifier is not None:
            self.notifier.stopping()
        for watcher in (self._files, self._config_watcher):
            if watcher is not None:
                watcher.stop()
        if self._scheduler is not None:
            # Start nothing new, let what runs finish its writes, then stop: APScheduler's
            # shutdown cancels the jobs still running.
            self._scheduler.pause()
        if self._inflight:
            log.info("waiting for %d run(s) in flight to finish", len(self._inflight))
            _, pending = await asyncio.wait(self._inflight, timeout=SHUTDOWN_GRACE)
            for task in pending:
                task.cancel()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        clients = [*self._retired_clients, *([self._bot.client] if self._bot else [])]
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        log.info("stopped")

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
        loop.add_signal_handler(signal.SIGUSR1, self.renew_all_now)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))

    def _on_stop_signal(self, name: str) -> None:
        log.info("%s received: finishing runs in flight, then exiting", name)
        self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- scheduling -----------------------------------------------------------------------

    def _on_job_event(self, event: Any) -> None:
        """Book a task's next run once its current run has fully ended.

        APScheduler counts a run as running until just after the coroutine returns;
        a job re-added before that (a retry due at once) would be skipped and dropped.
        Listeners run after the count drops, so the next run is booked here.
        """
        name = event.job_id
        if name in self._next_runs:
            self._schedule(name, self._next_runs.pop(name))
        elif event.code == EVENT_JOB_MAX_INSTANCES and name in self._tasks:
            self._schedule(name, self.clock() + timedelta(seconds=1))

    def _book(self, name: str, when: datetime) -> None:
        """From inside a run: schedule the next run of ``name`` once this one has ended."""
        self._next_runs[name] = when

    def _schedule(self, name: str, when: datetime) -> None:
        if self._scheduler is None or self._stop.is_set():
            return
        self._scheduler.add_job(
            self._run_task,
            "date",
            run_date=when,
            args=[name],
            id=name,
            replace_existing=True,
            misfire_grace_time=None,
        )

    def renew_all_now(self) -> None:
        """SIGUSR1: run every task now (those running now reschedule themselves)."""
        log.info("SIGUSR1 received: renewing every credential now")
        now = self.clock()
        for name in self._tasks:
            self._run_soon(name, now)

    def _run_soon(self, name: str, now: datetime) -> None:
        """Move the next run of ``name`` to ``now``; a task running now reschedules itself."""
        if name in self._next_runs:
            # Its run has ended and booked the next one, which the scheduler's listener
            # has not made yet: book it for now instead (else the request would be lost).
            self._next_runs[name] = now
        elif self._scheduler is not None and self._scheduler.get_job(name) is not None:
            self._schedule(name, now)

    def _cut_short(self, output: Task, bot_not_after: datetime | None) -> bool:
        """Whether the old bot identity cut ``output`` so short that it expires before its next run.

        Its certificate ends no later than the bot's previous one did (the auth service
        caps it there), and its next run is due after that end, or less than
        :data:`EXPIRY_MARGIN` before it: with lifetimes near ``MIN_SPACING`` (the least
        time between two runs) the destination would otherwise hold an expired
        certificate until that run.
        """
        if output.not_after is None or bot_not_after is None or output.not_after > bot_not_after:
            return False
        due = self._next_runs.get(output.name)
        job = self._scheduler.get_job(output.name) if self._scheduler is not None else None
        if due is None and job is not None:
            due = job.next_run_time
        return due is None or due > output.not_after - EXPIRY_MARGIN

    async def _run_task(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is None:  # removed by a reload
            return
        current = asyncio.current_task()
        if current is not None:
            self._inflight.add(current)
        started = time.monotonic()
        files: tuple[str, ...] = ()
        changed = False
        identity: Validity
        try:
            if task.output is None:
                identity = await self._renew_bot()
            else:
                async with self._output_slots:
                    result = await task.output.generate(self._bot_context())
                identity, changed, files = result.identity, result.changed, result.files
                self._watch_output(task, result.written)
        except Exception as exc:  # every failure is classified; none escapes the loop
            self._on_failure(task, exc, time.monotonic() - started)
        else:
            self._on_success(task, identity, time.monotonic() - started)
            if changed and task.hooks and task.output is not None:
                self._spawn(self._run_hooks(task, files))
        finally:
            if current is not None:
                self._inflight.discard(current)

    def _watch_output(self, task: Task, written: Mapping[str, bytes]) -> None:
        path = getattr(getattr(task.output, "destination", None), "path", None)
        if self._files is None or path is None:
            return
        # Watch again only what changed: each watch() re-indexes every output's files.
        watched = (str(path), frozenset(written))
        if task.watched != watched:
            self._files.watch(task.name, str(path), written, self._on_tampered)
            task.watched = watched
        self._files.expect_writes(task.name, written)

    def _on_success(self, task: Task, identity: Validity, duration: float) -> None:
        now = self.clock()
        attempt = task.backoff.failures
        task.backoff = task.backoff.reset()
        previous_not_after, task.not_after = task.not_after, identity.not_after
        first = not task.succeeded_once
        task.succeeded_once = True
        if first or attempt:
            # After a start or a recovery, anywhere in the interval: daemons restarted
            # together (or back from one outage) must not stay in step.
            when = schedule.first_renewal(
                now=now,
                not_before=identity.not_before,
                not_after=identity.not_after,
                renewal_interval=task.interval,
                rand=self.rng.random(),
            )
        else:
            when = schedule.next_renewal(
                now=now,
                not_before=identity.not_before,
                not_after=identity.not_after,
                renewal_interval=task.interval,
                jitter=self.rng.uniform(-1.0, 1.0),
                started=now - timedelta(seconds=duration),
            )
        self.health.report_success(
            task.name, not_after=identity.not_after, next_renewal=when, duration=duration,
            attempt=attempt,
        )  # fmt: skip
        log.info(
            "%s: renewed, valid %s to %s, next renewal at %s",
            task.name,
            _iso(identity.not_before),
            _iso(identity.not_after),
            _iso(when),
        )
        self._book(task.name, when)
        if task.name == BOT_TASK and first:
            self._start_first_outputs()
        elif task.name == BOT_TASK:
            # A fresh bot identity (after an outage, a re-join with a new token, a removed
            # lock) may be what failing outputs were missing: retry them now, not after
            # their backoff or their slow fatal retry. An output the old identity cut short
            # (no certificate outlives the bot's) is renewed now too, if it would otherwise
            # expire before its next run.
            for output in self._tasks.values():
                if output.name != BOT_TASK and (
                    output.backoff.failures or self._cut_short(output, previous_not_after)
                ):
                    self._run_soon(output.name, now)
        self._maybe_ready()

    def _on_failure(self, task: Task, exc: BaseException, duration: float) -> None:
        now = self.clock()
        kind = schedule.classify(exc)
        task.backoff = task.backoff.increment()
        reason = str(exc) if isinstance(exc, Error) else f"{type(exc).__name__}: {exc}"
        if kind is schedule.ErrorKind.FATAL:
            if task.name == BOT_TASK and self._bot is None:
                # Nothing to keep running with (tbot: a failed first join is fatal).
                log.error("cannot obtain a bot identity: %s", reason)
                self._fatal = exc
                self.stop()
                return
            # Retrying cannot fix this; retry slowly so a fix (a removed lock, a new
            # token) is picked up without a restart, but never hammer the server.
            when = now + max(task.interval, task.backoff.cap)
            log.error(
                "%s: FAILED, will not recover by retrying: %s (next attempt at %s)",
                task.name, reason, _iso(when),
            )  # fmt: skip
        else:
            if kind is schedule.ErrorKind.REJOIN and task.name != BOT_TASK:
                # The bot identity itself was refused as expired: renew it first.
                self._schedule(BOT_TASK, now)
            when = schedule.retry_time(
                now=now, backoff=task.backoff, rand=self.rng.random(), not_after=task.not_after
            )
            log.warning(
                "%s: attempt %d failed: %s (retrying at %s)",
                task.name, task.backoff.failures, reason, _iso(when),
            )  # fmt: skip
        self.health.report_failure(task.name, reason, next_retry=when, duration=duration)
        self._book(task.name, when)

    def _start_first_outputs(self) -> None:
        tasks, self._pending_outputs = self._pending_outputs, []
        self._start_outputs(tasks)

    def _maybe_ready(self) -> None:
        if self._ready_sent or self.notifier is None:
            return
        if all(t.succeeded_once for t in self._tasks.values()):
            self._ready_sent = True
            self.notifier.ready()
            self.notifier.status(f"{len(self._tasks) - 1} output(s) fresh")

    # -- the bot identity -----------------------------------------------------------------

    async def _renew_bot(self) -> Identity:
        assert self._storage is not None
        # Re-read the token every time (tbot does): a changed token means a fresh join.
        self._params = join_params(self.config)
        identity = await obtain_bot_identity(
            self._params,
            self._storage,
            self.config.credential_ttl,
            self.clock,
            self._after_renew_response,
        )
        await self._swap_bot_state(identity)
        log.info("bot identity: %s", describe(identity))
        return identity

    async def _swap_bot_state(self, identity: Identity) -> None:
        """Outputs use a client built from the newest bot identity from now on."""
        assert self._params is not None
        ctx = tls.mtls_context(
            identity.tls_cert_pem, identity.private_key_pem, identity.tls_ca_pems
        )
        client = AuthClient(self._params.addr, ctx)
        old = self._bot
        try:
            ping, cas = await asyncio.gather(client.ping(), client.cert_authorities())
        except Error:
            if old is None:
                await client.close()
                raise
            # The identity is saved; keep the cluster facts we had and refresh them next time.
            log.warning("could not refresh cluster CAs; keeping the previous ones")
            ping, cas = old.ping, list(old.cert_authorities)
        self._bot = BotState(identity, client, ping, tuple(cas))
        if old is not None:
            self._retired_clients.append(old.client)
            asyncio.get_running_loop().call_later(
                OLD_CLIENT_GRACE, lambda: self._spawn(self._retire(old.client))
            )

    async def _retire(self, client: AuthClient) -> None:
        if client in self._retired_clients:
            self._retired_clients.remove(client)
            await client.close()

    def _bot_context(self) -> BotContext:
        bot = self._bot
        if bot is None:
            raise RuntimeError("outputs run only once the bot identity is ready")
        return BotContext(
            client=bot.client,
            bot_identity=bot.identity,
            ping=bot.ping,
            cert_authorities=bot.cert_authorities,
            clock=self.clock,
            executable=self.executable,
        )

    # -- outputs and reload ---------------------------------------------------------------

    def _prepare_outputs(self, config: BotConfig) -> list[Task]:
        """A task per configured output, destinations prepared; raises before anything changes."""
        tasks = []
        outputs = build_services(config, config.require_address())
        for svc_config, output in zip(config.services, outputs, strict=True):
            output.init()
            _, interval = svc_config.effective_lifetime(config)
            hooks = svc_config.hook_list()
            tasks.append(Task(output.name, svc_config.type, interval, output=output, hooks=hooks))
        return tasks

    def _start_outputs(self, tasks: list[Task]) -> None:
        """Run each output task now (registering any the health registry does not know)."""
        now = self.clock()
        for task in tasks:
            self._tasks[task.name] = task
            if self.health.get(task.name) is None:
                self.health.register(task.name, task.service_type)
            self._schedule(task.name, now)

    def _stop_outputs(
        self, names: list[str], keep_health: set[str] | frozenset[str] = frozenset()
    ) -> None:
        for name in names:
            self._tasks.pop(name, None)
            self._next_runs.pop(name, None)
            if name not in keep_health:
                self.health.unregister(name)
            if self._files is not None:
                self._files.unwatch(name)
            if self._scheduler is not None and self._scheduler.get_job(name) is not None:
                self._scheduler.remove_job(name)

    async def reload(self) -> None:
        """SIGHUP: re-read and validate the config; swap services only if it is valid."""
        if self._reload is None:
            log.warning("SIGHUP received but there is no config file to reload; renewing instead")
            self.renew_all_now()
            return
        log.info("SIGHUP received: reloading the config")
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            new = self._reload()
            if new.storage != self.config.storage:
                raise Error("storage cannot change while running; restart tbot-py to move it")
            params = join_params(new)
            outputs = self._prepare_outputs(new)
        except Error as exc:
            log.error("reload failed, keeping the running config: %s", exc)
        else:
            kept = {t.name for t in outputs}
            old_config, old_params = self.config, self._params
            self.config, self._params = new, params
            running = [name for name in self._tasks if name != BOT_TASK]
            pending = [t.name for t in self._pending_outputs]
            # Outputs that stay keep their health record, so /readyz does not flap.
            self._stop_outputs(running + pending, keep_health=kept)
            self._tasks[BOT_TASK].interval = new.renewal_interval
            if self._bot is not None:
                self._start_outputs(outputs)
            else:  # still joining: the new outputs start once the bot identity is ready
                self._pending_outputs = outputs
                for task in outputs:
                    if self.health.get(task.name) is None:
                        self.health.register(task.name, task.service_type)
            if _bot_settings(old_config) != _bot_settings(new) or old_params != params:
                self._schedule(BOT_TASK, self.clock())
            log.info("reloaded: %d output(s) configured", len(outputs))
        if self.notifier is not None and self._ready_sent:
            self.notifier.ready()  # back from RELOADING=1; never READY before start-up is done

    async def _run_hooks(self, task: Task, files: tuple[str, ...]) -> None:
        assert task.output is not None
        destination = getattr(task.output, "destination", None)
        path = getattr(destination, "path", None)
        await run_hooks(
            task.hooks,
            service=task.name,
            destination=destination.describe() if destination is not None else "",
            directory=str(path) if path is not None else None,
            files=files,
            log=log,
        )


def _bot_settings(config: BotConfig) -> tuple[object, ...]:
    return (
        config.proxy_server,
        config.auth_server,
        config.onboarding,
        config.credential_ttl,
        config.renewal_interval,
    )


def _wall_clock_tick() -> None:
    """Does nothing: running at all makes the scheduler re-check due jobs on the wall clock."""


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
