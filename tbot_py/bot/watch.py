"""Notice promptly when an output's files, or the config file, change under the daemon.

Outputs: someone deletes ``identity``, replaces it, or makes it readable by
others. Waiting for the next renewal (up to 20 minutes) leaves clients broken,
or a key exposed, for that long. :class:`DirectoryWatcher` calls back as soon
as the change has settled, and the daemon writes the output again.

File system events only say *that* a name changed, and our own atomic writes
(temp file, then rename) produce the same events as tampering. So an event only
schedules a debounced check, and the check compares what is on disk with what
the daemon last said it wrote: a SHA-256 per file (so no second copy of a
private key is kept) and mode 0600. Our own writes therefore never call back,
without any timing tricks.

:class:`ConfigWatcher` backs ``--watch-config``. It calls back when the config
file's bytes change, not on a ``touch`` or on a save without changes.

Both watch *directories*, non-recursively, and never single files: editors and
config management replace a file by rename, and a watch on the old inode goes
stale. An output's files live in version directories (destinations.layout), so
:class:`DirectoryWatcher` watches two directories per output: the output
directory (the flat names and ``..data``) and the version ``..data`` points at,
moved to the new version whenever ``..data`` moves, plus that version's
subdirectories that hold watched files (``cockroach/node.key``). A recursive watch would
also see every file of every version the daemon builds and prunes, some 150
events per write. The kernel is asked only for changes (create, delete, move,
modify, attrib), never for opens and closes, which readers and our own checks
cause all the time.

The inotify descriptor is read by the asyncio loop itself (tbot_py.bot._inotify):
watchdog's observer would run a thread per watch, and moving a watch at every
write would start and join one per output and renewal. If inotify is unavailable
(``fs.inotify.max_user_watches`` reached, say), one warning is logged and
watchdog's ``PollingObserver`` takes over, in threads that hand event paths to
the loop with ``call_soon_threadsafe``. Polling does not see a chmod on its
own; the next renewal repairs that.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from tbot_py.bot._inotify import CHANGES, IN_CLOSE_WRITE, Inotify
from tbot_py.destinations.fs import FILE_MODE
from tbot_py.destinations.layout import DATA_LINK, is_version_name, link_target

log = logging.getLogger(__name__)

#: How often the polling fallback rescans each watched directory, in seconds.
POLL_INTERVAL = 1.0
#: How long ``stop()`` waits for the polling observer's threads to finish.
_JOIN_TIMEOUT = 2.0
_READ_CHUNK = 64 * 1024
# Events that can change a file's bytes, name or mode. Opens and reads are left
# out: the checks below read the files, and must not trigger more checks.
_CHANGES = frozenset({"created", "modified", "deleted", "moved", "closed", "attrib"})
# A write changes bytes (IN_MODIFY, truncation too) and a chmod is IN_ATTRIB, so an
# output needs no close events; an editor's save of the config is complete at its close.
_CONFIG_CHANGES = CHANGES | IN_CLOSE_WRITE
# Failures that concern one directory, not inotify as a whole: polling would not help.
_PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ELOOP})

#: Receives, on the loop, an event's type and its paths (source, then destination of a
#: move); ``("overflow", ())`` when the kernel dropped events.
EventSink = Callable[[str, tuple[str, ...]], None]


class _Forwarder(FileSystemEventHandler):
    """Runs in the polling observer's thread: hands each change's type and paths to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: EventSink) -> None:
        super().__init__()
        self._loop = loop
        self._sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if event.event_type not in _CHANGES:
                return
            paths = tuple(os.fsdecode(p) for p in (event.src_path, event.dest_path) if p)
            self._loop.call_soon_threadsafe(self._sink, event.event_type, paths)
        except Exception:  # the loop is closed, say: never let the observer thread die
            log.debug("dropped a file system event", exc_info=True)


