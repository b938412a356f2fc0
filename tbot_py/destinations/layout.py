"""The versioned directory layout: every set of artifacts changes with one rename.

A destination directory looks like this (the Kubernetes atomic-writer pattern)::

    DIR/
      ..data -> ..2026_11_22_01_30_00.123456789-3fa2c1   the current version
      ..2026_11_22_01_30_00.123456789-3fa2c1/            0700, immutable once published
          key  tlscert  key-cert.pub  identity  ...       0600 regular files
          cockroach/node.key ...                          one level of subdirectory, 0700
      key -> ..data/key                                   tbot's flat names, as symlinks
      tlscert -> ..data/tlscert
      cockroach -> ..data/cockroach                       a subdirectory is ONE link too
      lock                                                the storage lock (storage only)

A write builds a complete new version directory (new files written and flushed,
unchanged ones hard-linked from the current version), flushes it, and then
points ``..data`` at it with a single ``rename``. So at every instant, even
after a ``kill -9`` or a power cut, ``..data`` names a complete set, and a
reader that resolves ``..data`` once and reads every file from that version
gets a matching key and certificate. The previous version is kept until the
next write, so such a reader never has files vanish under it within one
renewal interval. Programs that open the flat names one by one (``ssh -i``,
``curl --cert``) each get a complete file, but a swap may fall between two of
their opens: those should read the ``identity`` file (key and certificates in
one file) or resolve ``..data`` first.

Artifact names may have one directory level (``cockroach/node.key``): the
subdirectory lives inside the version, and the top level gets a single link
``cockroach -> ..data/cockroach``, so the subdirectory's files change with the
same rename as everything else. Taking over a real ``cockroach/`` directory
(tbot's layout, or a copy that followed symlinks) moves it aside as a
``..tmp-`` entry before its link is placed, then removes it.

Nothing here follows a symlink: ``..data`` is read with ``readlink`` and its
target must be a version name in the same directory; a subdirectory is opened
with ``O_NOFOLLOW`` and its files relative to that descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from tbot_py.destinations.base import split_artifact_name, top_level_name
from tbot_py.destinations.fs import (
    DIR_MODE,
    FILE_MODE,
    fsync_directory,
    unlink_quietly,
    write_new_file,
)

DATA_LINK = "..data"
LOCK_NAME = "lock"
#: Taken (flock, exclusive) around every write and every repair, so that two processes
#: writing the same directory take turns instead of pruning each other's versions.
WRITE_LOCK = "..lock"
WRITE_LOCK_TIMEOUT = 10.0
_VERSION_RE = re.compile(r"^\.\.\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.\d{9}-[0-9a-f]{6}$")
_TEMP_LINK_PREFIX = "..tmp-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def is_version_name(name: str) -> bool:
    """Whether ``name`` is one of our version directories."""
    return _VERSION_RE.match(name) is not None


def is_layout_entry(name: str) -> bool:
    """Whether ``name`` in a destination directory belongs to the layout itself."""
    return (
        name in (DATA_LINK, LOCK_NAME, WRITE_LOCK)
        or name.startswith(_TEMP_LINK_PREFIX)
        or is_version_name(name)
    )


def link_target(name: str) -> str:
    """What the flat name ``name`` points at."""
    return f"{DATA_LINK}/{name}"


def new_version_name() -> str:
    """A fresh version directory name: UTC time to the nanosecond, and a random suffix."""
    ns = time.time_ns()
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime(ns // 1_000_000_000))
    return f"..{stamp}.{ns % 1_000_000_000:09d}-{os.urandom(3).hex()}"


@contextlib.contextmanager
def write_lock(dir_fd: int, timeout: float = WRITE_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the directory's write lock; raise LayoutError if another writer keeps it too long."""
    fd = os.open(
        WRITE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LayoutError(
                        WRITE_LOCK, f"is held by another process writing here for over {timeout:g}s"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # drops the lock


class LayoutError(Exception):
    """Something in the directory is not what this layout put there."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"{name} {problem}")


def current_version(dir_fd: int) -> str | None:
    """The version ``..data`` points at; None without ``..data`` (a new or old-style dir)."""
    try:
        target = os.readlink(DATA_LINK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise LayoutError(DATA_LINK, "is not a symlink") from None
        raise
    if not is_version_name(target):
        raise LayoutError(DATA_LINK, f"points at {target!r}, which is not a tbot-py version")
    try:
        os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None  # its version was deleted by hand: as if nothing were published yet
    return target


def adopt_copied_data(dir_fd: int) -> bool:
    """Turn a real ``..data`` directory back into a published version; True if there was one.

    A copy made with a tool that follows symlinks (``shutil.copytree``, ``cp -rL``)
    turns ``..data`` into a plain directory holding the set it pointed at.
    """
    try:
        st = os.stat(DATA_LINK, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    version = new_version_name()
    os.rename(DATA_LINK, version, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    publish(dir_fd, version)
    return True


def open_version(dir_fd: int, version: str) -> int:
    """Open a version directory without following symlinks."""
    return os.open(version, _DIR_FLAGS, dir_fd=dir_fd)


def subdirectories(names: Iterable[str]) -> set[str]:
    """The directories that artifact names live in: ``{"cockroach"}`` for ``cockroach/node.key``."""
    return {sub for name in names if (sub := split_artifact_name(name)[0]) is not None}


def top_level_names(names: Iterable[str]) -> set[str]:
    """The entries at the top of the directory that hold ``names`` (a subdirectory counts once)."""
    return {top_level_name(name) for name in names}


def open_subdirectory(dir_fd: int, name: str) -> int | None:
    """Open the real directory ``name`` in ``dir_fd``; None if missing or a symlink.

    Raise LayoutError if something else stands there.
    """
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        if exc.errno == errno.ENOTDIR:  # also what O_DIRECTORY | O_NOFOLLOW says of a symlink
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return None
            raise LayoutError(name, "is not a directory") from None
        raise


def read_file(dir_fd: int, name: str) -> bytes | None:
    """The bytes of regular file ``name`` in ``dir_fd``; None if missing. Follows no symlink.

    A symlink counts as missing: at a flat name it is one of our links whose version is
    gone, or something planted, and neither is read through. ``dir/file`` is read
    from the subdirectory, itself opened without following a symlink.
    """
    sub, leaf = split_artifact_name(name)
    if sub is None:
        return _read_plain(dir_fd, name)
    sub_fd = open_subdirectory(dir_fd, sub)
    if sub_fd is None:
        return None
    try:
        return _read_plain(sub_fd, leaf)
    except LayoutError as exc:
        raise LayoutError(f"{sub}/{exc.name}", exc.problem) from None
    finally:
        os.close(sub_fd)


def _read_plain(dir_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LayoutError(name, "is not a regular file")
        return _read_all(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    """Every byte left in ``fd``, with plain reads: a file object costs more than the read."""
    parts = []
    while part := os.read(fd, 64 * 1024):
        parts.append(part)
    return b"".join(parts)


@dataclass
class LinkState:
    """What stands at the flat names, as found before a write."""

    ours: set[str] = field(default_factory=set)  # already ``name -> ..data/name``
    missing: set[str] = field(default_factory=set)
    legacy: set[str] = field(default_factory=set)  # regular files from an old layout or tbot
    foreign: dict[str, str] = field(default_factory=dict)  # name -> symlink target not ours


def inspect_links(dir_fd: int, names: Iterable[str], directories: Iterable[str] = ()) -> LinkState:
    """Sort what stands at each flat name; raise LayoutError for a directory or a device.

    ``directories`` are the names that hold a subdirectory of artifacts: a real
    directory there (tbot's layout) is legacy, to be taken over, if it holds only
    regular files.
    """
    state = LinkState()
    subdirs = set(directories)
    for name in names:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            state.missing.add(name)
            continue
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=dir_fd)
            if target == link_target(name):
                state.ours.add(name)
            else:
                state.foreign[name] = target
        elif stat.S_ISREG(st.st_mode):
            state.legacy.add(name)
        elif stat.S_ISDIR(st.st_mode) and name in subdirs:
            _check_plain_directory(dir_fd, name)
            state.legacy.add(name)
        elif stat.S_ISDIR(st.st_mode):
            raise LayoutError(name, "is a directory")
        else:
            raise LayoutError(name, "is not a regular file")
    return state


def _check_plain_directory(dir_fd: int, name: str) -> None:
    """Refuse to take over a directory that holds anything but regular files."""
    sub_fd = open_subdirectory(dir_fd, name)
    if sub_fd is None:
        return
    try:
        with os.scandir(sub_fd) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    raise LayoutError(
                        f"{name}/{entry.name}",
                        f"is not a regular file, so tbot-py will not replace {name} with a link",
                    )
    finally:
        os.close(sub_fd)


def legacy_files(dir_fd: int, directories: Iterable[str] = ()) -> list[str]:
    """Regular, visible files at the top of a directory that has no version yet (an old layout).

    Plus the regular files in those of ``directories`` that are real directories there
    (``cockroach/node.key`` of tbot's layout).
    """
    names = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name == LOCK_NAME:
                continue
            if entry.is_file(follow_symlinks=False):
                names.append(entry.name)
    for sub in sorted(set(directories)):
        names += [f"{sub}/{leaf}" for leaf in _files_in(dir_fd, sub, visible_only=True)]
    return sorted(names)


def _files_in(dir_fd: int, sub: str, *, visible_only: bool = False) -> list[str]:
    """The regular files in the real directory ``sub`` (none if missing or a symlink)."""
    try:
        sub_fd = open_subdirectory(dir_fd, sub)
    except LayoutError:
        return []
    if sub_fd is None:
        return []
    try:
        with os.scandir(sub_fd) as entries:
            return sorted(
                e.name
                for e in entries
                if e.is_file(follow_symlinks=False)
                and not (visible_only and e.name.startswith("."))
            )
    finally:
        os.close(sub_fd)


def build_version(
    dir_fd: int,
    files: Mapping[str, bytes],
    carry_from: int | None,
    carry: Iterable[str],
) -> tuple[str, int]:
    """Create a complete, flushed new version: ``files`` plus ``carry`` linked from ``carry_from``.

    A file of ``files`` that ``carry_from`` already holds, byte for byte, is linked
    too instead of written anew: the CAs and ssh_config rarely change between
    renewals, and a link saves a file creation and an fsync. Returns the version's
    name and an open descriptor (the caller closes it). On any failure the partial
    version is removed and the error propagates.
    """
    version = new_version_name()
    os.mkdir(version, DIR_MODE, dir_fd=dir_fd)
    try:
        vfd = open_version(dir_fd, version)
    except BaseException:
        remove_version(dir_fd, version)
        raise
    source = carry_from if carry_from is not None else dir_fd
    with _SubdirectoryFds(vfd, create=True) as targets, _SubdirectoryFds(source) as sources:
        try:
            os.fchmod(vfd, DIR_MODE)
            for name, data in files.items():
                target_fd, leaf = targets.made(name)
                source_fd = None if carry_from is None else sources.at(name)[0]
                if source_fd is None or not _link_if_same(source_fd, target_fd, leaf, data):
                    write_new_file(target_fd, leaf, data)
            file_dirs = subdirectories(files)
            for name in carry:
                sub, leaf = split_artifact_name(name)
                if name in files or (name in file_dirs if sub is None else sub in files):
                    continue  # written, or a file where the new set has a directory (or back)
                from_fd = sources.at(name)[0]
                if from_fd is not None:
                    _carry_file(from_fd, targets.made(name)[0], leaf)
            targets.flush()
            fsync_directory(vfd)
        except BaseException:
            targets.close()
            os.close(vfd)
            remove_version(dir_fd, version)
            raise
    return version, vfd


class _SubdirectoryFds:
    """The descriptors of a directory's subdirectories, opened (or made) once each."""

    def __init__(self, dir_fd: int, *, create: bool = False) -> None:
        self._dir_fd = dir_fd
        self._create = create
        self._fds: dict[str, int | None] = {}

    def at(self, name: str) -> tuple[int | None, str]:
        """Where ``name`` lives: (directory descriptor or None if missing, file name in it)."""
        sub, leaf = split_artifact_name(name)
        if sub is None:
            return self._dir_fd, leaf
        if sub not in self._fds:
            self._fds[sub] = self._open(sub)
        return self._fds[sub], leaf

    def made(self, name: str) -> tuple[int, str]:
        """Like :meth:`at`, for the directory being built: its subdirectory is made if missing."""
        fd, leaf = self.at(name)
        if fd is None:
            raise LayoutError(name, "has no directory to go to")  # only without create
        return fd, leaf

    def _open(self, sub: str) -> int | None:
        if not self._create:
            try:
                return open_subdirectory(self._dir_fd, sub)
            except LayoutError:
                return None
        os.mkdir(sub, DIR_MODE, dir_fd=self._dir_fd)
        fd = os.open(sub, _DIR_FLAGS, dir_fd=self._dir_fd)
        self._fds[sub] = fd  # closed with the others even if the chmod fails
        os.fchmod(fd, DIR_MODE)  # the umask may have taken bits away
        return fd

    def flush(self) -> None:
        """Flush every subdirectory's entries."""
        for fd in self._fds.values():
            if fd is not None:
                fsync_directory(fd)

    def close(self) -> None:
        """Close every descriptor. Idempotent."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> _SubdirectoryFds:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _link_if_same(source_fd: int, target_fd: int, name: str, data: bytes) -> bool:
    """Hard-link ``name`` into the new version if the current one holds exactly ``data``.

    As safe as writing it: the file was flushed when an earlier write created it,
    and the new version's directory is flushed before it is published. Only a
    regular file of ours with mode 0600 qualifies, so that a rewrite after a chmod
    or a swap by someone else writes a fresh file instead of keeping theirs.
    """
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=source_fd)
    except OSError:
        return False  # missing, a symlink, ...: write it
    try:
        st = os.fstat(fd)
        same = (
            stat.S_ISREG(st.st_mode)
            and stat.S_IMODE(st.st_mode) == FILE_MODE
            and st.st_uid == os.geteuid()
            and st.st_size == len(data)
            and _read_all(fd) == data
        )
    finally:
        os.close(fd)
    if not same:
        return False
    try:
        os.link(name, name, src_dir_fd=source_fd, dst_dir_fd=target_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EMLINK, errno.EXDEV):
            return False
        raise
    return True


def _carry_file(source_fd: int, target_fd: int, name: str) -> None:
    """Hard-link an unchanged file into the new version; copy it where linking is refused."""
    st = os.stat(name, dir_fd=source_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        return
    try:
        os.link(name, name, src_dir_fd=source_fd, dst_dir_fd=target_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EMLINK, errno.EXDEV):
            raise
        data = read_file(source_fd, name)
        if data is not None:
            write_new_file(target_fd, name, data, stat.S_IMODE(st.st_mode))


def publish(dir_fd: int, version: str) -> None:
    """Point ``..data`` at ``version`` with one atomic rename, and flush the directory."""
    _replace_with_link(dir_fd, DATA_LINK, version)
    fsync_directory(dir_fd)


def _replace_with_link(dir_fd: int, name: str, target: str) -> None:
    """Atomically make ``name`` a symlink to ``target``: a temp link renamed over it."""
    temp = f"{_TEMP_LINK_PREFIX}{os.urandom(6).hex()}"
    os.symlink(target, temp, dir_fd=dir_fd)
    try:
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        unlink_quietly(dir_fd, temp)
        raise


def place_links(dir_fd: int, names: Iterable[str]) -> list[str]:
    """Make each flat name a symlink into ``..data``, atomically replacing what is there.

    The caller has already refused what must not be replaced. A real directory at a
    name (a subdirectory of tbot's layout, checked by :func:`inspect_links`) cannot be
    renamed over: it is moved aside as a temp entry, the link placed, and the
    directory removed. Returns the names changed.
    """
    changed = []
    for name in sorted(names):
        target = link_target(name)
        with contextlib.suppress(OSError):
            if os.readlink(name, dir_fd=dir_fd) == target:
                continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            aside = f"{_TEMP_LINK_PREFIX}{os.urandom(6).hex()}"
            os.rename(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            try:
                _replace_with_link(dir_fd, name, target)
            except BaseException:
                with contextlib.suppress(OSError):  # put it back; a restart retries
                    os.rename(aside, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                raise
            remove_version(dir_fd, aside)
        else:
            _replace_with_link(dir_fd, name, target)
        changed.append(name)
    if changed:
        fsync_directory(dir_fd)
    return changed


def has_layout(dir_fd: int) -> bool:
    """Whether the directory holds anything of this layout (else there is nothing to repair)."""
    with os.scandir(dir_fd) as entries:
        return any(is_layout_entry(e.name) and e.name != LOCK_NAME for e in entries)


def version_names(dir_fd: int) -> list[str]:
    """Every version directory and leftover temp link in the directory."""
    with os.scandir(dir_fd) as entries:
        return sorted(
            e.name
            for e in entries
            if is_version_name(e.name) or e.name.startswith(_TEMP_LINK_PREFIX)
        )


def unpublished(dir_fd: int, current: str | None) -> list[str]:
    """Versions and temp links that a write left behind without publishing them.

    Version names sort by creation time, so a version newer than the current one
    was built and never published (or the clock went back, and it is merely early
    to remove). Without ``..data`` every version is unpublished.
    """
    return [
        name
        for name in version_names(dir_fd)
        if name.startswith(_TEMP_LINK_PREFIX) or current is None or name > current
    ]


def previous_version(dir_fd: int, current: str | None) -> str | None:
    """The newest version older than the current one: the set published before it."""
    if current is None:
        return None
    older = [name for name in version_names(dir_fd) if is_version_name(name) and name < current]
    return older[-1] if older else None


def prune(dir_fd: int, keep: Iterable[str]) -> list[str]:
    """Remove versions and temp links not in ``keep``; return what was removed. Best effort."""
    kept = set(keep)
    removed = []
    for name in version_names(dir_fd):
        if name in kept:
            continue
        if name.startswith(_TEMP_LINK_PREFIX) and not _is_real_directory(dir_fd, name):
            unlink_quietly(dir_fd, name)
        else:
            remove_version(dir_fd, name)  # a version, or a directory moved aside
        removed.append(name)
    return removed


def _is_real_directory(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def remove_version(dir_fd: int, version: str, *, depth: int = 1) -> None:
    """Delete a version directory, its files and subdirectories (following no symlink).

    Best effort. Goes ``depth`` levels of subdirectory deep: one, as artifact names allow.
    """
    with contextlib.suppress(OSError):
        vfd = open_version(dir_fd, version)
        try:
            with os.scandir(vfd) as entries:
                names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            for name, is_dir in names:
                if is_dir and depth > 0:
                    remove_version(vfd, name, depth=depth - 1)
                else:
                    unlink_quietly(vfd, name)
        finally:
            os.close(vfd)
        os.rmdir(version, dir_fd=dir_fd)


def version_files(version_fd: int) -> list[str]:
    """The artifact names in a version directory: ``key``, ``cockroach/node.key``, ..."""
    names = []
    with os.scandir(version_fd) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                names.append(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                names += [f"{entry.name}/{leaf}" for leaf in _files_in(version_fd, entry.name)]
    return sorted(names)
