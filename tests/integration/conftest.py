"""Real processes on 127.0.0.1: the auth service and the daemon, driven through their CLIs."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
TBOT = str(VENV_BIN / "tbot-py") if (VENV_BIN / "tbot-py").exists() else "tbot-py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child: ours minus anything that would steer tbot-py."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TBOT_", "TELEPORT_")) and k != "STATE_DIRECTORY"
    }
    env.update(extra)
    return env


def run_tbot(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``tbot-py ARGS`` to completion and capture its output."""
    return subprocess.run(
        [TBOT, *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        timeout=timeout,
        check=False,
    )


@dataclass
class AuthService:
    """A running ``tbot-py auth start`` process."""

    data_dir: Path
    addr: str
    ca_pin: str
    process: subprocess.Popen[str]

    def add_bot(self, name: str, roles: str = "access", logins: str = "") -> str:
        """Create a bot with the admin CLI and return its join token."""
        args = ["auth", "bots", "add", name, "--roles", roles, "--data-dir", str(self.data_dir)]
        if logins:
            args += ["--logins", logins]
        done = run_tbot(*args, "--format", "json")
        assert done.returncode == 0, done.stderr
        token = json.loads(done.stdout)["token"]
        assert isinstance(token, str)
        return token

    def add_token(self, bot: str) -> str:
        done = run_tbot(
            "auth", "tokens", "add", "--bot", bot, "--ttl", "1h",
            "--data-dir", str(self.data_dir), "--format", "json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        token = json.loads(done.stdout)["token"]
        assert isinstance(token, str)
        return token

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[str]) -> None:
    """SIGTERM, SIGKILL after 10 s, and close its stdout pipe."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_auth_service(
    data_dir: Path,
    listen: str = "127.0.0.1:0",
    *extra_args: str,
    env: dict[str, str] | None = None,
) -> AuthService:
    """Start the auth service and wait for its one JSON ready line on stdout.

    Tests share one service across many joins from 127.0.0.1, so the join rate limit
    is raised unless a test passes its own ``--join-rate``. ``env`` adds variables to
    the child's :func:`clean_env` (e.g. ``SSL_CERT_FILE`` for a test OIDC issuer).
    """
    if "--join-rate" not in extra_args:
        extra_args = (*extra_args, "--join-rate", "600/m")
    process = subprocess.Popen(
        [TBOT, "auth", "start", "--data-dir", str(data_dir), "--listen", listen, *extra_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=clean_env(**(env or {})),
    )
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout=30):
        process.kill()
        process.wait()
        process.stdout.close()
        raise AssertionError("auth service did not become ready within 30s")
    line = process.stdout.readline()
    if not line:
        process.wait()
        process.stdout.close()
        raise AssertionError(f"auth service exited with {process.returncode} before ready")
    ready = json.loads(line)
    return AuthService(data_dir, ready["addr"], ready["ca_pin"], process)


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthService]:
    service = start_auth_service(tmp_path_factory.mktemp("auth") / "data")
    yield service
    service.stop()


@pytest.fixture
def need_tools() -> None:
    for tool in ("ssh-keygen", "openssl", "ssh"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is required by the integration tests (.ci/run installs it)")


def start_identity_args(
    auth: AuthService, destination: Path | str, storage: Path | str, *extra: str
) -> list[str]:
    """argv for ``start identity --oneshot`` against ``auth`` (the token goes in the env)."""
    return [
        "start", "identity",
        "--proxy-server", auth.addr,
        "--ca-pin", auth.ca_pin,
        "--destination", str(destination),
        "--storage", str(storage),
        "--oneshot",
        *extra,
    ]  # fmt: skip


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes, to prove a failed run changed nothing."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def error_lines(stderr: str) -> list[str]:
    """The ERROR lines of a run's stderr (log lines are INFO/WARNING)."""
    return [line for line in stderr.splitlines() if line.startswith("ERROR:")]
