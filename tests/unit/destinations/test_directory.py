from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tbot_py.destinations import Destination, DirectoryDestination, layout
from tbot_py.errors import DestinationError, StorageLockedError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _artifacts(path: Path) -> dict[str, bytes]:
    """Every artifact through its flat name (following our links), as a reader sees it."""
    return {
        p.name: p.read_bytes()
        for p in sorted(path.iterdir())
        if not layout.is_layout_entry(p.name) and not p.name.startswith(".")
    }


def _versions(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if layout.is_version_name(p.name))


def _current(path: Path) -> Path:
    return path / os.readlink(path / "..data")


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
def test_files_are_0600_in_0700_version_directories_whatever_the_umask(
    dest: DirectoryDestination, umask: None, mask: int
) -> None:
    os.umask(mask)
    dest.write_many({"key": b"k", "tlscert": b"c"})
    assert _mode(_current(dest.path)) == 0o700
    for name in ("key", "tlscert"):
        assert stat.S_IMODE((dest.path / name).stat().st_mode) == 0o600


def test_init_of_existing_directory_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "existing"
    target.mkdir(mode=0o750)
    os.chmod(target, 0o750)
    (target / "keep").write_bytes(b"mine")
    DirectoryDestination(target).init()
    assert _mode(target) == 0o750
    assert sorted(p.name for p in target.iterdir()) == ["keep"]


def test_init_rejects_a_file_at_the_path(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"x")
    with pytest.raises(DestinationError, match="not a directory"):
        DirectoryDestination(target).init()
    assert target.read_bytes() == b"x"


