from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tbot_py.destinations import Destination, DirectoryDestination
from tbot_py.errors import DestinationError, StorageLockedError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (_mode(p), p.read_bytes()) for p in sorted(path.iterdir())}


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture
def dest(tmp_path: Path) -> DirectoryDestination:
    d = DirectoryDestination(tmp_path / "out")
    d.init()
    return d


def test_directory_destination_satisfies_the_protocol(dest: DirectoryDestination) -> None:
    d: Destination = dest
    assert d.is_persistent
    assert d.describe() == f"directory {dest.path}"


@pytest.mark.parametrize("mask", [0o000, 0o077, 0o277])
def test_init_creates_directory_and_parents_0700_whatever_the_umask(
    tmp_path: Path, umask: None, mask: int
) -> None:
    os.umask(mask)
    target = tmp_path / "a" / "b" / "c"
    DirectoryDestination(target).init()
    for path in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert path.is_dir()
        assert _mode(path) == 0o700


@pytest.mark.parametrize("mask", [0o000, 0o077, 0o277])
def test_files_are_0600_whatever_the_umask(
    dest: DirectoryDestination, umask: None, mask: int
) -> None:
    os.umask(mask)
    dest.write("key", b"secret")
    dest.write_many({"tlscert": b"a", "key-cert.pub": b"b"})
    for name in ("key", "tlscert", "key-cert.pub"):
        assert _mode(dest.path / name) == 0o600


def test_init_of_existing_directory_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir(mode=0o750)
    target.chmod(0o750)
    (target / "identity").write_bytes(b"old")
    (target / "identity").chmod(0o640)
    before = _snapshot(target)

    DirectoryDestination(target).init()

    assert _mode(target) == 0o750
    assert _snapshot(target) == before


def test_init_rejects_a_file_at_the_path(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"not a dir")
    with pytest.raises(DestinationError, match="destination path is not a directory") as info:
        DirectoryDestination(target).init()
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"not a dir"


def test_init_rejects_a_file_in_the_parents(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DestinationError, match="destination path is not a directory"):
        DirectoryDestination(tmp_path / "file" / "out").init()


def test_write_then_read_round_trips(dest: DirectoryDestination) -> None:
    dest.write("identity", b"\x00binary\xff")
    assert dest.read("identity") == b"\x00binary\xff"
    assert (dest.path / "identity").read_bytes() == b"\x00binary\xff"


def test_write_many_writes_all_files_and_leaves_no_temp(dest: DirectoryDestination) -> None:
    files = {"key": b"k", "key.pub": b"p", "tlscert": b"t"}
    dest.write_many(files)
    assert {p.name: p.read_bytes() for p in dest.path.iterdir()} == files


def test_write_replaces_atomically_and_open_readers_keep_old_content(
    dest: DirectoryDestination,
) -> None:
    dest.write("key", b"old key")
    path = dest.path / "key"
    old_inode = path.stat().st_ino
    with path.open("rb") as reader:
        dest.write("key", b"new key")
        assert reader.read() == b"old key"
    assert path.stat().st_ino != old_inode
    assert path.read_bytes() == b"new key"


