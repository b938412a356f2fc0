"""The real ``tbot-py init`` run as root: ownership, ACLs, and what other users can then do."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tbot_py.destinations.acl import Reader, apply_reader_acls
from tests.acls import skip_unless_acls_work
from tests.integration.conftest import clean_env, error_lines, run_tbot
from tests.unit.destinations.test_acl import getfacl

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="tbot-py init hands directories to other users: needs root"
)


def runuser(user: str, *command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as ``user`` (we are root) and capture its output."""
    return subprocess.run(
        ["runuser", "-u", user, "--", *command],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )


@pytest.fixture
def reader() -> Iterator[str]:
    """A throwaway system user, deleted afterwards."""
    for tool in ("useradd", "userdel", "runuser"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: cannot make a reader user")
    name = f"tbotpy-r{secrets.token_hex(3)}"
    done = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"useradd failed: {done.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="tbot-py-init-"))
    try:
        base.chmod(0o755)
        skip_unless_acls_work(base)
        yield base
    finally:
        shutil.rmtree(base)


def write_with_reader_acl(dest: Path, name: str, data: bytes, owner: int, reader: str) -> None:
    """Write a file into ``dest`` the way the daemon does: 0600, owned by the bot, reader ACL."""
    dir_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600, dir_fd=dir_fd)
        try:
            os.write(fd, data)
            os.fchown(fd, owner, -1)
        finally:
            os.close(fd)
        readers = [Reader("user", reader)]
        apply_reader_acls(dir_fd, directories=[], files=[name], readers=readers, include_self=False)
    finally:
        os.close(dir_fd)


def test_init_gives_the_bot_the_directory_and_the_reader_read_access(
    reader: str, shared_dir: Path
) -> None:
    dest = shared_dir / "machine-id" / "out"
    done = run_tbot(
        "init", "--destination-dir", str(dest), "--bot-user", "nobody", "--reader-user", reader
    )
    assert done.returncode == 0, done.stderr
    assert f"Prepared {dest} for tbot-py:" in done.stdout
    nobody = pwd.getpwnam("nobody")
    reader_uid = pwd.getpwnam(reader).pw_uid
    for directory in (dest.parent, dest):  # the parent was created too, so it is handed over
        info = os.stat(directory)
        assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid)
        assert getfacl(directory) == [
            "user::rwx", f"user:{reader_uid}:r-x", "group::---", "mask::rwx", "other::---",
        ]  # fmt: skip

    # The bot can write there; a file it writes with the runtime ACL is readable by the reader.
    assert runuser("nobody", "touch", str(dest / "probe")).returncode == 0
    write_with_reader_acl(dest, "somefile", b"secret\n", nobody.pw_uid, reader)
    read = runuser(reader, "cat", str(dest / "somefile"))
    assert read.returncode == 0, read.stderr
    assert read.stdout == "secret\n"
    # Read-only for the reader, and nothing at all for anyone else.
    write = runuser(reader, "sh", "-c", 'echo x >> "$1"', "sh", str(dest / "somefile"))
    assert write.returncode != 0
    assert runuser(reader, "touch", str(dest / "other")).returncode != 0
    assert runuser("daemon", "cat", str(dest / "somefile")).returncode != 0


def run_init_as(uid: int, gid: int, *argv: str) -> tuple[int, str]:
    """``tbot-py init ARGV`` in a forked child that dropped root for ``uid``; (code, stderr).

    A fork, not runuser: the virtualenv's Python may live where other users cannot
    execute it (under /root), but the code already loaded here needs no exec.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 99
        try:
            os.close(read_end)
            sys.stderr = os.fdopen(write_end, "w")
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            from tbot_py.cli.main import main

            main(["init", *argv])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        err = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_init_as_a_plain_user_cannot_give_the_directory_away(reader: str, shared_dir: Path) -> None:
    account = pwd.getpwnam(reader)
    home = shared_dir / "home"
    home.mkdir()
    os.chown(home, account.pw_uid, account.pw_gid)
    dest = home / "d"
    code, err = run_init_as(
        account.pw_uid, account.pw_gid, "--destination-dir", str(dest), "--owner", "root"
    )
    assert code == 1, err
    assert error_lines(err) == [
        f"ERROR: {dest}: changing ownership to root needs root: run tbot-py init as root, "
        "or pass --owner with your own user"
    ]
    assert os.stat(dest).st_uid == account.pw_uid  # created as the user, then refused


def test_unknown_user_is_one_error_line(shared_dir: Path) -> None:
    done = run_tbot(
        "init", "--destination-dir", str(shared_dir / "d"), "--bot-user", "no-such-user-tbotpy"
    )
    assert done.returncode == 1
    assert error_lines(done.stderr) == ["ERROR: --bot-user: unknown user 'no-such-user-tbotpy'"]
    assert "Traceback" not in done.stderr
    assert not (shared_dir / "d").exists()
