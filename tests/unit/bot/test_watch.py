"""Tamper detection in output directories and config hot reload: real files, real loop, inotify."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tbot_py.bot import watch
from tbot_py.bot._inotify import Inotify
from tbot_py.bot.watch import ConfigWatcher, DirectoryWatcher
from tbot_py.destinations import DirectoryDestination

DEBOUNCE = 0.1
FILES = {"identity": b"key and certificate\n", "tlscert": b"certificate\n", "key": b"key\n"}

Scenario = Callable[[DirectoryWatcher, DirectoryDestination, list[str]], Awaitable[None]]


async def eventually(predicate: Callable[[], bool], timeout: float = 1.5) -> None:
    """Poll until ``predicate`` holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out waiting for a callback"
        await asyncio.sleep(0.01)


async def settle() -> None:
    """Wait long enough for any pending check to run: a few debounce windows."""
    await asyncio.sleep(DEBOUNCE * 3)


def run_watched(tmp_path: Path, scenario: Scenario, *, expect: bool = True) -> None:
    """Watch a directory destination, write FILES as the daemon does, then run ``scenario``."""

    async def main() -> None:
        destination = DirectoryDestination(tmp_path / "out")
        destination.init()
        calls: list[str] = []
        watcher = DirectoryWatcher(asyncio.get_running_loop(), debounce=DEBOUNCE)
        watcher.watch("svc", str(destination.path), FILES, calls.append)
        watcher.start()
        try:
            if expect:
                watcher.expect_writes("svc", FILES)
            destination.write_many(FILES)
            await scenario(watcher, destination, calls)
        finally:
            watcher.stop()

    asyncio.run(main())


