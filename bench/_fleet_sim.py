"""One simulator process of the fleet benchmark: many bots on one asyncio loop.

    python bench/_fleet_sim.py PLAN.json RESULTS.jsonl

Each bot runs tbot-py's own code against the real auth service over real TLS: it joins
with its token (``obtain_bot_identity``: the pinned CA fetch, then the join), then renews
its identity (``obtain_bot_identity`` again: a fresh key, mTLS with the current
certificate) whenever the daemon's schedule says so, by the daemon's own rule: after the
first success of a (re)start and after a success that ends failures,
``schedule.first_renewal`` (anywhere in the interval); otherwise ``schedule.next_renewal``
(+-10 %, counted from the start of the renewal); failures back off with
``schedule.retry_time``. At its ``restart_at`` a bot renews at once, as a restarted daemon
does with its stored identity. Storage is in memory. Every operation's start, latency and
outcome goes to RESULTS.jsonl, one JSON object per line, when the run ends; so does every
HTTP request the client made (its start, and the time to its answer: what the server's
clients see).

The plan (written by ``bench/fleet.py``) holds the address, the CA pin, the epoch (wall
clock) all times are relative to, the schedule parameters (TTL, interval and the minimum
spacing, all compressed alike) and one entry per bot: token, join_at, restart_at.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tbot_py.bot import schedule
from tbot_py.bot.identity import JoinParams, obtain_bot_identity
from tbot_py.client.http import AuthClient
from tbot_py.destinations import MemoryDestination
from tbot_py.identity.model import Identity


@dataclass
class Plan:
    addr: str
    ca_pin: str
    epoch: float  # time.time() at which t=0
    duration: float
    ttl: timedelta
    interval: timedelta
    min_spacing: timedelta
    seed: int
    bots: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Plan:
        doc = json.loads(path.read_text())
        return cls(
            addr=doc["addr"],
            ca_pin=doc["ca_pin"],
            epoch=doc["epoch"],
            duration=doc["duration"],
            ttl=timedelta(seconds=doc["ttl_s"]),
            interval=timedelta(seconds=doc["interval_s"]),
            min_spacing=timedelta(seconds=doc["min_spacing_s"]),
            seed=doc["seed"],
            bots=doc["bots"],
        )


def utc_now() -> datetime:
    return datetime.now(UTC)


def _outcome(exc: BaseException) -> str:
    """An error's kind for the report: its class, and its HTTP status when it has one."""
    status = getattr(exc, "status", None)
    return type(exc).__name__ + (f" {status}" if status is not None else "")


class Fleet:
    """The bots of one process and the record of every operation they made."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)  # noqa: S311 - jitter, as the daemon's
        #: (due, started, latency ms, kind, outcome) per operation; due and started in s from t=0.
        self.records: list[tuple[float, float, float, str, str]] = []
        #: (started, latency ms, path, outcome) per HTTP request.
        self.requests: list[tuple[float, float, str, str]] = []
        self._time_requests()

    def _time_requests(self) -> None:
        """Wrap the real client's one request method to time every request it makes."""
        request = AuthClient._request
        fleet = self

        async def timed(
            client: AuthClient, method: str, path: str, body: dict[str, Any] | None = None
        ) -> bytes:
            start, t0, outcome = fleet._since_epoch(), time.perf_counter(), "ok"
            try:
                return await request(client, method, path, body)
            except Exception as exc:
                outcome = _outcome(exc)
                raise
            finally:
                ms = (time.perf_counter() - t0) * 1000
                fleet.requests.append((start, ms, path.partition("?")[0], outcome))

        AuthClient._request = timed  # type: ignore[method-assign]

    def _since_epoch(self) -> float:
        return time.time() - self.plan.epoch

    async def _sleep_until(self, t: float) -> None:
        delay = t - self._since_epoch()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _obtain(
        self, kind: str, due: float, params: JoinParams, storage: MemoryDestination
    ) -> Identity:
        start = self._since_epoch()
        t0 = time.perf_counter()
        outcome = "ok"
        try:
            return await obtain_bot_identity(params, storage, self.plan.ttl, utc_now)
        except Exception as exc:
            outcome = _outcome(exc)
            raise
        finally:
            latency = (time.perf_counter() - t0) * 1000
            self.records.append((due, start, latency, kind, outcome))

    async def bot(self, spec: dict[str, Any]) -> None:
        """One bot's life: join at join_at, renew on schedule, renew at once at restart_at."""
        plan = self.plan
        params = JoinParams(addr=plan.addr, token=spec["token"], ca_pins=(plan.ca_pin,))
        storage = MemoryDestination()
        storage.init()
        restart_at: float | None = spec.get("restart_at")
        backoff = schedule.Backoff()
        identity: Identity | None = None
        kind, next_at = "join", float(spec["join_at"])
        started = True  # the next success is the first of this (re)start
        while True:
            if restart_at is not None and restart_at <= next_at:
                kind, next_at, restart_at = "restart", restart_at, None
                started, backoff = True, schedule.Backoff()  # a new process
            if next_at >= plan.duration:
                return
            await self._sleep_until(next_at)
            began = utc_now()
            try:
                identity = await self._obtain(kind, next_at, params, storage)
            except Exception:
                backoff = backoff.increment()
                when = schedule.retry_time(
                    now=utc_now(),
                    backoff=backoff,
                    rand=self.rng.random(),
                    not_after=identity.not_after if identity else None,
                )
            else:
                # The daemon's rule (Daemon._on_success): spread after a start or failures.
                spread, started = started or backoff.failures > 0, False
                backoff = backoff.reset()
                if spread:
                    when = schedule.first_renewal(
                        now=utc_now(),
                        not_before=identity.not_before,
                        not_after=identity.not_after,
                        renewal_interval=plan.interval,
                        rand=self.rng.random(),
                        min_spacing=plan.min_spacing,
                    )
                else:
                    when = schedule.next_renewal(
                        now=utc_now(),
                        not_before=identity.not_before,
                        not_after=identity.not_after,
                        renewal_interval=plan.interval,
                        jitter=self.rng.uniform(-1.0, 1.0),
                        min_spacing=plan.min_spacing,
                        started=began,
                    )
            kind = "join" if identity is None else "renew"
            next_at = when.timestamp() - plan.epoch

    async def run(self) -> None:
        await asyncio.gather(*(self.bot(spec) for spec in self.plan.bots))


def main() -> int:
    plan_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    plan = Plan.load(plan_path)
    fleet = Fleet(plan)
    asyncio.run(fleet.run())
    with out_path.open("w") as out:
        for due, start, latency, kind, outcome in fleet.records:
            op = {"due": due, "t": start, "ms": latency, "kind": kind, "outcome": outcome}
            out.write(json.dumps({"op": op}) + "\n")
        for start, latency, path, outcome in fleet.requests:
            req = {"t": start, "ms": latency, "path": path, "outcome": outcome}
            out.write(json.dumps({"request": req}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
