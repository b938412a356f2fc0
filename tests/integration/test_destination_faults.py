"""Destination faults under real processes: disk full, read-only, directory removed, no permission.

Each fault gives one clear line naming the problem and the path, leaves the artifacts already
written whole, and in background mode is retried with backoff until it clears, without a restart.
Disk full and read-only use a small tmpfs mounted by the test (root only); permission denied runs
tbot-py without the capabilities that let root ignore file modes.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tbot_py.identity import keys
from tests.integration.conftest import (
    TBOT,
    AuthService,
    clean_env,
    error_lines,
    free_port,
    run_tbot,
    snapshot,
    start_identity_args,
)
from tests.integration.test_daemon import Daemon, new_config, wait_for

#: Root keeps its uid but loses what lets it ignore file modes, so mode bits apply to it.
_NO_DAC = "-dac_override,-dac_read_search"
_ATTEMPT = re.compile(r"\bout: attempt (\d+) failed: (.*) \(retrying at \S+\)$")


@dataclass(frozen=True)
class Fault:
    """A destination fault a test switches on and off; ``reason`` is what its errors must say."""

    name: str
    dest: Path
    reason: str
    induce: Callable[[], None]
    clear: Callable[[], None]
    #: The command tbot-py runs under (empty: as the test itself).
    prefix: tuple[str, ...] = ()


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


def _mount_tmpfs(mountpoint: Path, undo: list[Callable[[], None]]) -> Path:
    """Mount a 1 MiB tmpfs at ``mountpoint`` (or skip, saying why); ``undo`` gets the unmount."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root to mount a tmpfs (running as uid {os.geteuid()})")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("needs mount(8) and umount(8) to mount a tmpfs")
    mountpoint.mkdir()
    options = "size=1m,mode=0700,nosuid,nodev"
    done = _run("mount", "-t", "tmpfs", "-o", options, "tbot-py-test", str(mountpoint))
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[0] if done.stderr.strip() else "no reason given"
        pytest.skip(f"mounting a tmpfs is not permitted here: {why}")

    def unmount() -> None:
        if _run("umount", str(mountpoint)).returncode != 0:
            # Something still inside (a daemon that outlived its test): detach it anyway.
            lazy = _run("umount", "--lazy", str(mountpoint))
            assert lazy.returncode == 0, f"cannot unmount {mountpoint}: {lazy.stderr}"

    undo.append(unmount)
    return mountpoint


def _remount(mountpoint: Path, mode: str) -> None:
    """``mount -o remount,MODE``, retried briefly: a write in flight makes ro fail with EBUSY."""
    argv = ("mount", "-o", f"remount,{mode}", str(mountpoint))
    wait_for(lambda: _run(*argv).returncode == 0, 5, " ".join(argv))


def _fill(filler: Path, leave: int = 16384) -> None:
    """Fill the file system but ``leave`` bytes: room for a few new files, not for all of them."""
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    os.truncate(filler, filler.stat().st_size - leave)


def _obeying_file_modes(scratch: Path) -> tuple[str, ...]:
    """The prefix under which tbot-py obeys file modes (or skip, saying why).

    As root, setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH and keeps uid 0: the
    kernel then checks the owner bits of root's own files. Running as nobody instead does
    not work where the venv's interpreter lives under a 0700 /root (pyenv): it starts, but
    on the system's standard library, not its own.
    """
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv(1) to run tbot-py without CAP_DAC_OVERRIDE as root")
        prefix = ("setpriv", f"--inh-caps={_NO_DAC}", f"--bounding-set={_NO_DAC}")
    probe = _run(*prefix, TBOT, "version")
    if probe.returncode != 0:
        how = " ".join(prefix) or f"as uid {os.geteuid()}"
        pytest.skip(f"tbot-py does not start {how}: {probe.stderr.strip()}")
    scratch.mkdir(mode=0o500)
    if _run(*prefix, "touch", str(scratch / "probe")).returncode == 0:
        pytest.skip("file modes do not apply here: CAP_DAC_OVERRIDE cannot be dropped")
    return prefix


def _disk_full(tmp_path: Path, undo: list[Callable[[], None]]) -> Fault:
    filler = _mount_tmpfs(tmp_path / "mnt", undo) / "filler"
    return Fault(
        "disk-full", filler.parent / "out", "no space left on device",
        induce=lambda: _fill(filler), clear=lambda: filler.unlink(missing_ok=True),
    )  # fmt: skip


def _read_only(tmp_path: Path, undo: list[Callable[[], None]]) -> Fault:
    mountpoint = _mount_tmpfs(tmp_path / "mnt", undo)
    return Fault(
        "read-only", mountpoint / "out", "read-only file system",
        induce=lambda: _remount(mountpoint, "ro"), clear=lambda: _remount(mountpoint, "rw"),
    )  # fmt: skip


