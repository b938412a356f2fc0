"""Idle cost of the daemon: RSS and CPU seconds per idle minute with N identity outputs.

    .venv/bin/python bench/idle_cost.py [--outputs 10] [--minutes 1] [--out bench/results-idle.md]

Starts a real auth service and a real daemon (separate processes on 127.0.0.1), waits
until every output is written (``tbot-py wait``), then samples the daemon's RSS and CPU
time from /proc while it idles between renewals (TTL 1h, interval 20m). Never part of
``make test``: these machines are noisy, so figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TBOT = str(Path(sys.executable).parent / "tbot-py")
TARGET_RSS_MB = 45.0
TARGET_CPU_PER_MIN = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS in MB, user+system CPU seconds) of ``pid`` from /proc."""
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--out", default="bench/results-idle.md")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TBOT_", "TELEPORT_"))}
    with tempfile.TemporaryDirectory(prefix="tbot-py-bench-") as tmp:
        work = Path(tmp)
        auth = subprocess.Popen(
            [TBOT, "auth", "start", "--data-dir", str(work / "auth"), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )  # fmt: skip
        assert auth.stdout is not None
        ready = json.loads(auth.stdout.readline())
        try:
            added = subprocess.run(
                [TBOT, "auth", "bots", "add", "bench", "--roles", "access",
                 "--data-dir", str(work / "auth"), "--format", "json"],
                capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
            (work / "token").write_text(json.loads(added.stdout)["token"])
            diag = f"127.0.0.1:{free_port()}"
            services = "".join(
                f"  - type: identity\n    name: out-{i}\n"
                f"    destination: {{type: directory, path: {work / f'out-{i}'}}}\n"
                for i in range(args.outputs)
            )
            (work / "tbot.yaml").write_text(
                f"version: v2\nproxy_server: {ready['addr']}\n"
                f"onboarding: {{token: {work / 'token'}, ca_pins: ['{ready['ca_pin']}']}}\n"
                f"storage: {{type: directory, path: {work / 'storage'}}}\n"
                f"credential_ttl: 1h\nrenewal_interval: 20m\ndiag_addr: {diag}\n"
                f"services:\n{services}"
            )
            started = time.monotonic()
            daemon = subprocess.Popen(
                [TBOT, "start", "-c", str(work / "tbot.yaml")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            )  # fmt: skip
            try:
                subprocess.run(
                    [TBOT, "wait", "--diag-addr", diag, "--timeout", "60s"],
                    check=True, capture_output=True, env=env,
                )  # fmt: skip
                ready_after = time.monotonic() - started
                time.sleep(2)  # let start-up work settle
                rss0, cpu0 = proc_stats(daemon.pid)
                time.sleep(args.minutes * 60)
                rss1, cpu1 = proc_stats(daemon.pid)
            finally:
                daemon.terminate()
                daemon.wait(timeout=30)
        finally:
            auth.terminate()
            auth.wait(timeout=30)
            auth.stdout.close()
    cpu_per_min = (cpu1 - cpu0) / args.minutes
    rows = [
        ("ready (all outputs written)", f"{ready_after:.2f} s", "-", "-"),
        ("RSS after idling", f"{rss1:.1f} MB", f"< {TARGET_RSS_MB:.0f} MB",
         "pass" if rss1 < TARGET_RSS_MB else "FAIL"),
        ("CPU per idle minute", f"{cpu_per_min:.3f} s", f"< {TARGET_CPU_PER_MIN} s",
         "pass" if cpu_per_min < TARGET_CPU_PER_MIN else "FAIL"),
    ]  # fmt: skip
    table = [
        f"# Idle cost, {args.outputs} identity outputs, {args.minutes:g} idle minute(s)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        f"`python bench/idle_cost.py --outputs {args.outputs} --minutes {args.minutes:g}`.",
        "",
        "| figure | value | target | result |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
    ]
    Path(args.out).write_text("\n".join(table))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
