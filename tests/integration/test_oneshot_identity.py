"""`start identity --oneshot` against a real `auth start` process, checked with real tools."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from tbot_py.identity.identityfile import parse_identity_file
from tbot_py.identity.tlsid import TLSIdentity
from tests.expected import BOT_STORAGE_FILES, IDENTITY_FILES, SSH_FILES, artifact_names
from tests.integration.conftest import (
    TBOT,
    AuthService,
    clean_env,
    error_lines,
    run_tbot,
    snapshot,
    start_auth_service,
    start_identity_args,
)


def tool(*argv: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, input=stdin, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr.decode()}"
    return done.stdout.decode()


def bot_tls_identity(storage: Path) -> TLSIdentity:
    cert = x509.load_pem_x509_certificate((storage / "tlscert").read_bytes())
    return TLSIdentity.from_subject(cert.subject)


def join(auth: AuthService, dest: Path, storage: Path | str, token: str, *extra: str) -> str:
    done = run_tbot(
        *start_identity_args(auth, dest, storage, *extra),
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout + done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def joined(auth: AuthService, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One successful join into a fresh destination and storage, shared by the read-only checks."""
    base = tmp_path_factory.mktemp("joined")
    token = auth.add_bot("ci", roles="access,editor", logins="deployer,root")
    join(auth, base / "out", base / "storage", token)
    return base / "out", base / "storage"


def test_join_writes_exactly_tbots_identity_artifacts(joined: tuple[Path, Path]) -> None:
    out, storage = joined
    names = artifact_names(out)
    cluster_files = {n for n in names if n.endswith((".ssh_config", ".known_hosts"))}
    assert names - cluster_files == IDENTITY_FILES | SSH_FILES
    assert len(cluster_files) == 2
    assert artifact_names(storage) >= BOT_STORAGE_FILES
    assert not [n for n in names if ".tmp" in n], "temporary files left behind"


def test_files_are_0600_and_directories_0700(joined: tuple[Path, Path]) -> None:
    for directory in joined:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for path in directory.iterdir():
            # stat() follows the artifact links into the version directories.
            expected = 0o700 if path.is_dir() else 0o600
            assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_ssh_keygen_shows_principals_key_id_and_one_hour_validity(
    joined: tuple[Path, Path], need_tools: None
) -> None:
    out, _ = joined
    listing = tool("ssh-keygen", "-L", "-f", str(out / "key-cert.pub"))
    assert "user certificate" in listing
    assert 'Key ID: "bot-ci"' in listing
    principals = re.search(r"Principals:\s*\n((?:\s+\S+\n)+)", listing)
    assert principals is not None
    assert principals.group(1).split() == ["deployer", "root"]
    valid = re.search(r"Valid: from (\S+) to (\S+)", listing)
    assert valid is not None
    start, end = (datetime.fromisoformat(v) for v in valid.groups())
    # One hour as requested, plus NotBefore backdated by one minute.
    assert timedelta(minutes=60) <= end - start <= timedelta(minutes=61, seconds=5)
    assert "teleport-roles" in listing


def test_openssl_verifies_tlscert_against_the_user_ca(
    joined: tuple[Path, Path], need_tools: None
) -> None:
    out, _ = joined
    result = tool(
        "openssl", "verify", "-CAfile", str(out / "teleport-user-ca.crt"), str(out / "tlscert")
    )
    assert result.strip().endswith(": OK")
    subject = tool("openssl", "x509", "-in", str(out / "tlscert"), "-noout", "-subject", "-issuer")
    assert "CN = bot-ci" in subject
    assert "O = access, O = editor" in subject
    assert "1.3.9999.2.18 = ci" in subject  # bot name OID
    assert "issuer=CN = tbot-py.local, O = tbot-py.local" in subject


def test_private_key_matches_both_certificates(joined: tuple[Path, Path], need_tools: None) -> None:
    out, _ = joined
    key = str(out / "key")
    tls_public = tool("openssl", "x509", "-in", str(out / "tlscert"), "-noout", "-pubkey")
    assert tool("openssl", "pkey", "-in", key, "-pubout") == tls_public
    ssh_public = tool("ssh-keygen", "-y", "-f", key).split()[:2]
    assert (out / "key.pub").read_text().split()[:2] == ssh_public
    cert_fp = re.search(
        r"Public key: ECDSA-CERT (\S+)", tool("ssh-keygen", "-L", "-f", str(out / "key-cert.pub"))
    )
    key_fp = tool("ssh-keygen", "-l", "-f", str(out / "key.pub")).split()[1]
    assert cert_fp is not None
    assert cert_fp.group(1) == key_fp


