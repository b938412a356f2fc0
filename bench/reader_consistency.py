"""Reader consistency: mismatched key/certificate pairs per way of reading, over N renewals.

    .venv/bin/python bench/reader_consistency.py [--renewals 1000] [--out FILE.md]

Starts a real auth service and a real daemon with one identity output (separate processes
on 127.0.0.1), renews the output N times with SIGUSR1 while one reader process per kind
reads key and certificate pairs, and counts the pairs that do not match:

- ``versioned``: resolve ``..data`` once, read ``key`` and ``tlscert`` from that version
  (what the README tells readers to do);
- ``identity-file``: read the ``identity`` file alone (key and certificate in one file);
- ``flat-names``: open ``DIR/key``, then ``DIR/tlscert`` (what ``curl --cert --key`` does).

The scenario (readers, renewals, counting) is ``tests/integration/_consistency.py``, the same
code the integration test asserts with; it is run as a script, so this bench imports nothing
from the tests. Never part of ``make test``: figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import TBOT, free_port  # bench/ is sys.path[0] when a bench runs

SCENARIO = Path(__file__).resolve().parent.parent / "tests" / "integration" / "_consistency.py"
HOW = {
    "versioned": "`realpath(DIR/..data)` once, then `key` and `tlscert` from that version",
    "identity-file": "`DIR/identity` alone (key and certificate in one file)",
    "flat-names": "`DIR/key`, then `DIR/tlscert` (naive; the README warns against it)",
}


def start_cluster(work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
    """A running auth service and a config for one bot with one identity output."""
    auth = subprocess.Popen(
        [TBOT, "auth", "start", "--data-dir", str(work / "auth"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert auth.stdout is not None
    ready = json.loads(auth.stdout.readline())
    added = subprocess.run(
        [TBOT, "auth", "bots", "add", "bench", "--roles", "access",
         "--data-dir", str(work / "auth"), "--format", "json"],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    (work / "token").write_text(json.loads(added.stdout)["token"])
    config = work / "tbot.yaml"
    config.write_text(
        f"version: v2\nproxy_server: {ready['addr']}\n"
        f"onboarding: {{token: {work / 'token'}, ca_pins: ['{ready['ca_pin']}']}}\n"
        f"storage: {{type: directory, path: {work / 'storage'}}}\n"
        f"credential_ttl: 1h\nrenewal_interval: 20m\ndiag_addr: 127.0.0.1:{free_port()}\n"
        f"services:\n  - type: identity\n    name: out\n"
        f"    destination: {{type: directory, path: {work / 'out'}}}\n"
    )
    return auth, config


def measure(work: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, object]:
    """Run the daemon and the scenario; the scenario's JSON result."""
    auth, config = start_cluster(work, env)
    log = work / "daemon.log"
    try:
        with log.open("w") as stderr:
            daemon = subprocess.Popen(
                [TBOT, "start", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=stderr,
                env=env,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "out: wrote" not in log.read_text():  # written, so SIGUSR1 is handled
                if daemon.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the daemon did not write its output:\n{log.read_text()}")
                time.sleep(0.05)
            drive = subprocess.run(
                [sys.executable, str(SCENARIO), "drive", "--pid", str(daemon.pid),
                 "--dir", str(work / "out"), "--renewals", str(args.renewals),
                 "--timeout", str(args.timeout), "--every", str(args.every),
                 "--pause", str(args.pause)],
                capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    finally:
        auth.terminate()
        auth.wait(timeout=30)
        assert auth.stdout is not None
        auth.stdout.close()
    result: dict[str, object] = json.loads(drive.stdout)
    result["writes"] = log.read_text().count("out: wrote")
    return result


def report(result: dict[str, object], args: argparse.Namespace, load: float) -> str:
    readers = result["readers"]
    assert isinstance(readers, dict)
    rows = []
    for kind, count in readers.items():
        rate = count["mismatches"] / count["reads"] if count["reads"] else 0.0
        rows.append(
            f"| {kind} | {HOW[kind]} | {count['reads']} | {count['mismatches']} | {rate:.3%} "
            f"| {count['vanished']} | {count['certificates']} |"
        )
    command = shlex.join(["python", "bench/reader_consistency.py", *sys.argv[1:]])
    uname = platform.uname()
    cpus = len(os.sched_getaffinity(0))  # what nproc counts
    return "\n".join(
        [
            f"# Reader consistency over {result['renewals']} renewals",
            "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}` "
            f"on {cpus} CPUs (nproc), Linux {uname.release} {uname.machine}, "
            f"Python {platform.python_version()}; load average {load:.2f} at the start "
            "(other work may share the machine).",
            "",
            f"{result['renewals']} renewals of one identity output ({result['writes']} writes "
            f"logged) in {result['seconds']:.1f} s, driven by SIGUSR1 (one every "
            f"{args.every * 1000:g} ms); each reader is its own process and pauses "
            f"{args.pause * 1000:g} ms between reads. A mismatch "
            "is a pair read completely whose key does not belong to the certificate; "
            "*vanished* counts reads retried because a file was gone (a version pruned under "
            "a slow reader); *certificates* is how many distinct ones the reader saw.",
            "",
            "| reader | how it reads | reads | mismatches | mismatch rate | vanished "
            "| certificates |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renewals", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the renewals")
    parser.add_argument("--every", type=float, default=0.02, help="seconds between SIGUSR1s")
    parser.add_argument("--pause", type=float, default=0.001, help="seconds between reads")
    parser.add_argument("--out", default="bench/results-consistency.md")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TBOT_", "TELEPORT_"))}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tbot-py-bench-") as tmp:
        result = measure(Path(tmp), args, env)
    text = report(result, args, load)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