def test_write_replaces_a_symlink_instead_of_following_it(
    dest: DirectoryDestination, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"do not touch")
    (dest.path / "key").symlink_to(outside)
    with pytest.raises(DestinationError, match="symlink"):
        dest.read("key")
    dest.write("key", b"new")
    assert outside.read_bytes() == b"do not touch"
    assert not (dest.path / "key").is_symlink()
    assert dest.read("key") == b"new"


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
    ],
)
@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_failed_write_keeps_old_content_and_removes_temp(
    dest: DirectoryDestination,
    monkeypatch: pytest.MonkeyPatch,
    err: int,
    reason: str,
    failing: str,
) -> None:
    dest.write("key", b"old key")
    real_write = os.write

    def failing_write(fd: int, data: bytes) -> int:
        # Write half so the temp file is really half-written, then fail.
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(err, os.strerror(err))

    def failing_fsync(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    if failing == "write":
        monkeypatch.setattr(os, "write", failing_write)
    else:
        monkeypatch.setattr(os, "fsync", failing_fsync)

    with pytest.raises(DestinationError) as info:
        dest.write("key", b"new key that is longer")

    monkeypatch.undo()
    assert str(info.value) == f"{dest.path / 'key'}: cannot write file: {reason}"
    assert (dest.path / "key").read_bytes() == b"old key"
    assert sorted(p.name for p in dest.path.iterdir()) == ["key"]


def test_failed_write_many_replaces_nothing(
    dest: DirectoryDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest.write_many({"key": b"old key", "tlscert": b"old cert"})
    real_fsync = os.fsync
    calls = []

    def fsync_fails_second_time(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_second_time)
    with pytest.raises(DestinationError, match="no space left on device"):
        dest.write_many({"key": b"new key", "tlscert": b"new cert"})
    monkeypatch.undo()

    assert dest.read("key") == b"old key"
    assert dest.read("tlscert") == b"old cert"
    assert sorted(p.name for p in dest.path.iterdir()) == ["key", "tlscert"]


def test_write_fsyncs_file_and_directory(
    dest: DirectoryDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    synced: list[bool] = []

    def recording_fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    dest.write_many({"a": b"1", "b": b"2"})
    # One fsync per file, then one for the directory after the renames.
    assert synced == [False, False, True]


def test_write_into_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    d = DirectoryDestination(tmp_path / "never-initialised")
    with pytest.raises(DestinationError, match="directory does not exist"):
        d.write("key", b"x")


def test_read_missing_returns_none_and_creates_nothing(dest: DirectoryDestination) -> None:
    assert dest.read("key") is None
    assert list(dest.path.iterdir()) == []


def test_read_in_missing_directory_returns_none(tmp_path: Path) -> None:
    d = DirectoryDestination(tmp_path / "missing")
    assert d.read("key") is None
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", "a\0b", "x/../y"])
def test_bad_names_are_rejected(dest: DirectoryDestination, name: str) -> None:
    with pytest.raises(DestinationError, match="invalid artifact name"):
        dest.write(name, b"x")
    with pytest.raises(DestinationError, match="invalid artifact name"):
        dest.read(name)
    with pytest.raises(DestinationError, match="invalid artifact name"):
        dest.write_many({"fine": b"x", name: b"y"})
    assert list(dest.path.iterdir()) == []


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    d = DirectoryDestination("rel")
    assert d.path == tmp_path / "rel"


# -- lock --------------------------------------------------------------------

_HOLD_LOCK = """
import sys, time
from tbot_py.destinations import DirectoryDestination
lock = DirectoryDestination(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_writes_pid_and_is_released(dest: DirectoryDestination) -> None:
    lock = dest.lock()
    lock_file = dest.path / "lock"
    assert lock_file.read_text() == f"{os.getpid()}\n"
    assert _mode(lock_file) == 0o600
    lock.release()
    lock.release()  # harmless twice
    with dest.lock():
        pass


def test_second_lock_in_same_process_is_refused(dest: DirectoryDestination) -> None:
    with dest.lock(), pytest.raises(StorageLockedError, match=f"pid {os.getpid()}"):
        dest.lock()


def test_lock_held_by_another_process_names_its_pid(dest: DirectoryDestination) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(dest.path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StorageLockedError) as info:
            dest.lock()
        message = str(info.value)
        assert f"another tbot-py process holds the lock on {dest.path / 'lock'}" in message
        assert f"(pid {holder.pid})" in message
        assert "use a different storage directory" in message
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()

    # The kernel drops a dead holder's lock: we can take it now.
    deadline = time.monotonic() + 5
    while True:
        try:
            lock = dest.lock()
            break
        except StorageLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert (dest.path / "lock").read_text() == f"{os.getpid()}\n"
    lock.release()


def test_failed_rename_leaves_no_temp_files(
    dest: DirectoryDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest.write("key", b"old")
    real_replace = os.replace

    def replace_fails_second_time(src: str, dst: str) -> None:
        if str(dst).endswith("tlscert"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_second_time)
    with pytest.raises(DestinationError, match="Input/output error"):
        dest.write_many({"key": b"new", "tlscert": b"cert"})
    monkeypatch.undo()
    # The first rename happened (each file is whole); the failed one left nothing.
    assert sorted(p.name for p in dest.path.iterdir()) == ["key"]
    assert dest.read("key") == b"new"
