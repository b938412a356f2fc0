"""What every benchmark shares: result rows, repeated timing, machine facts, a local auth service.

A benchmark module exposes ``NAME`` (a short title) and ``run(ctx: Context) -> list[Row]``.
The runner (``bench/run.py``) calls each in turn and writes ``bench/results.md`` and
``bench/results.png``. Figures are ratios measured in the same run: these machines are
shared and noisy, so absolute numbers say little and a peer measured minutes apart even less.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TBOT = str(VENV_BIN / "tbot-py")
PYTHON = sys.executable


@dataclass
class Stats:
    """Median, min and max of repeated measurements (after a warm-up that is not counted)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, unit: str, digits: int = 1) -> str:
        return (
            f"{self.median:.{digits}f} {unit} "
            f"(min {self.min:.{digits}f}, max {self.max:.{digits}f}, n={self.n})"
        )


@dataclass
class Row:
    """One line of results.md: our figure, the peer's figure from the same run, the target."""

    benchmark: str
    metric: str
    ours: float | None
    unit: str
    ours_text: str = ""  # e.g. Stats.text(); defaults to the number
    peer: str = ""  # what we compare with, e.g. "python3 -c pass", "certbot"
    peer_value: float | None = None
    peer_text: str = ""
    ratio: float | None = None  # ours / peer, or as the target defines it
    ratio_text: str = ""  # how to read the ratio, e.g. "ours/baseline"
    target: str = ""  # e.g. "<= 2.0x"
    passed: bool | None = None  # None: reported only, no target
    notes: str = ""

    def as_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


@dataclass
class Context:
    """Options and a scratch directory for one runner invocation."""

    work: Path
    quick: bool = False  # fewer repetitions, for trying the runner out
    repeats: int = 11
    warmup: int = 2
    env: dict[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def reps(self, full: int, quick: int = 3) -> int:
        return quick if self.quick else full


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without anything that would steer tbot-py."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TBOT_", "TELEPORT_"))}
    env.update(extra)
    return env


def repeat(fn: Callable[[], float], repeats: int, warmup: int = 1) -> Stats:
    """Call ``fn`` (which returns one measurement) ``warmup`` times unrecorded, then ``repeats``."""
    for _ in range(warmup):
        fn()
    return Stats.of([fn() for _ in range(repeats)])


def time_process(argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> float:
    """Wall time of one whole process, in milliseconds."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if check and done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def machine() -> dict[str, str]:
    """Facts that make a result reproducible: CPUs, kernel, Python, load at start."""
    load = os.getloadavg()
    return {
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "load": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    }


def need(tool: str, package: str) -> str:
    """The path of ``tool``; raise a clear error naming the Debian package if it is missing."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(
            f"{tool} is not installed (Debian package {package}; see bench/install.sh)"
        )
    return path


@dataclass
class AuthService:
    """A running ``tbot-py auth start`` on 127.0.0.1."""

    data_dir: Path
    addr: str
    ca_pin: str
    process: subprocess.Popen[str]

    def add_bot(self, name: str, roles: str = "access") -> str:
        done = subprocess.run(
            [TBOT, "auth", "bots", "add", name, "--roles", roles,
             "--data-dir", str(self.data_dir), "--format", "json"],
            capture_output=True, text=True, check=True, env=clean_env(),
        )  # fmt: skip
        token: str = json.loads(done.stdout)["token"]
        return token

    def add_token(self, bot: str) -> str:
        done = subprocess.run(
            [TBOT, "auth", "tokens", "add", "--bot", bot, "--ttl", "1h",
             "--data-dir", str(self.data_dir), "--format", "json"],
            capture_output=True, text=True, check=True, env=clean_env(),
        )  # fmt: skip
        token: str = json.loads(done.stdout)["token"]
        return token


def stop_process(process: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def auth_service(data_dir: Path, *extra: str) -> Iterator[AuthService]:
    """Start the auth service (a real process) and stop it on exit."""
    process = subprocess.Popen(
        [TBOT, "auth", "start", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
         "--join-rate", "100000/m", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean_env(),
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the auth service did not start")
        ready = json.loads(line)
        yield AuthService(data_dir, ready["addr"], ready["ca_pin"], process)
    finally:
        stop_process(process)