def test_identity_file_parses_and_matches_the_separate_artifacts(joined: tuple[Path, Path]) -> None:
    out, _ = joined
    parsed = parse_identity_file((out / "identity").read_bytes())
    assert parsed.private_key_pem.strip() == (out / "key").read_bytes().strip()
    assert parsed.ssh_cert.strip() == (out / "key-cert.pub").read_bytes().strip()
    assert parsed.tls_cert_pem.strip() == (out / "tlscert").read_bytes().strip()
    assert len(parsed.ssh_ca_lines) >= 1
    assert all(
        line.startswith(b"@cert-authority tbot-py.local,*.tbot-py.local ")
        for line in parsed.ssh_ca_lines
    )
    host_ca = (out / "teleport-host-ca.crt").read_bytes().strip()
    assert any(pem.strip() == host_ca for pem in parsed.tls_ca_pems)


def test_ssh_config_resolves_node_hosts_to_our_files(
    joined: tuple[Path, Path], need_tools: None
) -> None:
    out, _ = joined
    resolved = tool("ssh", "-F", str(out / "ssh_config"), "-G", "node1.tbot-py.local")
    options = dict(line.split(" ", 1) for line in resolved.splitlines() if " " in line)
    assert options["identityfile"] == str(out / "key")
    assert options["certificatefile"] == str(out / "key-cert.pub")
    assert options["userknownhostsfile"] == str(out / "known_hosts")
    assert options["port"] == "3022"
    assert "ssh-proxy-command" in options["proxycommand"]
    known = (out / "known_hosts").read_text().split()
    assert known[0] == "@cert-authority"
    assert known[1].split(",")[1:] == ["tbot-py.local", "*.tbot-py.local"]


def test_second_run_renews_the_stored_identity_without_a_token(
    auth: AuthService, tmp_path: Path
) -> None:
    token = auth.add_bot("renewer")
    out, storage = tmp_path / "out", tmp_path / "storage"
    join(auth, out, storage, token)
    first = bot_tls_identity(storage)
    first_cert = (out / "tlscert").read_bytes()
    assert first.generation == 1

    done = run_tbot(*start_identity_args(auth, out, storage))  # no token anywhere
    assert done.returncode == 0, done.stderr
    second = bot_tls_identity(storage)
    assert second.generation == 2
    assert second.bot_instance_id == first.bot_instance_id
    assert (out / "tlscert").read_bytes() != first_cert
    assert "renewed the bot identity" in done.stderr


def test_reused_token_is_refused_with_403_and_changes_no_destination(
    auth: AuthService, tmp_path: Path
) -> None:
    token = auth.add_bot("reuse")
    out = tmp_path / "out"
    join(auth, out, tmp_path / "storage", token)
    before = snapshot(out)

    done = run_tbot(
        *start_identity_args(auth, out, "memory://"), env=clean_env(TELEPORT_BOT_TOKEN=token)
    )
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert "HTTP 403" in line
    assert "token is not valid" in line
    assert token not in done.stderr
    assert snapshot(out) == before


def test_wrong_ca_pin_is_refused_before_the_token_is_used(
    auth: AuthService, tmp_path: Path
) -> None:
    token = auth.add_bot("pinned")
    out, storage = tmp_path / "out", tmp_path / "storage"
    out.mkdir()
    (out / "keep").write_text("old")
    before = snapshot(out)
    args = start_identity_args(auth, out, storage)
    args[args.index(auth.ca_pin)] = "sha256:" + "0" * 64
    done = run_tbot(*args, env=clean_env(TELEPORT_BOT_TOKEN=token))
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert "does not match any configured CA pin" in line
    assert snapshot(out) == before
    assert "Traceback" not in done.stderr
    # The token never reached the impostor, so it still works with the right pin.
    join(auth, out, storage, token)