def _permission_denied(tmp_path: Path, undo: list[Callable[[], None]]) -> Fault:
    dest = tmp_path / "out"
    return Fault(
        "permission-denied", dest, "permission",
        induce=lambda: dest.chmod(0o500), clear=lambda: dest.chmod(0o700),
        prefix=_obeying_file_modes(tmp_path / "mode-probe"),
    )  # fmt: skip


def _directory_removed(tmp_path: Path, undo: list[Callable[[], None]]) -> Fault:
    dest = tmp_path / "out"
    return Fault(
        "directory-removed", dest, "does not exist",
        induce=lambda: shutil.rmtree(dest), clear=lambda: dest.mkdir(mode=0o700, exist_ok=True),
    )  # fmt: skip


_FAULTS = {
    "disk-full": _disk_full,
    "read-only": _read_only,
    "permission-denied": _permission_denied,
    "directory-removed": _directory_removed,
}


@pytest.fixture
def fault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fault]:
    """The fault named by the test's parameter, on a destination of its own; always undone."""
    undo: list[Callable[[], None]] = []
    try:
        yield _FAULTS[request.param](tmp_path, undo)
    finally:
        for step in reversed(undo):
            step()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``tbot-py start -c CONFIG`` (under an optional command prefix); killed at teardown."""
    started: list[Daemon] = []

    def start(config: Path, diag: str, prefix: tuple[str, ...] = ()) -> Daemon:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / f"notify-{len(started)}.sock"))
        log_path = tmp_path / f"daemon-{len(started)}.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [*prefix, TBOT, "start", "-c", str(config)],
                stdout=subprocess.DEVNULL, stderr=log_file, text=True,
                env=clean_env(NOTIFY_SOCKET=notify.getsockname()),
            )  # fmt: skip
        started.append(Daemon(process, diag, notify, log_path))
        return started[-1]

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        daemon.notify.close()


def artifacts(dest: Path) -> dict[str, bytes]:
    """Each artifact's bytes, read through its top-level name (following any symlink)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(dest.iterdir())
        if not p.name.startswith(".") and p.is_file()
    }


def assert_complete(dest: Path) -> None:
    """The certificate chains to the user CA and the key is the certificate's key."""
    verify = _run("openssl", "verify", "-CAfile", f"{dest}/teleport-user-ca.crt", f"{dest}/tlscert")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    cert = x509.load_pem_x509_certificate((dest / "tlscert").read_bytes())
    key = keys.load_private_key_pem((dest / "key").read_bytes())
    assert keys.same_public_key(key.public_key(), cert.public_key())  # type: ignore[arg-type]


def assert_quiet_about_secrets(output: str, token: str) -> None:
    assert "Traceback" not in output
    assert token not in output
    assert "PRIVATE KEY" not in output


def run_as(
    prefix: tuple[str, ...], args: list[str], token: str
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*prefix, TBOT, *args], capture_output=True, text=True, timeout=60, check=False,
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )  # fmt: skip
    assert_quiet_about_secrets(done.stdout + done.stderr, token)
    return done


# -- one-shot -------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["disk-full", "read-only", "permission-denied"], indirect=True)
def test_oneshot_fault_is_one_clear_error_and_keeps_the_previous_artifacts(
    auth: AuthService, tmp_path: Path, fault: Fault
) -> None:
    token = auth.add_bot(f"oneshot-{fault.name}")
    args = start_identity_args(auth, fault.dest, tmp_path / "storage")
    first = run_as(fault.prefix, args, token)
    assert first.returncode == 0, first.stderr
    before, names = artifacts(fault.dest), sorted(os.listdir(fault.dest))
    assert_complete(fault.dest)

    fault.induce()
    failed = run_as(fault.prefix, args, token)
    assert failed.returncode == 1, failed.stderr
    [line] = error_lines(failed.stderr)
    assert fault.reason in line.lower(), line
    assert str(fault.dest) in line, line
    # Byte for byte what the first run wrote, and no debris (temp files) next to it.
    assert artifacts(fault.dest) == before
    assert sorted(os.listdir(fault.dest)) == names
    assert_complete(fault.dest)

    fault.clear()
    again = run_as(fault.prefix, args, token)
    assert again.returncode == 0, again.stderr
    assert artifacts(fault.dest)["tlscert"] != before["tlscert"]
    assert_complete(fault.dest)


def test_oneshot_recreates_a_removed_destination_directory(
    auth: AuthService, tmp_path: Path
) -> None:
    dest = tmp_path / "gone" / "out"
    token = auth.add_bot("oneshot-removed")
    args = start_identity_args(auth, dest, tmp_path / "storage")
    assert run_as((), args, token).returncode == 0
    shutil.rmtree(dest.parent)
    again = run_as((), args, token)
    assert again.returncode == 0, again.stderr
    assert error_lines(again.stderr) == []
    assert (dest.parent.stat().st_mode & 0o777, dest.stat().st_mode & 0o777) == (0o700, 0o700)
    assert_complete(dest)