def test_deleting_a_watched_file_calls_back_once(tmp_path: Path) -> None:
    async def scenario(_w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        os.unlink(dest.path / "identity")
        await eventually(lambda: calls == ["svc"])
        await settle()
        assert calls == ["svc"]

    run_watched(tmp_path, scenario)


def test_several_deletions_within_the_debounce_window_call_back_once(tmp_path: Path) -> None:
    async def scenario(_w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        for name in FILES:
            os.unlink(dest.path / name)
        await eventually(lambda: calls == ["svc"])
        await settle()
        assert calls == ["svc"]

    run_watched(tmp_path, scenario)


def test_replacing_a_file_by_rename_with_other_content_calls_back(tmp_path: Path) -> None:
    async def scenario(_w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        replacement = dest.path / "identity.new"
        replacement.write_bytes(b"someone else's key\n")
        os.chmod(replacement, 0o600)
        os.replace(replacement, dest.path / "identity")
        await eventually(lambda: calls == ["svc"])

    run_watched(tmp_path, scenario)


def test_overwriting_in_place_with_other_content_calls_back(tmp_path: Path) -> None:
    async def scenario(_w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        with open(dest.path / "tlscert", "r+b") as f:
            f.write(b"CERT")
        await eventually(lambda: calls == ["svc"])

    run_watched(tmp_path, scenario)


def test_making_a_file_readable_by_others_calls_back(tmp_path: Path) -> None:
    async def scenario(_w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        os.chmod(dest.path / "key", 0o644)
        await eventually(lambda: calls == ["svc"])

    run_watched(tmp_path, scenario)


def test_replacing_a_file_by_a_symlink_to_the_same_content_calls_back(tmp_path: Path) -> None:
    async def scenario(_w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.write_bytes(FILES["key"])
        os.chmod(elsewhere, 0o600)
        link = dest.path / "key.link"
        os.symlink(elsewhere, link)
        os.replace(link, dest.path / "key")
        await eventually(lambda: calls == ["svc"])

    run_watched(tmp_path, scenario)


RENEWED = {"identity": b"renewed\n", "tlscert": b"renewed cert\n", "key": b"new key\n"}


async def renew(w: DirectoryWatcher, dest: DirectoryDestination) -> None:
    """Write a new version as the daemon does, and let the watcher settle on it."""
    w.expect_writes("svc", RENEWED)
    dest.write_many(RENEWED)
    await settle()


def test_changing_a_file_of_the_version_written_since_watching_began_calls_back(
    tmp_path: Path,
) -> None:
    async def scenario(w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        await renew(w, dest)
        with open(dest.path / "tlscert", "r+b") as f:  # through the link, into the new version
            f.write(b"CERT")
        await eventually(lambda: calls == ["svc"])

    run_watched(tmp_path, scenario)


def test_chmod_of_a_file_of_the_version_written_since_watching_began_calls_back(
    tmp_path: Path,
) -> None:
    async def scenario(w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        await renew(w, dest)
        os.chmod(dest.path / "key", 0o644)
        await eventually(lambda: calls == ["svc"])

    run_watched(tmp_path, scenario)


def test_pointing_data_at_the_previous_version_calls_back(tmp_path: Path) -> None:
    async def scenario(w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        previous = os.readlink(dest.path / "..data")
        await renew(w, dest)
        os.symlink(previous, dest.path / "..data.new")
        os.replace(dest.path / "..data.new", dest.path / "..data")
        await eventually(lambda: calls == ["svc"])

    run_watched(tmp_path, scenario)


@pytest.mark.parametrize("remove", ["link", "version"])
def test_removing_data_or_its_version_calls_back(tmp_path: Path, remove: str) -> None:
    async def scenario(w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        await renew(w, dest)
        data = dest.path / "..data"
        if remove == "link":
            data.unlink()
        else:
            shutil.rmtree(dest.path / os.readlink(data))
        await eventually(lambda: calls == ["svc"])

    run_watched(tmp_path, scenario)


def test_our_own_atomic_writes_of_the_expected_content_do_not_call_back(tmp_path: Path) -> None:
    async def scenario(w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        w.expect_writes("svc", RENEWED)
        dest.write_many(RENEWED)
        # A partial write keeps the other files' expectations.
        w.expect_writes("svc", {"tlscert": b"cert again\n"})
        dest.write_many({"tlscert": b"cert again\n"})
        await settle()
        assert calls == []
        assert dest.read("identity") == b"renewed\n"

    run_watched(tmp_path, scenario)


def test_changes_to_unrelated_files_in_the_directory_do_not_call_back(tmp_path: Path) -> None:
    async def scenario(_w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        notes = dest.path / "notes.txt"
        notes.write_bytes(b"hello")
        notes.write_bytes(b"changed")
        os.chmod(notes, 0o644)
        os.replace(notes, dest.path / "notes.old")
        os.unlink(dest.path / "notes.old")
        temp = dest.path / ".identity.tmp-0123456789ab"
        temp.write_bytes(b"half written")
        os.unlink(temp)
        os.mkdir(dest.path / "sub")
        assert dest.read("identity") == FILES["identity"]  # our reads are not changes either
        await settle()
        assert calls == []

    run_watched(tmp_path, scenario)


def test_nothing_calls_back_before_the_first_expected_write(tmp_path: Path) -> None:
    async def scenario(_w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        os.unlink(dest.path / "identity")
        await settle()
        assert calls == []

    run_watched(tmp_path, scenario, expect=False)


def test_unwatch_stops_callbacks(tmp_path: Path) -> None:
    async def scenario(w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        w.unwatch("svc")
        os.unlink(dest.path / "identity")
        await settle()
        assert calls == []

    run_watched(tmp_path, scenario)


def test_a_pending_check_is_dropped_by_unwatch(tmp_path: Path) -> None:
    async def scenario(w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        os.unlink(dest.path / "identity")
        await asyncio.sleep(DEBOUNCE / 3)  # the event has (most likely) arrived; a check is pending
        w.unwatch("svc")
        await settle()
        assert calls == []

    run_watched(tmp_path, scenario)


def test_a_deleted_and_recreated_directory_is_watched_again_after_the_next_write(
    tmp_path: Path,
) -> None:
    async def scenario(w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        shutil.rmtree(dest.path)
        await eventually(lambda: calls == ["svc"])
        dest.init()
        w.expect_writes("svc", FILES)
        dest.write_many(FILES)
        await settle()
        os.unlink(dest.path / "key")
        await eventually(lambda: calls == ["svc", "svc"])

    run_watched(tmp_path, scenario)


def test_a_failing_callback_is_logged_and_watching_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        destination = DirectoryDestination(tmp_path / "out")
        destination.init()
        calls: list[str] = []

        def callback(name: str) -> None:
            calls.append(name)
            raise RuntimeError("boom")

        watcher = DirectoryWatcher(asyncio.get_running_loop(), debounce=DEBOUNCE)
        watcher.watch("svc", str(destination.path), FILES, callback)
        watcher.start()
        try:
            watcher.expect_writes("svc", FILES)
            destination.write_many(FILES)
            os.unlink(destination.path / "identity")
            await eventually(lambda: calls == ["svc"])
            os.unlink(destination.path / "key")
            await eventually(lambda: calls == ["svc", "svc"])
        finally:
            watcher.stop()

    asyncio.run(main())
    assert "the callback for a changed output failed" in caplog.text


class _InotifyWithoutWatches(watch.Inotify):
    def add(self, directory: str) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")


def _no_inotify(*args: object) -> object:
    raise OSError(errno.EMFILE, "inotify instance limit reached")


@pytest.mark.parametrize("inotify", [_InotifyWithoutWatches, _no_inotify])
def test_without_inotify_it_warns_once_and_polls(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    inotify: Callable[..., object],
) -> None:
    monkeypatch.setattr(watch, "Inotify", inotify)
    monkeypatch.setattr(watch, "POLL_INTERVAL", 0.05)

    async def scenario(_w: DirectoryWatcher, dest: DirectoryDestination, calls: list[str]) -> None:
        await asyncio.sleep(0.1)  # let the first poll see the written files
        os.unlink(dest.path / "identity")
        await eventually(lambda: calls == ["svc"])

    with caplog.at_level(logging.WARNING, logger="tbot_py.bot.watch"):
        run_watched(tmp_path, scenario)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([m for m in warnings if "inotify is unavailable" in m]) == 1
    assert "polling every 0.05s for changes to outputs" in warnings[0]


def test_a_missing_directory_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        watcher = DirectoryWatcher(asyncio.get_running_loop(), debounce=DEBOUNCE)
        watcher.watch("svc", str(tmp_path / "missing"), FILES, lambda _name: None)
        watcher.start()
        watcher.stop()

    asyncio.run(main())
    assert "cannot watch" in caplog.text
    assert "No such file or directory" in caplog.text


def test_inotify_keeps_a_directory_watched_under_another_name(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(tmp_path)
    alias = str(tmp_path / "link" / "real")  # the same directory, through a symlinked parent

    async def main() -> None:
        events: list[tuple[str, tuple[str, ...]]] = []
        inotify = Inotify(asyncio.get_running_loop(), lambda *event: events.append(event))
        try:
            inotify.add(str(real))
            inotify.add(alias)
            inotify.remove(str(real))
            (real / "f").write_bytes(b"x")
            await eventually(lambda: ("created", (os.path.join(alias, "f"),)) in events)
        finally:
            inotify.close()

    asyncio.run(main())


# -- config -------------------------------------------------------------------------------


def run_config(path: Path, scenario: Callable[[list[None]], Awaitable[None]]) -> None:
    async def main() -> None:
        calls: list[None] = []
        watcher = ConfigWatcher(
            asyncio.get_running_loop(), str(path), lambda: calls.append(None), debounce=DEBOUNCE
        )
        watcher.start()
        try:
            await scenario(calls)
        finally:
            watcher.stop()

    asyncio.run(main())


def save_by_rename(path: Path, data: bytes) -> None:
    """Save the way editors and config management do: a temp file, then a rename."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def test_config_watcher_calls_back_when_a_rename_changes_the_content(tmp_path: Path) -> None:
    config = tmp_path / "tbot.yaml"
    config.write_bytes(b"version: v2\n")

    async def scenario(calls: list[None]) -> None:
        save_by_rename(config, b"version: v2\nonboarding: {}\n")
        await eventually(lambda: len(calls) == 1)
        await settle()
        assert len(calls) == 1

    run_config(config, scenario)


def test_config_watcher_ignores_touch_and_saves_without_changes(tmp_path: Path) -> None:
    config = tmp_path / "tbot.yaml"
    config.write_bytes(b"version: v2\n")

    async def scenario(calls: list[None]) -> None:
        config.touch()
        os.chmod(config, 0o640)
        config.write_bytes(b"version: v2\n")
        save_by_rename(config, b"version: v2\n")
        (tmp_path / "other.yaml").write_bytes(b"unrelated\n")
        await settle()
        assert calls == []

    run_config(config, scenario)


def test_config_watcher_ignores_deletion_and_calls_back_on_the_next_write(tmp_path: Path) -> None:
    config = tmp_path / "tbot.yaml"
    config.write_bytes(b"version: v2\n")

    async def scenario(calls: list[None]) -> None:
        config.unlink()
        await settle()
        assert calls == []
        save_by_rename(config, b"version: v2\ndebug: true\n")
        await eventually(lambda: len(calls) == 1)

    run_config(config, scenario)


def test_config_watcher_follows_a_swapped_symlink_as_kubernetes_does(tmp_path: Path) -> None:
    # A ConfigMap volume: tbot.yaml -> ..data/tbot.yaml, and ..data is swapped by rename.
    for version, text in (("v1", b"version: v2\n"), ("v2", b"version: v2\ndebug: true\n")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "tbot.yaml").write_bytes(text)
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/tbot.yaml", tmp_path / "tbot.yaml")

    async def scenario(calls: list[None]) -> None:
        os.symlink("v2", tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await eventually(lambda: len(calls) == 1)

    run_config(tmp_path / "tbot.yaml", scenario)


# -- lifecycle ----------------------------------------------------------------------------


def test_stop_is_idempotent_and_a_stopped_watcher_stays_quiet(tmp_path: Path) -> None:
    config = tmp_path / "tbot.yaml"
    config.write_bytes(b"version: v2\n")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[str] = []
        DirectoryWatcher(loop).stop()  # never started
        ConfigWatcher(loop, str(config), lambda: None).stop()

        directories = DirectoryWatcher(loop, debounce=DEBOUNCE)
        directories.watch("svc", str(tmp_path), ["tbot.yaml"], calls.append)
        configs = ConfigWatcher(loop, str(config), lambda: calls.append("config"), debounce=0)
        for watcher in (directories, configs):
            watcher.start()
        directories.expect_writes("svc", {"tbot.yaml": b"version: v2\n"})
        for watcher in (directories, configs):
            watcher.stop()
            watcher.stop()
            watcher.start()  # a stopped watcher stays stopped
        config.write_bytes(b"changed\n")
        await settle()
        assert calls == []

    asyncio.run(main())
