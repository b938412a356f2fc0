"""Fan-out: one daemon with 1, 10 and 100 identity outputs; the time of a full renewal cycle.

A real auth service and a real daemon (``tbot-py start -c``, background mode), each output
a directory destination. Once every output is written, SIGUSR1 asks the daemon to renew
everything now. A cycle is timed from the signal until the bot storage holds a new bot
certificate and every output's ``..data`` link points at a new version directory (each
write publishes a new one). The ratio t(100)/t(1) shows whether outputs are renewed
concurrently over shared connections or one after another: a serial loop takes about 100x.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import TBOT, AuthService, Context, Row, Stats, auth_service, clean_env, stop_process

NAME = "fanout"
COUNTS = (1, 10, 100)
TARGET_RATIO = 25.0
POLL_S = 0.005
CYCLE_TIMEOUT_S = 60.0
SETTLE_S = 1.0  # between cycles: past the watcher's 0.5 s debounce, so its checks finish

Popen = subprocess.Popen[bytes]


def write_config(work: Path, auth: AuthService, token_file: Path, outputs: int) -> Path:
    """A daemon config with ``outputs`` identity outputs in ``work/out/<i>``."""
    services = "".join(
        f"  - type: identity\n    name: out-{i}\n"
        f"    destination: {{type: directory, path: {work / 'out' / str(i)}}}\n"
        for i in range(outputs)
    )
    path = work / "tbot.yaml"
    path.write_text(
        f"version: v2\nproxy_server: {auth.addr}\n"
        f"onboarding: {{token: {token_file}, ca_pins: ['{auth.ca_pin}']}}\n"
        f"storage: {{type: directory, path: {work / 'storage'}}}\n"
        "credential_ttl: 1h\nrenewal_interval: 20m\n"
        f"services:\n{services}"
    )
    return path


def _state(path: Path) -> bytes | str | None:
    """What changes when ``path`` is rewritten; None while it was never written.

    For an output, where its ``..data`` link points. For the bot storage, the bot
    certificate itself: its ``..data`` also moves when the renewal key is stored,
    before the renewal is sent.
    """
    try:
        if path.name == "storage":
            return (path / "tlscert").read_bytes()
        return os.readlink(path / "..data")
    except OSError:
        return None


@contextmanager
def running_daemon(config: Path, log: Path) -> Iterator[Popen]:
    """``tbot-py start -c config`` (background mode), logging to ``log``; stopped on exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [TBOT, "start", "-c", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
        )  # fmt: skip
        try:
            yield process
        finally:
            stop_process(process, timeout=30)


def wait_rewritten(paths: list[Path], before: list[bytes | str | None], daemon: Popen) -> float:
    """Seconds until every path's state differs from ``before`` and is not None."""
    start = time.perf_counter()
    pending = list(zip(paths, before, strict=True))
    while True:
        pending = [(p, b) for p, b in pending if _state(p) in (None, b)]
        if not pending:
            return time.perf_counter() - start
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with {daemon.returncode}")
        if time.perf_counter() - start > CYCLE_TIMEOUT_S:
            raise RuntimeError(f"{len(pending)} output(s) not rewritten in {CYCLE_TIMEOUT_S} s")
        # Poll finely for short cycles, coarsely for long ones: the poller shares the cores.
        time.sleep(max(POLL_S, 0.01 * (time.perf_counter() - start)))


def measure_cycles(
    auth: AuthService, work: Path, outputs: int, repeats: int, warmup: int
) -> tuple[Stats, float]:
    """Cycle times (ms) of one daemon with ``outputs`` outputs; and its first write (s)."""
    work.mkdir(parents=True)
    token_file = work / "token"
    token_file.write_text(auth.add_bot(f"fanout-{outputs}"))
    config = write_config(work, auth, token_file, outputs)
    paths = [work / "out" / str(i) for i in range(outputs)] + [work / "storage"]
    with running_daemon(config, work / "daemon.log") as daemon:
        first = wait_rewritten(paths, [None] * len(paths), daemon)
        times: list[float] = []
        for i in range(warmup + repeats):
            time.sleep(SETTLE_S)
            before = [_state(p) for p in paths]
            daemon.send_signal(signal.SIGUSR1)
            elapsed = wait_rewritten(paths, before, daemon)
            if i >= warmup:
                times.append(elapsed * 1000)
    return Stats.of(times), first


def run(ctx: Context) -> list[Row]:
    repeats = ctx.reps(9, quick=3)
    warmup = 1 if ctx.quick else 2
    results: dict[int, tuple[Stats, float]] = {}
    with auth_service(ctx.work / "auth") as auth:
        for n in COUNTS:
            results[n] = measure_cycles(auth, ctx.work / f"n{n}", n, repeats, warmup)
            stats, first = results[n]
            ctx.log(f"   {n} output(s): {stats.text('ms')}; first write of all after {first:.1f} s")
    base, _ = results[1]
    rows = [
        Row(NAME, "renewal cycle, 1 output", base.median, "ms", ours_text=base.text("ms"),
            notes="SIGUSR1 until the bot certificate and every output are rewritten"),
    ]  # fmt: skip
    for n in COUNTS[1:]:
        stats, first = results[n]
        ratio = stats.median / base.median
        final = n == COUNTS[-1]
        rows.append(
            Row(
                NAME,
                f"renewal cycle, {n} outputs",
                stats.median,
                "ms",
                ours_text=stats.text("ms"),
                peer="1 output",
                peer_value=base.median,
                ratio=ratio,
                ratio_text=f"{n} outputs / 1",
                target=f"<= {TARGET_RATIO:g}x" if final else "",
                passed=ratio <= TARGET_RATIO if final else None,
                notes=f"first write of all {n} outputs {first:.1f} s after start",
            )
        )
    return rows