def test_init_rejects_a_file_in_the_parents(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(DestinationError, match="not a directory"):
        DirectoryDestination(tmp_path / "file" / "sub").init()


def test_write_then_read_round_trips_through_a_link_into_the_current_version(
    dest: DirectoryDestination,
) -> None:
    dest.write("identity", b"\x00binary\xff")
    assert dest.read("identity") == b"\x00binary\xff"
    assert (dest.path / "identity").read_bytes() == b"\x00binary\xff"
    assert os.readlink(dest.path / "identity") == "..data/identity"
    assert layout.is_version_name(os.readlink(dest.path / "..data"))


def test_write_many_publishes_one_version_and_leaves_no_temp(dest: DirectoryDestination) -> None:
    files = {"key": b"k", "key.pub": b"p", "tlscert": b"t"}
    dest.write_many(files)
    version = os.readlink(dest.path / "..data")
    assert sorted(p.name for p in dest.path.iterdir()) == sorted(
        ["..data", "..lock", version, *files]
    )
    assert {p.name: p.read_bytes() for p in _current(dest.path).iterdir()} == files
    assert _artifacts(dest.path) == files


def test_a_set_changes_together_and_the_previous_version_stays_readable(
    dest: DirectoryDestination,
) -> None:
    dest.write_many({"key": b"key 1", "tlscert": b"cert 1"})
    first = _current(dest.path)
    dest.write_many({"key": b"key 2", "tlscert": b"cert 2"})
    second = _current(dest.path)
    assert first != second
    # A reader that resolved ..data before the swap still reads a whole, matching old set.
    assert (first / "key").read_bytes() == b"key 1"
    assert (first / "tlscert").read_bytes() == b"cert 1"
    assert dest.read_many(["key", "tlscert"]) == {"key": b"key 2", "tlscert": b"cert 2"}
    dest.write_many({"key": b"key 3", "tlscert": b"cert 3"})
    # Only the current and the previous version are kept.
    assert _versions(dest.path) == sorted([second.name, _current(dest.path).name])


def test_a_partial_write_carries_the_other_files_over_by_hard_link(
    dest: DirectoryDestination,
) -> None:
    dest.write_many({"key": b"k", "tlscert": b"c"})
    before = (dest.path / "tlscert").stat().st_ino
    dest.write("key", b"k2")
    assert _artifacts(dest.path) == {"key": b"k2", "tlscert": b"c"}
    assert (dest.path / "tlscert").stat().st_ino == before


def test_files_a_full_write_leaves_unchanged_are_linked_not_rewritten(
    dest: DirectoryDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest.write_many({"ca": b"same CA", "key": b"k1"})
    ca_inode = (dest.path / "ca").stat().st_ino
    flushed: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        flushed.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    dest.write_many({"ca": b"same CA", "key": b"k2"})
    assert _artifacts(dest.path) == {"ca": b"same CA", "key": b"k2"}
    assert (dest.path / "ca").stat().st_ino == ca_inode
    assert flushed.count("file") == 1  # the new key only


def test_an_unchanged_file_someone_chmodded_is_written_afresh(dest: DirectoryDestination) -> None:
    dest.write_many({"ca": b"same CA"})
    os.chmod(_current(dest.path) / "ca", 0o644)
    dest.write_many({"ca": b"same CA"})
    assert _mode(_current(dest.path) / "ca") == 0o600


def test_open_readers_keep_old_content(dest: DirectoryDestination) -> None:
    dest.write("key", b"old key")
    path = dest.path / "key"
    with path.open("rb") as reader:
        dest.write("key", b"new key")
        assert reader.read() == b"old key"
    assert path.read_bytes() == b"new key"


# -- symlinks -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["secure", "try-secure"])
def test_a_planted_symlink_at_an_artifact_name_is_refused(tmp_path: Path, mode: str) -> None:
    dest = DirectoryDestination(tmp_path / "out", symlinks=mode)  # type: ignore[arg-type]
    dest.init()
    dest.write_many({"key": b"old", "tlscert": b"old cert"})
    outside = tmp_path / "outside"
    outside.write_bytes(b"do not touch")
    (dest.path / "key").unlink()
    (dest.path / "key").symlink_to(outside)
    before = _versions(dest.path)
    with pytest.raises(DestinationError) as info:
        dest.write_many({"key": b"new", "tlscert": b"new cert"})
    assert str(info.value).startswith(f"{dest.path / 'key'}: is a symlink to {outside}")
    assert f"symlinks: {mode}" in str(info.value)
    assert outside.read_bytes() == b"do not touch"
    assert _versions(dest.path) == before
    assert (dest.path / "tlscert").read_bytes() == b"old cert"


def test_insecure_mode_replaces_a_planted_symlink_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = DirectoryDestination(tmp_path / "out", symlinks="insecure")
    dest.init()
    outside = tmp_path / "outside"
    outside.write_bytes(b"do not touch")
    (dest.path / "key").symlink_to(outside)
    with caplog.at_level(logging.WARNING):
        dest.write("key", b"new")
    assert "replacing the symlink key" in caplog.text
    assert outside.read_bytes() == b"do not touch"
    assert (dest.path / "key").read_bytes() == b"new"


@pytest.mark.parametrize("mode", ["secure", "try-secure"])
def test_a_symlinked_parent_directory_is_refused(tmp_path: Path, mode: str) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    dest = DirectoryDestination(tmp_path / "link" / "out", symlinks=mode)  # type: ignore[arg-type]
    with pytest.raises(DestinationError) as info:
        dest.init()
    assert f"{tmp_path / 'link'} is a symlink" in str(info.value)
    assert f"use the real path {real}" in str(info.value)
    assert list(real.iterdir()) == []
    with pytest.raises(DestinationError, match="is a symlink"):
        dest.write("key", b"x")
    assert list(real.iterdir()) == []


def test_insecure_mode_follows_a_symlinked_parent(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    dest = DirectoryDestination(tmp_path / "link" / "out", symlinks="insecure")
    dest.init()
    dest.write("key", b"x")
    assert (real / "out" / "key").read_bytes() == b"x"


def test_a_path_swapped_for_a_symlink_after_it_was_opened_cannot_redirect_the_write(
    dest: DirectoryDestination, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest.write("key", b"old")
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    moved = tmp_path / "moved"
    real_build = layout.build_version

    def swap_then_build(*args: object, **kwargs: object) -> tuple[str, int]:
        # Between the check (the directory was opened) and the use (the writes).
        os.rename(dest.path, moved)
        os.symlink(attacker, dest.path)
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(layout, "build_version", swap_then_build)
    dest.write("key", b"new")
    assert list(attacker.iterdir()) == []
    assert (moved / "key").read_bytes() == b"new"


def test_data_link_pointing_outside_is_refused(dest: DirectoryDestination, tmp_path: Path) -> None:
    (dest.path / "..data").symlink_to(tmp_path)
    with pytest.raises(DestinationError, match=r"\.\.data: points at .* not a tbot-py version"):
        dest.read("key")
    with pytest.raises(DestinationError, match="not a tbot-py version"):
        dest.write("key", b"x")


# -- failures and recovery --------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
    ],
)
@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_failed_write_changes_nothing_and_leaves_no_version_behind(
    dest: DirectoryDestination,
    monkeypatch: pytest.MonkeyPatch,
    err: int,
    reason: str,
    failing: str,
) -> None:
    dest.write_many({"key": b"old key", "tlscert": b"old cert"})
    before = sorted(p.name for p in dest.path.iterdir())
    real_write = os.write

    def failing_write(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])  # really half-written, then fail
        raise OSError(err, os.strerror(err))

    def failing_fsync(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, failing, failing_write if failing == "write" else failing_fsync)
    with pytest.raises(DestinationError) as info:
        dest.write_many({"key": b"new key that is longer", "tlscert": b"new cert"})
    monkeypatch.undo()
    assert f": cannot write files: {reason}" in str(info.value)
    assert _artifacts(dest.path) == {"key": b"old key", "tlscert": b"old cert"}
    assert sorted(p.name for p in dest.path.iterdir()) == before


def test_every_file_and_the_version_are_flushed_before_the_swap(
    dest: DirectoryDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def recording_fsync(fd: int) -> None:
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def recording_rename(src: str, dst: str, **kwargs: int) -> None:
        events.append(f"rename {dst}")
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    dest.write_many({"a": b"1", "b": b"2"})
    swap = events.index("rename ..data")
    assert events[:swap] == ["file", "file", "dir"]
    assert events[swap + 1] == "dir"  # the swap itself is flushed


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


@pytest.mark.parametrize(
    "name",
    [
        *("", ".", "..", "../x", "a/b/c", "/abs", "a\0b", "x/../y", "lock", ".hidden"),
        *("a/", "a//b", "lock/x", ".d/x", "a/.hidden", "a/..", "./x"),
    ],
)
def test_bad_names_are_rejected(dest: DirectoryDestination, name: str) -> None:
    with pytest.raises(DestinationError, match="invalid artifact name"):
        dest.write(name, b"x")
    with pytest.raises(DestinationError, match="invalid artifact name"):
        dest.write_many({"fine": b"x", name: b"y"})
    assert list(dest.path.iterdir()) == []


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    d = DirectoryDestination("rel")
    assert d.path == tmp_path / "rel"


def test_files_of_an_old_flat_layout_are_kept_on_the_first_write(tmp_path: Path) -> None:
    target = tmp_path / "old"
    target.mkdir(mode=0o700)
    (target / "key").write_bytes(b"old key")
    (target / "known_hosts").write_bytes(b"hosts")
    (target / "lock").write_bytes(b"")
    dest = DirectoryDestination(target)
    dest.init()
    assert dest.read("known_hosts") == b"hosts"  # readable before any versioned write
    dest.write("key", b"new key")
    assert _artifacts(target) == {"key": b"new key", "known_hosts": b"hosts"}
    assert os.readlink(target / "known_hosts") == "..data/known_hosts"
    assert (target / "lock").is_file()
    assert not (target / "lock").is_symlink()


def test_init_rolls_back_a_version_that_was_never_published(
    dest: DirectoryDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest.write_many({"key": b"k1", "tlscert": b"c1"})

    def crash(*args: object) -> None:
        raise KeyboardInterrupt  # stands for a kill between building and publishing

    monkeypatch.setattr(layout, "publish", crash)
    monkeypatch.setattr(layout, "remove_version", lambda *a: None)  # a kill cleans up nothing
    with pytest.raises(KeyboardInterrupt):
        dest.write_many({"key": b"k2", "tlscert": b"c2"})
    monkeypatch.undo()
    assert len(_versions(dest.path)) == 2
    DirectoryDestination(dest.path).init()
    assert len(_versions(dest.path)) == 1
    assert _artifacts(dest.path) == {"key": b"k1", "tlscert": b"c1"}


def test_a_clean_restart_keeps_the_previous_version_and_reports_nothing(
    dest: DirectoryDestination, caplog: pytest.LogCaptureFixture
) -> None:
    dest.write("key", b"k1")
    dest.write("key", b"k2")
    before = _versions(dest.path)
    with caplog.at_level(logging.INFO):
        DirectoryDestination(dest.path).init()
    assert _versions(dest.path) == before
    assert "unfinished" not in caplog.text


def test_init_finishes_a_published_version_whose_links_are_missing(
    dest: DirectoryDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest.write("key", b"k1")

    def crash(*args: object) -> None:
        raise KeyboardInterrupt  # a kill right after the swap

    monkeypatch.setattr(layout, "place_links", crash)
    with pytest.raises(KeyboardInterrupt):
        dest.write_many({"key": b"k2", "tlscert": b"c2"})
    monkeypatch.undo()
    assert not (dest.path / "tlscert").exists()
    (dest.path / "..tmp-leftover").symlink_to("..data")
    DirectoryDestination(dest.path).init()
    assert _artifacts(dest.path) == {"key": b"k2", "tlscert": b"c2"}
    assert not (dest.path / "..tmp-leftover").is_symlink()


def _write_pairs(path: Path) -> None:
    dest = DirectoryDestination(path)
    generation = 0
    while True:
        generation += 1
        tag = f"{os.getpid()}-{generation}".encode()
        # The CA never changes, so each write links it from the version before.
        dest.write_many(
            {"key": b"key " + tag, "tlscert": b"cert " + tag, "identity": tag, "ca": b"CA"}
        )


def test_sigkill_at_random_moments_never_leaves_a_torn_or_mismatched_set(
    dest: DirectoryDestination,
) -> None:
    """Fork a writer, SIGKILL it at a random moment, check the set, recover; 300 times."""
    dest.write_many({"key": b"key 0", "tlscert": b"cert 0", "identity": b"0", "ca": b"CA"})
    rng = random.Random(25462)
    mismatched = []
    interrupted = 0  # kills that landed inside a write (an unpublished version was left)
    for attempt in range(300):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                _write_pairs(dest.path)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.001, 0.012))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # Right after the kill, before any repair: the published set is whole and matches.
        snapshot = dest.read_many(["key", "tlscert", "identity", "ca"])
        key, cert, ident = (snapshot[n] or b"" for n in ("key", "tlscert", "identity"))
        if key[4:] != cert[5:] or key[4:] != ident or snapshot["ca"] != b"CA":
            mismatched.append((attempt, snapshot))
        others = [v for v in _versions(dest.path) if v != os.readlink(dest.path / "..data")]
        interrupted += len(others) > 1 or any(len(os.listdir(dest.path / v)) < 4 for v in others)
        DirectoryDestination(dest.path).init()
        flat = _artifacts(dest.path)
        if (
            flat["key"][4:] != flat["tlscert"][5:]
            or flat["key"][4:] != flat["identity"]
            or flat["ca"] != b"CA"
        ):
            mismatched.append((attempt, flat))
        current = os.readlink(dest.path / "..data")
        assert [v for v in _versions(dest.path) if v > current] == []  # unpublished: removed
        assert len(_versions(dest.path)) <= 2  # the current set and the one before it
    assert mismatched == []
    assert interrupted >= 10, "too few kills landed inside a write to prove anything"


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


def test_the_lock_survives_writes(dest: DirectoryDestination) -> None:
    with dest.lock():
        dest.write_many({"key": b"k", "tlscert": b"c"})
        with pytest.raises(StorageLockedError):
            dest.lock()
    assert (dest.path / "lock").is_file()


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


def test_a_copy_that_followed_the_links_is_adopted(tmp_path: Path) -> None:
    original = DirectoryDestination(tmp_path / "original")
    original.init()
    original.write_many({"key": b"k", "tlscert": b"c"})
    original.write_many({"key": b"k2", "tlscert": b"c2"})
    copy = tmp_path / "copy"
    shutil.copytree(original.path, copy)  # follows symlinks: ..data and names become real
    assert not (copy / "..data").is_symlink()
    dest = DirectoryDestination(copy)
    dest.init()
    assert (copy / "..data").is_symlink()
    assert len(_versions(copy)) == 2  # the adopted set, and the copied one before it
    assert _artifacts(copy) == {"key": b"k2", "tlscert": b"c2"}
    dest.write("key", b"k3")
    assert _artifacts(copy) == {"key": b"k3", "tlscert": b"c2"}


def test_two_processes_writing_the_same_directory_take_turns(dest: DirectoryDestination) -> None:
    """Each write prunes old versions; the write lock keeps one writer from pruning the other's."""
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                for generation in range(60):
                    tag = f"{os.getpid()}-{generation}".encode()
                    DirectoryDestination(dest.path).init()
                    dest.write_many({"key": b"key " + tag, "tlscert": b"cert " + tag})
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0, 0]
    final = dest.read_many(["key", "tlscert"])
    assert final["key"] is not None
    assert final["tlscert"] == b"cert " + final["key"][4:]
    assert len(_versions(dest.path)) <= 2


def test_a_version_deleted_by_hand_reads_as_empty_and_the_next_write_recovers(
    dest: DirectoryDestination,
) -> None:
    dest.write_many({"key": b"k1", "tlscert": b"c1"})
    shutil.rmtree(_current(dest.path))
    assert dest.read_many(["key", "tlscert"]) == {"key": None, "tlscert": None}
    DirectoryDestination(dest.path).init()
    dest.write_many({"key": b"k2", "tlscert": b"c2"})
    assert _artifacts(dest.path) == {"key": b"k2", "tlscert": b"c2"}