class _Observer:
    """Non-recursive watches on directories; their events go to ``sink`` on the loop.

    inotify where it works, else watchdog's polling observer. Call every method
    from the loop's thread.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sink: EventSink, purpose: str, mask: int
    ) -> None:
        self._loop = loop
        self._sink = sink
        self._purpose = purpose
        self._mask = mask
        self._inotify: Inotify | None = None
        self._poller: BaseObserver | None = None
        # Directory -> its polling watch; None while inotify watches it.
        self._watches: dict[str, ObservedWatch | None] = {}

    def start(self) -> None:
        """Start inotify, or the polling observer if that fails. Never raises."""
        try:
            self._inotify = Inotify(self._loop, self._sink, self._mask)
        except OSError as exc:
            self._fall_back(exc)

    def add(self, directory: str, *, missing_ok: bool = False) -> None:
        """Watch ``directory`` unless it is already watched. Never raises; failures are logged.

        ``missing_ok``: a directory that vanished meanwhile is no news (a version
        directory a concurrent write has just pruned, say).
        """
        if directory in self._watches:
            return
        try:
            if self._inotify is not None:
                self._inotify.add(directory)
                self._watches[directory] = None
            elif self._poller is not None:
                forwarder = _Forwarder(self._loop, self._sink)
                self._watches[directory] = self._poller.schedule(forwarder, directory)
        except OSError as exc:
            if missing_ok and exc.errno == errno.ENOENT:
                return
            if self._inotify is None or exc.errno in _PATH_ERRNOS:
                log.warning("cannot watch %s for %s: %s", directory, self._purpose, _why(exc))
                return
            self._fall_back(exc)
            self.add(directory)  # now on the polling observer, so this recurses once at most
        except Exception as exc:
            log.warning("cannot watch %s for %s: %s", directory, self._purpose, _why(exc))

    def remove(self, directory: str) -> None:
        """Stop watching ``directory``; a watch that died with its directory is cleaned up too."""
        if directory not in self._watches:
            return
        watch = self._watches.pop(directory)
        if self._inotify is not None:
            self._inotify.remove(directory)
        elif watch is not None and self._poller is not None:
            try:
                self._poller.unschedule(watch)
            except Exception:
                log.debug("cannot unschedule the watch on %s", directory, exc_info=True)

    def stop(self) -> None:
        """Stop watching, and the polling observer's threads. Idempotent."""
        inotify, self._inotify = self._inotify, None
        poller, self._poller = self._poller, None
        self._watches.clear()
        if inotify is not None:
            inotify.close()
        if poller is not None:
            _stop_quietly(poller)

    def _fall_back(self, exc: BaseException) -> None:
        log.warning(
            "inotify is unavailable (%s); polling every %gs for %s instead",
            _why(exc),
            POLL_INTERVAL,
            self._purpose,
        )
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        directories = list(self._watches)
        self._watches.clear()
        poller = PollingObserver(timeout=POLL_INTERVAL)
        try:
            poller.start()
        except Exception as poll_exc:
            _stop_quietly(poller)
            log.warning("cannot watch for %s at all: %s", self._purpose, _why(poll_exc))
            return
        self._poller = poller
        for directory in directories:
            self.add(directory)