def test_config_file_with_token_file_and_env_proxy(auth: AuthService, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(auth.add_bot("fromfile", roles="access") + "\n")
    out, storage = tmp_path / "out", tmp_path / "storage"
    config = tmp_path / "tbot.yaml"
    config.write_text(
        "version: v2\n"
        "onboarding:\n"
        f"  token: {token_file}\n"
        f"  ca_pins: ['{auth.ca_pin}']\n"
        f"storage: {{type: directory, path: {storage}}}\n"
        "oneshot: true\n"
        "services:\n"
        "  - type: identity\n"
        "    name: from-file\n"
        "    ssh_config: off\n"
        f"    destination: {{type: directory, path: {out}}}\n"
    )
    done = run_tbot("start", env=clean_env(TBOT_CONFIG_PATH=str(config), TELEPORT_PROXY=auth.addr))
    assert done.returncode == 0, done.stderr
    names = artifact_names(out)
    assert "ssh_config" not in names
    assert "known_hosts" not in names
    assert {"identity", "tlscert", "key"} <= names
    # As in tbot, the token file may be deleted after the first join, with the config
    # still naming it: renewing the stored identity does not need it.
    token_file.unlink()
    done = run_tbot("start", "-c", str(config), env=clean_env(TELEPORT_PROXY=auth.addr))
    assert done.returncode == 0, done.stderr
    assert "renewed the bot identity" in done.stderr


def test_memory_storage_and_memory_destination_write_nothing_to_disk(
    auth: AuthService, tmp_path: Path
) -> None:
    token = auth.add_bot("ephemeral")
    done = run_tbot(
        "start", "identity", "--proxy-server", auth.addr, "--ca-pin", auth.ca_pin,
        "--destination", "memory://", "--storage", "memory://", "--oneshot",
        env=clean_env(TELEPORT_BOT_TOKEN=token, HOME=str(tmp_path)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "storage is in memory" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_changed_token_discards_the_stored_identity_and_joins_again(
    auth: AuthService, tmp_path: Path
) -> None:
    out, storage = tmp_path / "out", tmp_path / "storage"
    join(auth, out, storage, auth.add_bot("rotated"))
    first = bot_tls_identity(storage)
    stderr = join(auth, out, storage, auth.add_token("rotated"))
    second = bot_tls_identity(storage)
    assert "join token changed" in stderr
    assert second.bot_instance_id != first.bot_instance_id
    assert second.generation == 1


def test_second_process_on_the_same_storage_is_refused(auth: AuthService, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    join(auth, tmp_path / "out", storage, auth.add_bot("locked"))
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(storage / 'lock')!r}, os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(30)\n",
        ],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(storage)
        done = run_tbot(*start_identity_args(auth, tmp_path / "out", storage))
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert "holds the lock" in line
    assert snapshot(storage) == before


def test_auth_service_restart_keeps_bots_and_instances(tmp_path: Path) -> None:
    data = tmp_path / "auth"
    first = start_auth_service(data)
    try:
        token = first.add_bot("durable")
        out, storage = tmp_path / "out", tmp_path / "storage"
        join(first, out, storage, token)
    finally:
        first.stop()
    assert first.process.returncode == 0
    second = start_auth_service(data)
    try:
        assert second.ca_pin == first.ca_pin
        # The address changed (port 0), the CA did not: renewal still verifies.
        done = run_tbot(*start_identity_args(second, out, storage))
        assert done.returncode == 0, done.stderr
        assert bot_tls_identity(storage).generation == 2
        listing = run_tbot("auth", "bots", "ls", "--data-dir", str(data), "--format", "json")
        assert listing.returncode == 0, listing.stderr
        assert '"durable"' in listing.stdout
    finally:
        second.stop()
    for path in data.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_concurrent_double_spend_of_one_token_has_exactly_one_winner(
    auth: AuthService, tmp_path: Path
) -> None:
    """Eight processes race to join with one single-use token: one joins, seven get 403."""
    token = auth.add_bot("racer")
    racers = [
        subprocess.Popen(
            [TBOT, *start_identity_args(auth, tmp_path / f"out{i}", tmp_path / f"s{i}")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(TELEPORT_BOT_TOKEN=token),
        )
        for i in range(8)
    ]
    outcomes = [(racer.wait(timeout=60), racer.communicate()[1]) for racer in racers]
    winners = [err for code, err in outcomes if code == 0]
    losers = [err for code, err in outcomes if code != 0]
    assert len(winners) == 1
    assert len(losers) == 7
    for err in losers:
        [line] = error_lines(err)
        assert "HTTP 403" in line
        assert token not in err
