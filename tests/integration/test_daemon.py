"""Background mode as a real process: renewals, outages, signals, hooks, systemd notify."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_public_identity

from tbot_py.identity import keys
from tbot_py.identity.identityfile import parse_identity_file
from tbot_py.identity.tlsid import TLSIdentity
from tests.expected import artifacts
from tests.integration.conftest import (
    TBOT,
    AuthService,
    clean_env,
    free_port,
    run_tbot,
    start_auth_service,
)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def generation(storage: Path) -> int:
    cert = x509.load_pem_x509_certificate((storage / "tlscert").read_bytes())
    return TLSIdentity.from_subject(cert.subject).generation


def config_text(
    auth: AuthService, token_file: Path, storage: Path, diag: str, outputs: dict[str, Path],
    *, hook_log: Path | None = None,
) -> str:  # fmt: skip
    lines = [
        "version: v2",
        f"proxy_server: {auth.addr}",
        "onboarding:",
        f"  token: {token_file}",
        f"  ca_pins: ['{auth.ca_pin}']",
        f"storage: {{type: directory, path: {storage}}}",
        "credential_ttl: 2m",
        "renewal_interval: 40s",
        f"diag_addr: {diag}",
        "services:",
    ]
    for name, path in outputs.items():
        lines += [
            "  - type: identity",
            f"    name: {name}",
            f"    destination: {{type: directory, path: {path}}}",
        ]
        if hook_log is not None:
            script = (
                "import os; open(os.environ['HOOK_LOG'], 'a').write("
                "os.environ['TBOT_PY_SERVICE'] + ' ' + os.environ['TBOT_PY_FILES'] + '\\n')"
            )
            lines += ["    hooks:", f"      - command: [{sys.executable!r}, '-c', {script!r}]"]
    return "\n".join(lines) + "\n"


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    diag: str
    notify: socket.socket
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def notifications(self, timeout: float = 0.1) -> list[str]:
        messages = []
        self.notify.settimeout(timeout)
        while True:
            try:
                messages.append(self.notify.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return messages

    def readyz(self) -> tuple[int, dict[str, object]]:
        status, body = http_get(f"http://{self.diag}/readyz")
        return status, json.loads(body)

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait_healthy(self, timeout: float = 20) -> None:
        wait_for(lambda: _up(self.diag) and self.readyz()[0] == 200, timeout, "/readyz 200")

    def stop(self) -> None:
        """SIGTERM, and it must exit 0."""
        self.signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: Path, diag: str, extra_args: tuple[str, ...] = (), **env: str) -> Daemon:
        sock_path = tmp_path / f"notify-{len(started)}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(sock_path))
        log_path = tmp_path / f"daemon-{len(started)}.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [TBOT, "start", "-c", str(config), *extra_args],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                text=True,
                env=clean_env(
                    NOTIFY_SOCKET=str(sock_path), HOOK_LOG=str(tmp_path / "hooks"), **env
                ),
            )
        daemon = Daemon(process, diag, notify, log_path)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        daemon.notify.close()


@pytest.fixture
def own_auth(tmp_path: Path) -> Iterator[AuthService]:
    """An auth service on a fixed port, so a test can stop it and start it again."""
    service = start_auth_service(tmp_path / "auth", f"127.0.0.1:{free_port()}")
    yield service
    service.stop()


def write_token(auth: AuthService, tmp_path: Path, bot: str) -> Path:
    token_file = tmp_path / f"{bot}.token"
    token_file.write_text(auth.add_bot(bot, roles="access"))
    return token_file


def new_config(
    auth: AuthService, tmp_path: Path, bot: str, outputs: dict[str, Path], **kwargs: Path
) -> tuple[Path, str, Path]:
    """A new bot, a diagnostics port and a config file: (config path, diag addr, token file)."""
    diag = f"127.0.0.1:{free_port()}"
    token = write_token(auth, tmp_path, bot)
    config = tmp_path / "tbot.yaml"
    config.write_text(config_text(auth, token, tmp_path / "storage", diag, outputs, **kwargs))
    return config, diag, token


def test_daemon_notifies_ready_renews_on_sigusr1_and_runs_hooks_once_per_change(
    auth: AuthService, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    storage, out = tmp_path / "storage", tmp_path / "out"
    config, diag, _ = new_config(auth, tmp_path, "bg", {"out": out}, hook_log=tmp_path / "hooks")
    daemon = start_daemon(config, diag)
    wait_notified(daemon, "READY=1", 20)
    status, body = daemon.readyz()
    assert status == 200, body
    assert body["status"] == "healthy"
    assert set(body["services"]) == {"identity", "out"}  # type: ignore[arg-type]
    first_cert = (out / "tlscert").read_bytes()
    wait_for((tmp_path / "hooks").exists, 10, "the first hook run")
    assert (tmp_path / "hooks").read_text().startswith("out ")
    assert generation(storage) == 1

    daemon.signal(signal.SIGUSR1)
    wait_for(lambda: (out / "tlscert").read_bytes() != first_cert, 10, "a renewal after SIGUSR1")
    wait_for(lambda: generation(storage) == 2, 10, "the bot identity to renew")
    wait_for(lambda: len((tmp_path / "hooks").read_text().splitlines()) == 2, 10, "hook run 2")
    hook_lines = (tmp_path / "hooks").read_text().splitlines()
    assert "tlscert" in hook_lines[1].split()
    check = run_tbot("version")  # the CLI still works while the daemon holds the storage lock
    assert check.returncode == 0
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "teleport-user-ca.crt"), str(out / "tlscert")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr

    metrics = http_get(f"http://{diag}/metrics")[1]
    assert 'tbot_task_iterations_total{name="output-renewal",service="out"}' in metrics
    assert "tbot_py_credential_not_after_timestamp_seconds" in metrics
    assert http_get(f"http://{diag}/livez") == (200, "OK")

    daemon.stop()
    assert "Traceback" not in daemon.log()


def test_outage_keeps_the_old_identity_reports_503_and_recovers(
    own_auth: AuthService, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    out = tmp_path / "out"
    config, diag, _ = new_config(own_auth, tmp_path, "outage", {"out": out})
    daemon = start_daemon(config, diag)
    daemon.wait_healthy()
    before = artifacts(out)

    own_auth.stop()
    daemon.signal(signal.SIGUSR1)
    wait_for(lambda: daemon.readyz()[0] == 503, 15, "/readyz to report 503 during the outage")
    _, body = daemon.readyz()
    services = body["services"]
    assert isinstance(services, dict)
    assert services["out"]["status"] == "unhealthy" or services["identity"]["status"] == "unhealthy"
    # Nothing was half-replaced: the old, still valid identity is untouched.
    assert artifacts(out) == before
    assert daemon.process.poll() is None

    restarted = start_auth_service(own_auth.data_dir, own_auth.addr)
    try:
        wait_for(lambda: daemon.readyz()[0] == 200, 30, "recovery after the outage")
    finally:
        restarted.stop()
    assert (out / "tlscert").read_bytes() != before["tlscert"]


def test_sighup_with_a_broken_file_keeps_running_and_a_valid_one_adds_a_service(
    auth: AuthService, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    storage, out_a, out_b = tmp_path / "storage", tmp_path / "a", tmp_path / "b"
    config, diag, token = new_config(auth, tmp_path, "reload", {"a": out_a})
    good = config.read_text()
    daemon = start_daemon(config, diag)
    daemon.wait_healthy()

    config.write_text(good + "  - type: identity\n    destination: [broken\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in daemon.log(), 10, "the reload error")
    assert f"{config}:" in daemon.log()  # the error names the file and line
    assert daemon.process.poll() is None
    assert daemon.readyz()[0] == 200

    config.write_text(config_text(auth, token, storage, diag, {"a": out_a, "b": out_b}))
    daemon.signal(signal.SIGHUP)
    wait_for((out_b / "identity").exists, 15, "the added service's files")
    wait_for(lambda: "b" in daemon.readyz()[1]["services"], 5, "b in /readyz")  # type: ignore[operator]
    daemon.stop()


def test_crash_between_renewal_answer_and_write_does_not_lock_the_bot_out(
    auth: AuthService, tmp_path: Path
) -> None:
    storage, out = tmp_path / "storage", tmp_path / "out"
    token = auth.add_bot("crashy")
    args = [
        "start", "identity", "--proxy-server", auth.addr, "--ca-pin", auth.ca_pin,
        "--destination", str(out), "--storage", str(storage), "--oneshot",
    ]  # fmt: skip
    assert run_tbot(*args, env=clean_env(TELEPORT_BOT_TOKEN=token)).returncode == 0
    assert generation(storage) == 1
    stored_cert = (storage / "tlscert").read_bytes()

    crashed = run_tbot(*args, env=clean_env(TBOT_PY_TEST_KILL_AFTER_RENEW_RESPONSE="1"))
    assert crashed.returncode == -signal.SIGKILL
    # The server moved to generation 2, but the bot never saved it.
    assert (storage / "tlscert").read_bytes() == stored_cert
    assert (storage / "pending-key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY")

    recovered = run_tbot(*args)
    assert recovered.returncode == 0, recovered.stderr
    assert "retrying a renewal that was cut short" in recovered.stderr
    assert generation(storage) == 2
    assert (storage / "pending-key").read_bytes() == b""
    # And the identity keeps renewing normally afterwards.
    again = run_tbot(*args)
    assert again.returncode == 0, again.stderr
    assert generation(storage) == 3


def test_sigterm_exits_zero(
    auth: AuthService, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    config, diag, _ = new_config(auth, tmp_path, "term", {"o": tmp_path / "o"})
    daemon = start_daemon(config, diag)
    daemon.wait_healthy()
    daemon.stop()
    assert "stopped" in daemon.log()
    assert any("STOPPING=1" in m for m in daemon.notifications())


def wait_notified(daemon: Daemon, text: str, timeout: float) -> list[str]:
    """Wait until the daemon sent a notification containing ``text``; return all seen."""
    seen: list[str] = []

    def check() -> bool:
        seen.extend(daemon.notifications(0.05))
        return any(text in m for m in seen)

    wait_for(check, timeout, text)
    return seen


def _up(diag: str) -> bool:
    try:
        return http_get(f"http://{diag}/livez")[0] == 200
    except OSError:
        return False


def test_renews_on_its_own_and_every_version_of_the_artifacts_is_valid(
    auth: AuthService, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """A 30 s TTL renews about every 10 s; a reader polling meanwhile only sees valid pairs."""
    storage, out = tmp_path / "storage", tmp_path / "out"
    config, diag, _ = new_config(auth, tmp_path, "natural", {"out": out})
    text = config.read_text().replace("credential_ttl: 2m", "credential_ttl: 30s")
    config.write_text(text.replace("renewal_interval: 40s", "renewal_interval: 10s"))
    daemon = start_daemon(config, diag)
    waited = run_tbot("wait", "--diag-addr", diag, "--timeout", "30s")
    assert waited.returncode == 0, waited.stderr
    assert '"status": "healthy"' in waited.stdout
    user_ca = x509.load_pem_x509_certificate((out / "teleport-user-ca.crt").read_bytes())
    seen: set[bytes] = set()
    deadline = time.monotonic() + 40
    while len(seen) < 3 and time.monotonic() < deadline:
        # The identity file is one atomically replaced file: every version a reader can
        # see must be complete and self-consistent. (Pairing the separate key and tlscert
        # files across a renewal is the destinations issue's job.)
        data = (out / "identity").read_bytes()
        if data not in seen:
            parsed = parse_identity_file(data)
            public = keys.load_private_key_pem(parsed.private_key_pem).public_key()
            cert = x509.load_pem_x509_certificate(parsed.tls_cert_pem)
            cert.verify_directly_issued_by(user_ca)
            assert keys.same_public_key(public, cert.public_key())  # type: ignore[arg-type]
            ssh_cert = load_ssh_public_identity(parsed.ssh_cert.strip())
            assert keys.same_public_key(public, ssh_cert.public_key())  # type: ignore[arg-type]
            assert cert.not_valid_after_utc > datetime.now(UTC)
            seen.add(data)
        time.sleep(0.1)
    assert len(seen) >= 3, f"only {len(seen)} versions in 40 s"
    assert generation(storage) >= 3
    daemon.stop()


def test_deleted_or_chmodded_output_files_are_rewritten_promptly(
    auth: AuthService, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    out = tmp_path / "out"
    config, diag, _ = new_config(auth, tmp_path, "tamper", {"out": out})
    daemon = start_daemon(config, diag)
    daemon.wait_healthy()
    (out / "identity").unlink()
    wait_for((out / "identity").exists, 10, "the deleted identity file to come back")
    (out / "key").chmod(0o644)
    wait_for(lambda: (out / "key").stat().st_mode & 0o777 == 0o600, 10, "key back to 0600")
    assert "was deleted" in daemon.log()
    daemon.stop()


def test_watch_config_reloads_when_the_file_changes(
    auth: AuthService, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    storage, out_a, out_b = tmp_path / "storage", tmp_path / "a", tmp_path / "b"
    config, diag, token = new_config(auth, tmp_path, "watcher", {"a": out_a})
    daemon = start_daemon(config, diag, extra_args=("--watch-config",))
    daemon.wait_healthy()
    # An editor-style save: write a temp file, rename it over the config.
    staged = tmp_path / ".tbot.yaml.swp"
    staged.write_text(config_text(auth, token, storage, diag, {"a": out_a, "b": out_b}))
    staged.replace(config)
    wait_for((out_b / "identity").exists, 15, "the service added by editing the file")
    daemon.stop()
