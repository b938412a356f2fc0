"""One level of subdirectory in destinations (``cockroach/node.key``): the guarantees hold."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest

from tbot_py.bot.watch import DirectoryWatcher
from tbot_py.destinations import DirectoryDestination, MemoryDestination, layout
from tbot_py.destinations.acl import Reader, acl_drift
from tbot_py.errors import DestinationError
from tests.acls import skip_unless_acls_work

SET = {
    "key": b"key 1",
    "tlscert": b"cert 1",
    "cockroach/node.key": b"key 1",
    "cockroach/node.crt": b"cert 1",
    "cockroach/ca.crt": b"CA",
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _versions(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if layout.is_version_name(p.name))


def _current(path: Path) -> Path:
    return path / os.readlink(path / "..data")


def _visible(path: Path) -> dict[str, bytes]:
    """Every artifact as a reader sees it through the top-level names (one level deep)."""
    found: dict[str, bytes] = {}
    for entry in sorted(path.iterdir()):
        if layout.is_layout_entry(entry.name) or entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.update({f"{entry.name}/{f.name}": f.read_bytes() for f in entry.iterdir()})
        else:
            found[entry.name] = entry.read_bytes()
    return found


@pytest.fixture
def dest(tmp_path: Path) -> DirectoryDestination:
    d = DirectoryDestination(tmp_path / "out")
    d.init()
    return d


# -- names ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/b/c", "a/", "/a", "a//b", "../a", "a/..", "a/.x", "lock/x"])
def test_deeper_or_unplain_names_are_refused_and_nothing_is_written(
    dest: DirectoryDestination, name: str
) -> None:
    with pytest.raises(DestinationError, match="invalid artifact name"):
        dest.write_many({"fine": b"x", name: b"y"})
    assert list(dest.path.iterdir()) == []


def test_a_name_that_is_both_a_file_and_a_directory_is_refused(dest: DirectoryDestination) -> None:
    with pytest.raises(DestinationError, match="both a file and a directory"):
        dest.write_many({"cockroach": b"x", "cockroach/node.key": b"y"})
    assert list(dest.path.iterdir()) == []


def test_memory_destination_takes_one_level_and_refuses_more() -> None:
    memory = MemoryDestination()
    memory.write_many({"cockroach/node.key": b"k", "key": b"k"})
    assert memory.read("cockroach/node.key") == b"k"
    assert memory.read_many(["cockroach/ca.crt"]) == {"cockroach/ca.crt": None}
    with pytest.raises(DestinationError, match="invalid artifact name"):
        memory.write("a/b/c", b"x")


# -- the layout ------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o077, 0o277])
def test_the_subdirectory_is_in_the_version_behind_one_top_level_link(
    dest: DirectoryDestination, mask: int
) -> None:
    old = os.umask(mask)
    try:
        dest.write_many(SET)
    finally:
        os.umask(old)
    assert os.readlink(dest.path / "cockroach") == "..data/cockroach"
    version = _current(dest.path)
    assert _mode(version / "cockroach") == 0o700
    assert stat.S_ISDIR((version / "cockroach").lstat().st_mode)
    for name in ("node.key", "node.crt", "ca.crt"):
        assert _mode(version / "cockroach" / name) == 0o600
    assert _visible(dest.path) == SET
    assert dest.read("cockroach/node.key") == b"key 1"
    assert dest.read_many(["cockroach/node.crt", "cockroach/missing", "nodir/x"]) == {
        "cockroach/node.crt": b"cert 1",
        "cockroach/missing": None,
        "nodir/x": None,
    }


def test_a_renewal_swaps_the_subdirectory_with_the_rest_and_keeps_the_previous_set(
    dest: DirectoryDestination,
) -> None:
    dest.write_many(SET)
    first = _current(dest.path)
    with (dest.path / "cockroach" / "node.key").open("rb") as reader:
        dest.write_many({**SET, "key": b"key 2", "cockroach/node.key": b"key 2"})
        assert reader.read() == b"key 1"
    assert dest.read_many(["key", "cockroach/node.key"]) == {
        "key": b"key 2",
        "cockroach/node.key": b"key 2",
    }
    assert (first / "cockroach" / "node.key").read_bytes() == b"key 1"  # still whole
    dest.write_many({**SET, "key": b"key 3", "cockroach/node.key": b"key 3"})
    assert not first.exists()  # pruned, subdirectory and all
    assert len(_versions(dest.path)) == 2


def test_unchanged_files_in_the_subdirectory_are_linked_not_rewritten(
    dest: DirectoryDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest.write_many(SET)
    ca = (dest.path / "cockroach" / "ca.crt").stat().st_ino
    flushed: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        flushed.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    dest.write_many({**SET, "key": b"key 2", "cockroach/node.key": b"key 2"})
    monkeypatch.undo()
    assert (dest.path / "cockroach" / "ca.crt").stat().st_ino == ca
    version = _current(dest.path)
    # The new subdirectory is flushed, and before the version (and the swap) is.
    sub, top = (version / "cockroach").stat().st_ino, version.stat().st_ino
    assert sub in flushed
    assert flushed.index(sub) < flushed.index(top)
    new_files = {(version / "key").stat().st_ino, (version / "cockroach/node.key").stat().st_ino}
    assert new_files <= set(flushed)
    assert (version / "cockroach/node.crt").stat().st_ino not in flushed


def test_a_partial_write_carries_the_subdirectory_over(dest: DirectoryDestination) -> None:
    dest.write_many(SET)
    dest.write("key", b"key 2")
    assert _visible(dest.path) == {**SET, "key": b"key 2"}


def test_a_file_can_become_a_directory_between_writes(dest: DirectoryDestination) -> None:
    dest.write_many({"key": b"k", "cockroach": b"was a file"})
    dest.write_many({"cockroach/node.key": b"k"})
    assert _visible(dest.path) == {"key": b"k", "cockroach/node.key": b"k"}


# -- crashes -------------------------------------------------------------------


def test_init_restores_the_link_of_a_subdirectory(
    dest: DirectoryDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest.write("key", b"k1")

    def crash(*args: object) -> None:
        raise KeyboardInterrupt  # a kill right after the swap

    monkeypatch.setattr(layout, "place_links", crash)
    with pytest.raises(KeyboardInterrupt):
        dest.write_many(SET)
    monkeypatch.undo()
    assert not (dest.path / "cockroach").exists()
    DirectoryDestination(dest.path).init()
    assert _visible(dest.path) == SET


def test_init_removes_an_unpublished_version_with_its_subdirectory(
    dest: DirectoryDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest.write_many(SET)

    def crash(*args: object) -> None:
        raise KeyboardInterrupt  # a kill between building and publishing

    monkeypatch.setattr(layout, "publish", crash)
    monkeypatch.setattr(layout, "remove_version", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        dest.write_many({**SET, "cockroach/node.key": b"key 2"})
    monkeypatch.undo()
    assert len(_versions(dest.path)) == 2
    DirectoryDestination(dest.path).init()
    assert len(_versions(dest.path)) == 1
    assert _visible(dest.path) == SET


def _write_sets(path: Path) -> None:
    dest = DirectoryDestination(path)
    generation = 0
    while True:
        generation += 1
        tag = f"{os.getpid()}-{generation}".encode()
        dest.write_many(
            {
                "key": b"key " + tag,
                "cockroach/node.key": b"key " + tag,
                "cockroach/node.crt": b"cert " + tag,
                "cockroach/ca.crt": b"CA",
            }
        )


def _consistent(files: dict[str, bytes | None]) -> bool:
    key, sub_key, cert = (
        files.get(n) or b"" for n in ("key", "cockroach/node.key", "cockroach/node.crt")
    )
    return key == sub_key and key[4:] == cert[5:] and files.get("cockroach/ca.crt") == b"CA"


def test_sigkill_at_random_moments_never_mixes_the_subdirectory_with_another_set(
    dest: DirectoryDestination,
) -> None:
    """Fork a writer, SIGKILL it at a random moment, check, recover; 150 times."""
    names = ["key", "cockroach/node.key", "cockroach/node.crt", "cockroach/ca.crt"]
    dest.write_many({n: (b"cert 0" if n.endswith(".crt") else b"key 0") for n in names[:3]})
    dest.write("cockroach/ca.crt", b"CA")
    rng = random.Random(7)
    mismatched = []
    interrupted = 0  # kills that landed inside a write (an unpublished version was left)
    for attempt in range(150):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                _write_sets(dest.path)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.001, 0.012))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not _consistent(dest.read_many(names)):
            mismatched.append((attempt, dest.read_many(names)))
        current = os.readlink(dest.path / "..data")
        interrupted += any(v > current for v in _versions(dest.path))
        DirectoryDestination(dest.path).init()
        visible = _visible(dest.path)
        if not _consistent(dict(visible)) or set(visible) != set(names):
            mismatched.append((attempt, visible))
        leftovers = [p.name for p in dest.path.iterdir() if p.name.startswith("..tmp-")]
        assert leftovers == []
        assert len(_versions(dest.path)) <= 2
    assert mismatched == []
    assert interrupted >= 5, "too few kills landed inside a write to prove anything"


# -- taking over, copies, symlinks -------------------------------------------------


def test_a_real_subdirectory_of_tbots_layout_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "cockroach").mkdir(parents=True, mode=0o700)
    (out / "cockroach" / "node.key").write_bytes(b"old key")
    (out / "cockroach" / "extra.pem").write_bytes(b"kept")
    (out / "key").write_bytes(b"old key")
    dest = DirectoryDestination(out)
    dest.init()
    assert dest.read("cockroach/extra.pem") == b"kept"  # readable before the first write
    dest.write_many({"cockroach/node.key": b"new key", "key": b"new key"})
    assert os.readlink(out / "cockroach") == "..data/cockroach"
    assert _visible(out) == {
        "key": b"new key",
        "cockroach/node.key": b"new key",
        "cockroach/extra.pem": b"kept",
    }
    assert [p.name for p in out.iterdir() if p.name.startswith("..tmp-")] == []


def test_a_real_subdirectory_holding_more_than_files_is_not_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "cockroach" / "nested").mkdir(parents=True)
    dest = DirectoryDestination(out)
    dest.init()
    with pytest.raises(DestinationError, match="is not a regular file"):
        dest.write("cockroach/node.key", b"k")
    assert (out / "cockroach" / "nested").is_dir()
    assert _versions(out) == []


def test_a_real_directory_at_a_flat_name_is_still_refused(dest: DirectoryDestination) -> None:
    (dest.path / "key").mkdir()
    with pytest.raises(DestinationError, match="is a directory"):
        dest.write("key", b"k")


def test_a_copy_that_followed_the_links_is_adopted_subdirectory_and_all(tmp_path: Path) -> None:
    original = DirectoryDestination(tmp_path / "original")
    original.init()
    original.write_many(SET)
    copy = tmp_path / "copy"
    shutil.copytree(original.path, copy)  # ..data and cockroach become real directories
    assert not (copy / "cockroach").is_symlink()
    dest = DirectoryDestination(copy)
    dest.init()
    assert os.readlink(copy / "cockroach") == "..data/cockroach"
    assert _visible(copy) == SET
    assert [p.name for p in copy.iterdir() if p.name.startswith("..tmp-")] == []


@pytest.mark.parametrize("mode", ["secure", "try-secure"])
def test_a_planted_symlink_at_the_subdirectory_name_is_refused(tmp_path: Path, mode: str) -> None:
    dest = DirectoryDestination(tmp_path / "out", symlinks=mode)  # type: ignore[arg-type]
    dest.init()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (dest.path / "cockroach").symlink_to(elsewhere)
    with pytest.raises(DestinationError, match="did not create"):
        dest.write_many(SET)
    assert list(elsewhere.iterdir()) == []
    assert os.readlink(dest.path / "cockroach") == str(elsewhere)


def test_a_subdirectory_swapped_for_a_symlink_in_the_version_is_not_read_through(
    dest: DirectoryDestination, tmp_path: Path
) -> None:
    dest.write_many(SET)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "node.key").write_bytes(b"planted")
    sub = _current(dest.path) / "cockroach"
    shutil.rmtree(sub)
    sub.symlink_to(elsewhere)
    assert dest.read("cockroach/node.key") is None
    dest.write_many(SET)  # the next write builds a real subdirectory again
    assert dest.read("cockroach/node.key") == SET["cockroach/node.key"]
    assert (elsewhere / "node.key").read_bytes() == b"planted"


# -- readers and the watcher -------------------------------------------------------


def test_readers_get_acls_on_the_subdirectory_and_its_files(tmp_path: Path) -> None:
    skip_unless_acls_work(tmp_path)
    readers = (Reader(kind="user", id="4242"),)
    dest = DirectoryDestination(tmp_path / "out", readers=readers)
    dest.init()
    dest.write_many(SET)
    sub = _current(dest.path) / "cockroach"
    for path, is_dir in [(sub, True), (sub / "node.key", False), (sub / "ca.crt", False)]:
        fd = os.open(path, os.O_RDONLY)
        try:
            assert acl_drift(fd, readers, is_dir=is_dir) is None, path
        finally:
            os.close(fd)


@pytest.mark.parametrize("tamper", ["delete", "chmod", "remove-subdirectory", "remove-link"])
def test_tampering_in_the_subdirectory_calls_the_watcher_back(
    dest: DirectoryDestination, tamper: str
) -> None:
    async def main() -> list[str]:
        calls: list[str] = []
        watcher = DirectoryWatcher(asyncio.get_running_loop(), debounce=0.05)
        watcher.watch("db", str(dest.path), SET, calls.append)
        watcher.start()
        try:
            watcher.expect_writes("db", SET)
            dest.write_many(SET)
            await asyncio.sleep(0.2)
            assert calls == []  # our own write is not tampering
            sub = _current(dest.path) / "cockroach"
            if tamper == "delete":
                os.unlink(sub / "node.key")
            elif tamper == "chmod":
                os.chmod(sub / "node.key", 0o644)
            elif tamper == "remove-subdirectory":
                shutil.rmtree(sub)
            else:
                os.unlink(dest.path / "cockroach")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3
            while not calls and loop.time() < deadline:
                await asyncio.sleep(0.02)
        finally:
            watcher.stop()
        return calls

    assert asyncio.run(main()) == ["db"]
