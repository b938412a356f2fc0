"""The ``ssh_host`` output end to end: a real ``sshd`` serves its host certificate and trusts
the cluster's users, and a real ``ssh`` logs in with an ``identity`` output of the same cluster.

Needs root (sshd switches to the logged-in user) and ``/usr/sbin/sshd`` (``.ci/run`` installs
openssh-server); without either the sshd tests are skipped with the reason.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tbot_py.config import SSHHostServiceConfig, load_config_text
from tests.integration.conftest import (
    TBOT,
    AuthService,
    clean_env,
    run_tbot,
    start_auth_service,
    start_identity_args,
)

SSHD = "/usr/sbin/sshd"
#: Bot names are unique within the module's one auth service.
_BOTS = itertools.count(1)
HOST_CERT_ROLE = """\
kind: role
version: v7
metadata:
  name: host-certs
spec:
  allow:
    rules:
      - resources: [host_cert]
        verbs: [create]
"""


def _tool(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def _create_role(auth: AuthService, tmp_path: Path) -> None:
    role_file = tmp_path / "role.yaml"
    role_file.write_text(HOST_CERT_ROLE)
    done = run_tbot(
        "auth", "create", "-f", str(role_file), "--force", "--data-dir", str(auth.data_dir)
    )
    assert done.returncode == 0, done.stderr


def _cluster_name(out: Path) -> str:
    (known_hosts,) = out.glob("*.known_hosts")
    return known_hosts.name.removesuffix(".known_hosts")


def _identity(auth: AuthService, tmp_path: Path, name: str) -> Path:
    """A one-shot ``identity`` output for a bot allowed to log in as root."""
    token = auth.add_bot(f"{name}-{next(_BOTS)}", roles="access", logins="root")
    out = tmp_path / f"{name}-out"
    done = run_tbot(
        *start_identity_args(auth, out, tmp_path / f"{name}-storage"),
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )
    assert done.returncode == 0, done.stderr
    return out


def _ssh_host(auth: AuthService, tmp_path: Path, principals: str) -> Path:
    _create_role(auth, tmp_path)
    token = auth.add_bot(f"sshd-host-{next(_BOTS)}", roles="host-certs")
    out = tmp_path / "host-out"
    done = run_tbot(
        "start", "ssh-host",
        "--proxy-server", auth.addr,
        "--ca-pin", auth.ca_pin,
        "--destination", str(out),
        "--storage", str(tmp_path / "host-storage"),
        "--principals", principals,
        "--oneshot",
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout + done.stderr
    return out


def test_ssh_host_writes_a_host_certificate_and_the_user_ca(
    auth: AuthService, tmp_path: Path, need_tools: None
) -> None:
    out = _ssh_host(auth, tmp_path, "node1.example.com,127.0.0.1")
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert {"ssh_host", "ssh_host-cert.pub", "ssh_host-user-ca.pub"} <= names
    listing = _tool("ssh-keygen", "-L", "-f", str(out / "ssh_host-cert.pub"))
    assert "host certificate" in listing
    principals = listing.split("Principals:")[1].split("Critical Options:")[0].split()
    assert principals == ["node1.example.com", "127.0.0.1"]
    # The certified key is the written private key.
    derived = _tool("ssh-keygen", "-y", "-f", str(out / "ssh_host")).split()[:2]
    assert (out / "ssh_host-cert.pub").read_text().split()[0].startswith(derived[0])
    # Every user CA line is a key ssh-keygen reads (what TrustedUserCAKeys parses).
    _tool("ssh-keygen", "-l", "-f", str(out / "ssh_host-user-ca.pub"))


def test_a_bot_without_the_host_cert_rule_is_refused(auth: AuthService, tmp_path: Path) -> None:
    token = auth.add_bot("no-hosts", roles="access")
    done = run_tbot(
        "start", "ssh-host",
        "--proxy-server", auth.addr,
        "--ca-pin", auth.ca_pin,
        "--destination", str(tmp_path / "out"),
        "--storage", str(tmp_path / "storage"),
        "--principals", "node1",
        "--oneshot",
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )  # fmt: skip
    assert done.returncode != 0
    assert 'bot "no-hosts" may not create host certificates' in done.stderr
    assert not (tmp_path / "out" / "ssh_host").exists()


# --- a real sshd -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def sshd_ready() -> None:
    if not os.path.exists(SSHD):
        pytest.skip(f"SSHD TESTS SKIPPED: {SSHD} is missing (apt-get install openssh-server)")
    if os.geteuid() != 0:
        pytest.skip("SSHD TESTS SKIPPED: sshd must run as root to log a user in")
    if shutil.which("ssh") is None:
        pytest.skip("SSHD TESTS SKIPPED: ssh is missing (apt-get install openssh-client)")


@pytest.fixture
def sshd(auth: AuthService, tmp_path: Path, sshd_ready: None) -> Iterator[tuple[int, str]]:
    """sshd on 127.0.0.1 with the ``ssh_host`` artifacts; yields (port, host name to dial)."""
    # The cluster name, for a host name the identity output's known_hosts trusts.
    probe = _identity(auth, tmp_path, "probe")
    host = f"node1.{_cluster_name(probe)}"
    out = _ssh_host(auth, tmp_path, host)
    port = _free_port()
    config = tmp_path / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {out / 'ssh_host'}\n"
        f"HostCertificate {out / 'ssh_host-cert.pub'}\n"
        f"TrustedUserCAKeys {out / 'ssh_host-user-ca.pub'}\n"
        "AuthorizedKeysFile none\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "UsePAM no\n"
        "StrictModes no\n"
        f"PidFile {tmp_path / 'sshd.pid'}\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    check = subprocess.run(
        [SSHD, "-t", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
    log = tmp_path / "sshd.log"
    process = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(log)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, log.read_text() if log.exists() else "sshd exited"
                assert time.monotonic() < deadline, "sshd did not listen within 20s"
                time.sleep(0.05)
        yield port, host
    finally:
        process.terminate()
        process.wait(timeout=10)


def _ssh(out: Path, port: int, host: str) -> subprocess.CompletedProcess[str]:
    """``ssh root@127.0.0.1`` with an identity output, trusting only its known_hosts."""
    argv = [
        "ssh",
        "-F", "none",
        "-p", str(port),
        "-i", str(out / "key"),
        "-o", f"CertificateFile={out / 'key-cert.pub'}",
        "-o", f"UserKnownHostsFile={next(out.glob('*.known_hosts'))}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", f"HostKeyAlias={host}",
        "-o", "ConnectTimeout=10",
        "-l", "root",
        "127.0.0.1",
        "echo logged-in-as-$(id -un)",
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_ssh_logs_in_to_sshd_with_the_clusters_host_and_user_certificates(
    auth: AuthService, sshd: tuple[int, str], tmp_path: Path
) -> None:
    port, host = sshd
    out = _identity(auth, tmp_path, "user")
    done = _ssh(out, port, host)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "logged-in-as-root"


def test_a_user_certificate_of_another_cluster_is_refused(
    auth: AuthService, sshd: tuple[int, str], tmp_path: Path
) -> None:
    port, host = sshd
    other = start_auth_service(tmp_path / "other-auth")
    try:
        out = _identity(other, tmp_path, "stranger")
    finally:
        other.stop()
    # Trust our cluster's host CA so that only user authentication can fail.
    trusted = _identity(auth, tmp_path, "trusting")
    (known_hosts,) = out.glob("*.known_hosts")
    shutil.copy(next(trusted.glob("*.known_hosts")), known_hosts)
    done = _ssh(out, port, host)
    assert done.returncode == 255
    assert "Permission denied" in done.stderr
    assert "logged-in-as" not in done.stdout


def test_configure_ssh_host_prints_a_config_that_loads(tmp_path: Path) -> None:
    done = run_tbot(
        "configure", "ssh-host",
        "--auth-server", "auth.example.com:3025",
        "--destination", str(tmp_path / "out"),
        "--principals", "node1.example.com, 10.0.0.5",
        "--name", "sshd",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = load_config_text(done.stdout)
    (service,) = config.services
    assert isinstance(service, SSHHostServiceConfig)
    assert service.name == "sshd"
    assert service.principals == ["node1.example.com", "10.0.0.5"]


def test_start_ssh_host_without_principals_is_one_clear_error(tmp_path: Path) -> None:
    done = run_tbot(
        "start", "ssh-host",
        "--auth-server", "auth.example.com:3025",
        "--destination", str(tmp_path / "out"),
        "--principals", ",",
        "--oneshot",
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "ERROR: --principals: must list at least one principal (the host names clients dial)"
    ]


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def test_the_daemon_renews_the_host_certificate_and_runs_the_hook(
    auth: AuthService, tmp_path: Path
) -> None:
    _create_role(auth, tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(auth.add_bot(f"sshd-daemon-{next(_BOTS)}", roles="host-certs"))
    out, hook_log = tmp_path / "out", tmp_path / "hooks"
    script = (
        "import os; open(os.environ['HOOK_LOG'], 'a').write(os.environ['TBOT_PY_FILES'] + '\\n')"
    )
    config = tmp_path / "tbot.yaml"
    config.write_text(
        "version: v2\n"
        f"proxy_server: {auth.addr}\n"
        f"onboarding: {{token: {token_file}, ca_pins: ['{auth.ca_pin}']}}\n"
        f"storage: {{type: directory, path: {tmp_path / 'storage'}}}\n"
        "services:\n"
        "  - type: ssh_host\n"
        "    name: sshd\n"
        "    principals: [node1.example.com]\n"
        f"    destination: {{type: directory, path: {out}}}\n"
        "    hooks:\n"
        f"      - command: [{sys.executable!r}, '-c', {script!r}]\n"
    )
    log = tmp_path / "daemon.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [TBOT, "start", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=clean_env(HOOK_LOG=str(hook_log)),
        )
    try:
        _wait_for(hook_log.exists, "the first hook run")
        first = (out / "ssh_host-cert.pub").read_bytes()
        assert set(hook_log.read_text().split()) == {
            "ssh_host",
            "ssh_host-cert.pub",
            "ssh_host-user-ca.pub",
        }
        process.send_signal(signal.SIGUSR1)
        _wait_for(lambda: (out / "ssh_host-cert.pub").read_bytes() != first, "a renewal")
        _wait_for(lambda: len(hook_log.read_text().splitlines()) == 2, "the second hook run")
        listing = _tool("ssh-keygen", "-L", "-f", str(out / "ssh_host-cert.pub"))
        assert "host certificate" in listing
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in log.read_text()