# -- background mode ------------------------------------------------------------------------


def failed_attempts(log: str) -> list[tuple[int, str]]:
    """(attempt number, line) for each failed run of the output ``out``."""
    found = []
    for line in log.splitlines():
        match = _ATTEMPT.search(line)
        if match:
            found.append((int(match.group(1)), line))
    return found


@pytest.mark.parametrize(
    "fault", ["disk-full", "read-only", "permission-denied", "directory-removed"], indirect=True
)
def test_daemon_retries_a_destination_fault_with_backoff_and_recovers_by_itself(
    auth: AuthService, tmp_path: Path, fault: Fault, launch: Callable[..., Daemon]
) -> None:
    config, diag, token_file = new_config(auth, tmp_path, f"bg-{fault.name}", {"out": fault.dest})
    daemon = launch(config, diag, fault.prefix)
    daemon.wait_healthy()
    before = artifacts(fault.dest)
    assert_complete(fault.dest)

    fault.induce()
    daemon.signal(signal.SIGUSR1)
    wait_for(lambda: len(failed_attempts(daemon.log())) >= 3, 15, "three failed attempts")
    log = daemon.log()
    attempts = failed_attempts(log)
    assert [n for n, _ in attempts] == list(range(1, len(attempts) + 1))
    assert len(attempts) < 10, "retried in a tight loop, not with backoff"
    for _, line in attempts:
        assert fault.reason in line and str(fault.dest) in line, line
    # One line per failed attempt: no other warning or error repeats the reason.
    loud = [line for line in log.splitlines() if " INFO " not in line]
    assert len([line for line in loud if fault.reason in line]) == len(attempts)
    assert "identity: attempt" not in log  # the bot identity, on another disk, kept renewing
    status, body = daemon.readyz()
    assert status == 503, body
    services = body["services"]
    assert isinstance(services, dict)
    assert services["out"]["status"] == "unhealthy"
    assert fault.reason in services["out"]["reason"]
    if fault.name == "directory-removed":
        assert not fault.dest.exists()  # the daemon waits for it; it does not recreate it
    else:
        assert artifacts(fault.dest) == before
        assert_complete(fault.dest)

    fault.clear()
    wait_for(
        lambda: artifacts(fault.dest).get("tlscert", before["tlscert"]) != before["tlscert"],
        30, "new artifacts after the fault cleared",
    )  # fmt: skip
    wait_for(lambda: daemon.readyz()[0] == 200, 10, "/readyz back to 200")
    assert_complete(fault.dest)
    assert daemon.process.poll() is None  # recovered without a restart
    # Fully: a file deleted now is noticed and written again at once, as before the fault.
    (fault.dest / "identity").unlink()
    wait_for((fault.dest / "identity").exists, 10, "the deleted identity file to come back")
    daemon.stop()
    assert_quiet_about_secrets(daemon.log(), token_file.read_text().strip())


# -- the storage lock -----------------------------------------------------------------------


def test_a_second_daemon_on_the_same_storage_exits_with_a_clear_message(
    auth: AuthService, tmp_path: Path, launch: Callable[..., Daemon]
) -> None:
    config, diag, token_file = new_config(auth, tmp_path, "twin", {"out": tmp_path / "out"})
    token, lock = token_file.read_text().strip(), tmp_path / "storage" / "lock"
    first = launch(config, diag)
    first.wait_healthy()
    stored = snapshot(tmp_path / "storage")
    # The same config again: its diagnostics port is taken, which it says in one line.
    same = run_tbot("start", "-c", str(config), timeout=30)
    assert same.returncode == 1, same.stderr
    assert_quiet_about_secrets(same.stderr, token)
    [line] = error_lines(same.stderr)
    assert f"cannot listen on diagnostics address {diag}" in line and "in use" in line, line
    # With a port of its own, the storage lock is what stops it.
    twin = tmp_path / "twin.yaml"
    twin.write_text(config.read_text().replace(diag, f"127.0.0.1:{free_port()}"))
    second = run_tbot("start", "-c", str(twin), timeout=30)
    assert second.returncode == 1, second.stderr
    assert_quiet_about_secrets(second.stderr, token)
    [line] = error_lines(second.stderr)
    assert f"another tbot-py process holds the lock on {lock} (pid {first.process.pid})" in line
    assert "stop it or use a different storage directory" in line

    assert lock.read_text().strip() == str(first.process.pid)
    assert snapshot(tmp_path / "storage") == stored
    cert = (tmp_path / "out" / "tlscert").read_bytes()
    first.signal(signal.SIGUSR1)
    wait_for(lambda: (tmp_path / "out" / "tlscert").read_bytes() != cert, 15, "a renewal")
    assert first.readyz()[0] == 200
    first.stop()
