"""Idle cost of the daemon: RSS and CPU seconds per idle minute with 10 identity outputs.

Starts a real auth service and a real daemon (separate processes on 127.0.0.1), waits until
every output is written (``tbot-py wait``), lets start-up settle, then samples the daemon's
RSS and CPU time from /proc while it idles between renewals (TTL 1h, interval 20m).

Also reported, to say what bounds the RSS: the import floor (a fresh interpreter that only
imports the daemon's modules) and, each in its own fresh interpreter, the VmRSS that
importing one main dependency adds.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import PYTHON, TBOT, Context, Row, Stats, auth_service, clean_env, free_port

NAME = "idle daemon"
OUTPUTS = 10
TARGET_RSS_MB = 45.0
TARGET_CPU_PER_MIN = 0.05
SETTLE_S = 2.0
RENEWAL_MARGIN_S = 5.0  # a renewal's own work, before and after its scheduled time
MAX_QUIET_WAIT_S = 600.0

#: What the running daemon imports: the CLI, the daemon and its diagnostics, and what
#: APScheduler imports only once running (checked against the daemon's -X importtime).
DAEMON_MODULES = [
    "tbot_py.cli.main", "tbot_py.cli.start", "tbot_py.bot.daemon", "tbot_py.bot.watch",
    "tbot_py.diagnostics.health", "tbot_py.diagnostics.http", "tbot_py.diagnostics.metrics",
    "tbot_py.diagnostics.sdnotify",
    "tbot_py.cli.auth.remote", "apscheduler.executors.asyncio", "difflib",
]  # fmt: skip
#: The main dependencies, each imported as tbot-py uses it, and asyncio (most of them need it).
DEPENDENCIES = {
    "cryptography": "import cryptography.x509, cryptography.hazmat.primitives.asymmetric.ec",
    "pydantic": "from pydantic import BaseModel",  # pydantic is lazy: BaseModel loads the core
    "apscheduler": "import apscheduler.schedulers.asyncio",
    "watchdog": "import watchdog.observers",
    "prometheus_client": "import prometheus_client",
    "yaml": "import yaml",
    "click": "import click",
}
STDLIB_SHARED = {"asyncio (stdlib, with ssl)": "import asyncio, ssl"}
_RSS_AFTER = (
    "def rss():\n"
    "    with open('/proc/self/status') as f:\n"
    "        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:'))\n"
    "print(rss())\n"
    "{imports}\n"
)


def proc_stats(pid: int) -> tuple[float, float, float, float]:
    """(RSS MB, peak RSS MB, CPU s, CPU s of live threads) of ``pid`` from /proc.

    The first CPU figure is utime+stime in clock ticks (10 ms), threads that ended included;
    the second sums each live thread's schedstat run time, to the nanosecond.
    """
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            threads += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    mb = [int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")]
    return mb[0], mb[1], cpu, threads / 1e9


def import_rss(*steps: str) -> list[float]:
    """VmRSS in MB of a fresh interpreter of ours at start and after each of ``steps``."""
    code = _RSS_AFTER.format(imports="\n".join(f"{step}\nprint(rss())" for step in steps))
    done = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, check=True, env=clean_env()
    )
    return [int(kb) / 1024 for kb in done.stdout.split()]


def write_config(work: Path, addr: str, ca_pin: str, token: str, diag: str) -> Path:
    token_file = work / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    services = "".join(
        f"  - type: identity\n    name: out-{i}\n"
        f"    destination: {{type: directory, path: {work / f'out-{i}'}}}\n"
        for i in range(OUTPUTS)
    )
    config = work / "tbot.yaml"
    config.write_text(
        f"version: v2\nproxy_server: {addr}\n"
        f"onboarding: {{token: {token_file}, ca_pins: ['{ca_pin}']}}\n"
        f"storage: {{type: directory, path: {work / 'storage'}}}\n"
        f"credential_ttl: 1h\nrenewal_interval: 20m\ndiag_addr: {diag}\n"
        f"services:\n{services}"
    )
    return config


@dataclass
class Idle:
    """What one idle window of the daemon showed."""

    ready_s: float
    rss_mb: list[float]
    peak_mb: float
    cpu_per_min: float
    thread_cpu_per_min: float
    seconds: float
    waited_s: float  # from ready to the start of the window (for a renewal-free one)
    renewals: float  # task runs inside the window (0 unless the wait was cut short)


def idle_daemon(ctx: Context, seconds: float) -> Idle:
    """Run the daemon with ``OUTPUTS`` outputs and watch it idle for ``seconds``."""
    with auth_service(ctx.work / "auth") as auth:
        diag = f"127.0.0.1:{free_port()}"
        config = write_config(ctx.work, auth.addr, auth.ca_pin, auth.add_bot("idle"), diag)
        started = time.monotonic()
        with (ctx.work / "daemon.log").open("wb") as log:
            daemon = subprocess.Popen(
                [TBOT, "start", "-c", str(config)], stdout=log, stderr=log, env=clean_env()
            )
        try:
            subprocess.run(
                [TBOT, "wait", "--diag-addr", diag, "--timeout", "60s"],
                check=True, capture_output=True, env=clean_env(),
            )  # fmt: skip
            ready = time.monotonic() - started
            renewals_before = iterations(diag)
            waited = wait_for_quiet_window(diag, seconds)
            first = proc_stats(daemon.pid)
            t0 = time.monotonic()
            samples = []
            while (left := seconds - (time.monotonic() - t0)) > 0:
                time.sleep(min(5.0, left))
                last = proc_stats(daemon.pid)
                samples.append(last[0])
            elapsed = time.monotonic() - t0
            renewals = iterations(diag) - renewals_before
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with {daemon.returncode} while idle")
        finally:
            daemon.terminate()
            daemon.wait(timeout=40)
    if not all((ctx.work / f"out-{i}" / "tlscert").is_file() for i in range(OUTPUTS)):
        raise RuntimeError("not every output was written")
    per_min = 60 / elapsed
    return Idle(
        ready_s=ready,
        rss_mb=samples,
        peak_mb=last[1],
        cpu_per_min=(last[2] - first[2]) * per_min,
        thread_cpu_per_min=(last[3] - first[3]) * per_min,
        seconds=elapsed,
        waited_s=waited,
        renewals=renewals,
    )


def metrics(diag: str) -> list[tuple[str, float]]:
    """``(name, value)`` of every sample on the daemon's /metrics, labels dropped."""
    with urllib.request.urlopen(f"http://{diag}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples.append((name.split("{", 1)[0], float(value)))
    return samples


def iterations(diag: str) -> float:
    """How many task runs (renewals, first writes included) the daemon has made so far."""
    return sum(value for name, value in metrics(diag) if name == "tbot_task_iterations_total")


def wait_for_quiet_window(diag: str, length: float) -> float:
    """Sleep until ``length`` seconds without a scheduled renewal lie ahead (and at least
    SETTLE_S); the time slept.

    The daemon draws each task's first renewal from its whole interval (schedule.
    first_renewal), so some of the 11 tasks renew within minutes of the start. The idle
    window starts just after a renewal that leaves a gap of ``length`` (plus margins) before
    the next one, or now if the gap is already there. At most MAX_QUIET_WAIT_S; the rows
    say how many renewals fell in the window anyway.
    """
    t0 = time.time()
    due = sorted(
        value for name, value in metrics(diag) if name == "tbot_py_next_renewal_timestamp_seconds"
    )
    start = t0 + SETTLE_S
    for when in due:
        if when - start >= length + RENEWAL_MARGIN_S:
            break
        start = max(start, when + RENEWAL_MARGIN_S)
    start = min(start, t0 + MAX_QUIET_WAIT_S)
    time.sleep(max(0.0, start - time.time()))
    return time.time() - t0


def run(ctx: Context) -> list[Row]:
    idle = idle_daemon(ctx, 20.0 if ctx.quick else 60.0)
    rss = idle.rss_mb[-1]
    # The floor, and what each step adds on top of the ones before it (these add up).
    steps = [*STDLIB_SHARED.values(), *DEPENDENCIES.values(), "import " + ", ".join(DAEMON_MODULES)]
    cumulative = import_rss(*steps)
    bare, floor = cumulative[0], cumulative[-1]
    labels = [*STDLIB_SHARED, *DEPENDENCIES, "tbot_py's daemon modules"]
    added = ", ".join(
        f"{label} +{after - before:.1f}"
        for label, before, after in zip(labels, cumulative[:-1], cumulative[1:], strict=True)
    )
    window = Stats.of(idle.rss_mb)
    rows = [
        Row(
            NAME, f"RSS after {idle.seconds:.0f} s idle, {OUTPUTS} outputs", rss, "MB",
            ours_text=f"last sample; over the window {window.text('MB')}, peak (VmHWM) "
            f"{idle.peak_mb:.1f} MB",
            peer="import floor", peer_value=floor, ratio=rss / TARGET_RSS_MB,
            ratio_text="ours/target, below 1 passes", target=f"< {TARGET_RSS_MB:g} MB",
            passed=rss < TARGET_RSS_MB,
            notes=f"ready (all outputs written) {idle.ready_s:.2f} s after start; sampled every "
            "5 s in the idle window (see the CPU row). The import floor is one fresh interpreter "
            "importing only what the daemon imports (DAEMON_MODULES in bench/idle.py), no work "
            f"done: bare interpreter {bare:.1f} MB, then in order (MB each adds to those before "
            f"it): {added}. Above the floor, {rss - floor:.1f} MB is the running daemon's state",
        ),
        Row(
            NAME, "CPU per idle minute", idle.cpu_per_min, "s",
            ours_text=f"{idle.cpu_per_min:.3f} s/min over {idle.seconds:.0f} s (utime+stime of "
            f"all threads, 10 ms ticks); live threads' schedstat: "
            f"{idle.thread_cpu_per_min:.4f} s/min",
            ratio=idle.cpu_per_min / TARGET_CPU_PER_MIN, ratio_text="ours/target, below 1 passes",
            target=f"< {TARGET_CPU_PER_MIN:g} s", passed=idle.cpu_per_min < TARGET_CPU_PER_MIN,
            notes=f"TTL 1h, renewal interval 20m; the window started {idle.waited_s:.0f} s "
            "after ready, once the next scheduled renewal (from /metrics) was further away than "
            f"the window; task runs inside the window: {idle.renewals:.0f}",
        ),
    ]  # fmt: skip
    for package, statement in {**DEPENDENCIES, **STDLIB_SHARED}.items():
        before, after = import_rss(statement)
        rows.append(
            Row(
                NAME,
                f"RSS added by importing {package}",
                after - before,
                "MB",
                passed=None,
                notes=f"VmRSS delta of `{statement}` in a fresh interpreter (bare {before:.1f} "
                "MB); what packages share (asyncio, ssl, logging) counts in each",
            )
        )
    return rows