def _stop_quietly(observer: BaseObserver) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(_JOIN_TIMEOUT)
    except Exception:
        log.debug("error while stopping a file system observer", exc_info=True)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _read(path: str, *, follow_symlinks: bool) -> tuple[os.stat_result, bytes | None]:
    """The file's stat and, if it is a regular file, the SHA-256 of its bytes.

    Opened non-blocking, so that a FIFO put in a file's place cannot hang the loop.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return st, None
        # Plain reads on the descriptor: a file object per check costs more than the hash.
        digest = hashlib.sha256()
        while chunk := os.read(fd, _READ_CHUNK):
            digest.update(chunk)
        return st, digest.digest()
    finally:
        os.close(fd)


def _artifact_path(directory: str, file: str) -> tuple[str, str | None]:
    """Where ``file``'s bytes are, or what is wrong with its name.

    ``file`` is a link into the current version (``..data/file``, see
    destinations.layout); a plain file (an old layout) is checked as it is.
    ``dir/file`` is reached through the link ``dir -> ..data/dir``.
    """
    sub, _, leaf = file.rpartition("/")
    if not sub:
        return _entry_path(directory, file)
    path = os.path.join(directory, file)
    top, problem = _entry_path(directory, sub)
    if problem is None and os.path.islink(top):
        problem = "was replaced by a symlink"
    if problem is not None:
        return path, f"({sub}) {problem}"
    return os.path.join(top, leaf), None


def _entry_path(directory: str, name: str) -> tuple[str, str | None]:
    """Where the top-level entry ``name`` leads in the current version, or what is wrong."""
    path = os.path.join(directory, name)
    try:
        target = os.readlink(path)
    except FileNotFoundError:
        return path, "was deleted"
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a symlink, so a plain file
            return path, f"cannot be read ({_why(exc)})"
        return path, None
    if target != link_target(name):
        return path, f"was replaced by a symlink to {target}"
    return os.path.join(directory, DATA_LINK, name), None


def _tampering(directory: str, file: str, expected: bytes) -> str | None:  # noqa: PLR0911
    """What is wrong with ``file`` in ``directory``, or None if it is exactly as we wrote it."""
    path, problem = _artifact_path(directory, file)
    if problem is not None:
        return problem
    try:
        st, digest = _read(path, follow_symlinks=False)
    except FileNotFoundError:
        return "was deleted"
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            return "was replaced by a symlink"
        return f"cannot be read ({_why(exc)})"
    if digest is None:
        return "is no longer a regular file"
    if digest != expected:
        return "has different content"
    mode = stat.S_IMODE(st.st_mode)
    return None if mode == FILE_MODE else f"has mode {mode:04o} instead of {FILE_MODE:04o}"


@dataclass
class _Output:
    directory: str
    files: frozenset[str]
    callback: Callable[[str], None]
    timer: asyncio.TimerHandle | None = None


class DirectoryWatcher:
    """Calls back on the loop when a watched file is deleted, replaced or changed by someone else.

    Call every method from the loop's thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, debounce: float = 0.5) -> None:
        self._loop = loop
        self._debounce = debounce
        self._outputs: dict[str, _Output] = {}
        # Output name -> file name -> SHA-256 of what the daemon last wrote there.
        self._written: dict[str, dict[str, bytes]] = {}
        self._names_by_path: dict[str, tuple[str, ...]] = {}
        self._names_by_directory: dict[str, tuple[str, ...]] = {}
        # Output directory -> the version directory watched in it (what ..data pointed at).
        self._versions: dict[str, str] = {}
        # Output directory -> subdirectories of that version watched too.
        self._version_subdirs: dict[str, list[str]] = {}
        self._subdirs_by_directory: dict[str, frozenset[str]] = {}
        self._observer = _Observer(loop, self._on_change, "changes to outputs", CHANGES)
        self._started = False
        self._stopped = False

    def watch(
        self, name: str, directory: str, files: Iterable[str], callback: Callable[[str], None]
    ) -> None:
        """Watch ``files`` in ``directory`` for output ``name``, replacing an earlier watch of it.

        ``callback(name)`` runs on the loop, at most once per debounce window,
        once ``expect_writes`` has said what the files should hold.
        """
        directory = os.path.abspath(directory)
        old = self._outputs.get(name)
        if old is not None and old.directory != directory:
            self.unwatch(name)  # what was written there says nothing about the new directory
        elif old is not None:
            self._cancel(old)
        self._outputs[name] = _Output(directory, frozenset(files), callback)
        self._reindex()
        if self._running:
            self._add(directory)

    def expect_writes(self, name: str, contents: Mapping[str, bytes]) -> None:
        """Record what the daemon is about to write for ``name``: those writes must not call back.

        Call this right before writing. Files not in ``contents`` keep their
        earlier expectation; only the files given to ``watch`` are checked.
        """
        written = self._written.setdefault(name, {})
        for file, data in contents.items():
            written[file] = hashlib.sha256(data).digest()
        output = self._outputs.get(name)
        if output is not None and self._running:
            # Runs after the write that follows: watch again a directory that
            # was deleted (its watch died with it) and has been recreated.
            self._loop.call_soon(self._rewatch, output.directory)

    def unwatch(self, name: str) -> None:
        """Stop watching output ``name`` and forget what was written for it."""
        self._written.pop(name, None)
        output = self._outputs.pop(name, None)
        if output is None:
            return
        self._cancel(output)
        self._reindex()
        if output.directory not in self._names_by_directory:
            self._observer.remove(output.directory)
            self._drop_version(output.directory)

    def start(self) -> None:
        """Start watching every registered directory. Never raises; failures are logged."""
        if self._started or self._stopped:
            return
        self._started = True
        self._observer.start()
        for directory in self._names_by_directory:
            self._add(directory)

    def stop(self) -> None:
        """Stop watching and cancel pending checks. Idempotent; a stopped watcher stays stopped."""
        if self._stopped:
            return
        self._stopped = True
        for output in self._outputs.values():
            self._cancel(output)
        self._observer.stop()

    @property
    def _running(self) -> bool:
        return self._started and not self._stopped

    def _add(self, directory: str) -> None:
        self._observer.add(directory)
        self._follow_data_link(directory)

    def _follow_data_link(self, directory: str) -> None:
        """Watch the version ``..data`` points at now, instead of the one it pointed at."""
        try:
            target = os.readlink(os.path.join(directory, DATA_LINK))
        except OSError:
            target = ""  # no ..data (not written yet, an old layout, or deleted)
        version = os.path.join(directory, target) if is_version_name(target) else None
        if version != self._versions.get(directory):
            self._drop_version(directory)
            if version is not None:
                self._versions[directory] = version
                self._observer.add(version, missing_ok=True)
        if version is not None:
            self._watch_subdirs(directory, version)

    def _watch_subdirs(self, directory: str, version: str) -> None:
        """Watch the version's subdirectories that hold watched files (non-recursive watches)."""
        watched = self._version_subdirs.setdefault(directory, [])
        for sub in sorted(self._subdirs_by_directory.get(directory, ())):
            path = os.path.join(version, sub)
            if path not in watched:
                watched.append(path)
                self._observer.add(path, missing_ok=True)

    def _drop_version(self, directory: str) -> None:
        for path in self._version_subdirs.pop(directory, []):
            self._observer.remove(path)
        version = self._versions.pop(directory, None)
        if version is not None:
            self._observer.remove(version)

    def _reindex(self) -> None:
        by_path: dict[str, tuple[str, ...]] = {}
        by_directory: dict[str, tuple[str, ...]] = {}
        subdirs: dict[str, frozenset[str]] = {}
        for name, output in self._outputs.items():
            by_directory[output.directory] = (*by_directory.get(output.directory, ()), name)
            for file in output.files:
                sub = file.rpartition("/")[0]
                # A file in a subdirectory also changes with the subdirectory's entry.
                for indexed in (file, sub) if sub else (file,):
                    path = os.path.join(output.directory, indexed)
                    if name not in by_path.get(path, ()):
                        by_path[path] = (*by_path.get(path, ()), name)
                if sub:
                    subdirs[output.directory] = subdirs.get(output.directory, frozenset()) | {sub}
        self._names_by_path = by_path
        self._names_by_directory = by_directory
        self._subdirs_by_directory = subdirs

    def _on_change(self, event_type: str, paths: tuple[str, ...]) -> None:
        if not self._running:
            return
        if event_type == "overflow":  # the kernel dropped events: anything may have changed
            for directory in self._names_by_directory:
                self._follow_data_link(directory)
            for name in self._outputs:
                self._schedule_check(name)
            return
        names: set[str] = set()
        for path in paths:
            names.update(self._names_by_path.get(_flat_path(path), ()))
            directory, entry = os.path.split(path)
            if entry == DATA_LINK or self._versions.get(directory) == path:
                # ..data moved, or the version it points at: every file may differ now.
                names.update(self._names_by_directory.get(directory, ()))
                if entry != DATA_LINK:
                    self._drop_version(directory)  # deleted or moved: its watch is stale
                self._follow_data_link(directory)
        if event_type == "deleted" and paths[0] in self._names_by_directory:
            # The directory itself is gone, and its watches with it.
            self._observer.remove(paths[0])
            self._drop_version(paths[0])
            names.update(self._names_by_directory[paths[0]])
        for name in names:
            self._schedule_check(name)

    def _rewatch(self, directory: str) -> None:
        if self._running and directory in self._names_by_directory and os.path.isdir(directory):
            self._add(directory)

    def _schedule_check(self, name: str) -> None:
        output = self._outputs[name]
        self._cancel(output)
        output.timer = self._loop.call_later(self._debounce, self._check, name)

    def _cancel(self, output: _Output) -> None:
        if output.timer is not None:
            output.timer.cancel()
            output.timer = None

    def _check(self, name: str) -> None:
        output = self._outputs.get(name)
        if output is None or not self._running:
            return
        output.timer = None
        written = self._written.get(name)
        if not written:
            return  # nothing written yet, so nothing to compare with
        problems = []
        for file in sorted(output.files & written.keys()):
            problem = _tampering(output.directory, file, written[file])
            if problem is not None:
                problems.append(f"{file} {problem}")
        if not problems:
            log.debug("%s: files in %s are as written", name, output.directory)
            return
        log.warning(
            "%s: %s in %s (changed by another process)",
            name,
            "; ".join(problems),
            output.directory,
        )
        try:
            output.callback(name)
        except Exception:
            log.exception("%s: the callback for a changed output failed", name)


def _flat_path(path: str) -> str:
    """``DIR/..<version>/key`` -> ``DIR/key``: an event in a version is one on the artifact.

    Likewise ``DIR/..<version>/sub/key`` -> ``DIR/sub/key`` (one level of subdirectory).
    """
    parent, name = os.path.split(path)
    head, version = os.path.split(parent)
    if is_version_name(version):
        return os.path.join(head, name)
    top, outer = os.path.split(head)
    return os.path.join(top, version, name) if is_version_name(outer) else path


def _config_digest(path: str) -> bytes | None:
    try:
        return _read(path, follow_symlinks=True)[1]
    except OSError:
        return None  # deleted or unreadable: wait for the next write


class ConfigWatcher:
    """Calls back (on the asyncio loop) when the config file's content changes, debounced.

    A ``touch``, a save without changes or a deletion does not call back; the
    next write with new bytes does. Call every method from the loop's thread.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        path: str,
        callback: Callable[[], None],
        *,
        debounce: float = 0.25,
    ) -> None:
        self._loop = loop
        self._path = os.path.abspath(path)
        self._callback = callback
        self._debounce = debounce
        self._digest: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._any_change = False
        self._observer = _Observer(loop, self._on_change, "config changes", _CONFIG_CHANGES)
        self._started = False
        self._stopped = False

    def start(self) -> None:
        """Remember the current bytes and start watching the file's directory. Never raises."""
        if self._started or self._stopped:
            return
        self._started = True
        # A symlinked config (a Kubernetes ConfigMap, say) changes when a link
        # elsewhere in the directory is swapped, so there any change counts.
        self._any_change = os.path.islink(self._path)
        self._digest = _config_digest(self._path)
        self._observer.start()
        self._observer.add(os.path.dirname(self._path))

    def stop(self) -> None:
        """Stop watching and cancel a pending check. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._observer.stop()

    def _on_change(self, event_type: str, paths: tuple[str, ...]) -> None:
        if self._stopped or not (
            self._any_change or self._path in paths or event_type == "overflow"
        ):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._debounce, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._stopped:
            return
        digest = _config_digest(self._path)
        if digest is None or digest == self._digest:
            return
        self._digest = digest
        log.info("config file %s changed", self._path)
        try:
            self._callback()
        except Exception:
            log.exception("the callback for a changed config file failed")
