"""A directory of artifacts in which a whole set of files changes at once, 0600 files in 0700 dirs.

tbot truncates and rewrites files in place, so a crash or a full disk can leave
a torn private key next to a fresh certificate (teleport#25462). Here a write
builds a complete new version of the directory's files and publishes it with
one rename (see :mod:`tbot_py.destinations.layout`); the previous set stays
whole until then. After a crash at any point the directory holds the complete
old set or the complete new one, and :meth:`DirectoryDestination.init` removes
what an interrupted write left behind. A name may have one directory level
(``cockroach/node.key``): the subdirectory is built inside the version and
reached through one top-level link, so it changes with the rest of the set.

The destination path is opened without following symlinks (``symlinks:
secure`` / ``try-secure``, see :mod:`tbot_py.destinations.fs`), all work
happens relative to that directory descriptor, and a symlink someone planted at
an artifact's name is refused rather than written through or replaced.
Readers listed in ``readers`` (or inherited from the directory's own ACL, as
``tbot-py init --reader-user`` leaves it) get read-only POSIX ACLs, set on the
new files before they are published.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from tbot_py.destinations import layout
from tbot_py.destinations.base import (
    check_artifact_name,
    check_name_conflicts,
    split_artifact_name,
)
from tbot_py.destinations.fs import (
    DIR_MODE,
    FILE_MODE,
    SymlinkMode,
    open_directory,
    opened_directory,
    reason,
)
from tbot_py.errors import DestinationError, StorageLockedError

if TYPE_CHECKING:
    from tbot_py.destinations.acl import Reader

log = logging.getLogger(__name__)

__all__ = ["DIR_MODE", "FILE_MODE", "LOCK_NAME", "AclMode", "DirectoryDestination", "DirectoryLock"]

LOCK_NAME = layout.LOCK_NAME
AclMode = Literal["off", "try", "required"]


class DirectoryLock:
    """An exclusive ``flock`` on ``<dir>/lock``; the pid of the holder is written inside."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        """Unlock and close. Closing the descriptor alone would also drop the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class DirectoryDestination:
    """Artifacts as files in one directory on the local file system."""

    is_persistent = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        symlinks: SymlinkMode = "try-secure",
        acls: AclMode = "try",
        readers: Sequence[Reader] = (),
    ) -> None:
        # Absolute, so that a later chdir cannot move the destination and so
        # that ssh_config can point at it.
        self.path = Path(os.path.abspath(path))
        self.symlinks: SymlinkMode = symlinks
        self.acls: AclMode = acls
        self.readers = tuple(readers)
        self._acls_failed = False
        self._guard = threading.Lock()

    def describe(self) -> str:
        """``directory <path>``."""
        return f"directory {self.path}"

    def __repr__(self) -> str:
        return f"DirectoryDestination({str(self.path)!r})"

    # -- init ---------------------------------------------------------------

    def init(self) -> None:
        """Create the directory (missing parents too, each 0700), prove it writable, repair it.

        An existing directory keeps its mode; a group- or world-readable one, or
        one owned by another user, gets a warning. What an interrupted write
        left (an unpublished version, a missing link) is rolled back or finished.
        """
        with self._guard, self._opened(create=True) as dir_fd:
            try:
                self._check_directory(dir_fd)
                self._probe_writable(dir_fd)
                if layout.has_layout(dir_fd):
                    with layout.write_lock(dir_fd):
                        self._recover(dir_fd)
            except layout.LayoutError as exc:
                raise self._layout_error(exc) from None
            except OSError as exc:
                raise self._error("cannot prepare destination", exc) from None
            if self.acls != "off" and self.readers:
                self._check_acl_support(dir_fd)

    def _check_directory(self, dir_fd: int) -> None:
        st = os.fstat(dir_fd)
        if st.st_uid != os.geteuid():
            log.warning(
                "destination directory %s is owned by uid %d, not by the user tbot-py runs as "
                "(uid %d); other users may be able to change what it holds",
                self.path,
                st.st_uid,
                os.geteuid(),
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            log.warning(
                "destination directory %s has mode %o: other users may read credentials",
                self.path,
                stat.S_IMODE(st.st_mode),
            )

    def _probe_writable(self, dir_fd: int) -> None:
        probe = f".write-probe-{os.getpid()}-{os.urandom(6).hex()}"
        fd = os.open(
            probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, FILE_MODE, dir_fd=dir_fd
        )
        os.close(fd)
        os.unlink(probe, dir_fd=dir_fd)

    def _recover(self, dir_fd: int) -> None:
        if layout.adopt_copied_data(dir_fd):
            log.warning(
                "%s: ..data was a directory, not a link (a copy that followed symlinks?); "
                "adopted it as the current version",
                self.path,
            )
        current = layout.current_version(dir_fd)
        unfinished = layout.unpublished(dir_fd, current)
        previous = layout.previous_version(dir_fd, current)
        layout.prune(dir_fd, keep={name for name in (current, previous) if name is not None})
        if unfinished:
            log.info("%s: removed an unfinished write: %s", self.path, ", ".join(unfinished))
        if current is None:
            return
        version_fd = layout.open_version(dir_fd, current)
        try:
            names = layout.version_files(version_fd)
        finally:
            os.close(version_fd)
        state = layout.inspect_links(
            dir_fd, layout.top_level_names(names), layout.subdirectories(names)
        )
        for name, target in sorted(state.foreign.items()):
            log.warning(
                "%s: %s is a symlink to %s that tbot-py did not create", self.path, name, target
            )
        fixed = layout.place_links(dir_fd, state.missing | state.legacy)
        if fixed:
            log.info("%s: restored the links of %s", self.path, ", ".join(fixed))

    # -- writes -------------------------------------------------------------

    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` with ``data`` (mode 0600), durable on return."""
        self.write_many({name: data})

    def write_many(self, files: Mapping[str, bytes]) -> None:
        """Replace the given files together: readers see all of them new or all old.

        Durable on return. On failure (a full disk, say) nothing visible
        changes and the partial version is removed.
        """
        for name in files:
            self._check_name(name)
        check_name_conflicts(files)
        with self._guard, self._opened() as dir_fd:
            try:
                with layout.write_lock(dir_fd):
                    self._write(dir_fd, files)
            except layout.LayoutError as exc:
                raise self._layout_error(exc) from None
            except OSError as exc:
                raise self._error("cannot write files", exc) from None

    def _check_name(self, name: str) -> None:
        check_artifact_name(name)
        sub, leaf = split_artifact_name(name)
        if name.startswith(".") or leaf.startswith(".") or LOCK_NAME in (name, sub):
            raise DestinationError(f"invalid artifact name {name!r}: reserved in directories")

    def _write(self, dir_fd: int, files: Mapping[str, bytes]) -> None:
        subdirs = layout.subdirectories(files)
        state = layout.inspect_links(dir_fd, layout.top_level_names(files), subdirs)
        for name, target in sorted(state.foreign.items()):
            if self.symlinks != "insecure":
                raise DestinationError(
                    f"is a symlink to {target} that tbot-py did not create; refusing to write "
                    f"through or replace it (symlinks: {self.symlinks}). Remove it and tbot-py "
                    "will write the file",
                    path=str(self.path / name),
                )
            log.warning(
                "%s: replacing the symlink %s -> %s (symlinks: insecure)", self.path, name, target
            )
        current = layout.current_version(dir_fd)
        current_fd = layout.open_version(dir_fd, current) if current else None
        try:
            carry = (
                layout.version_files(current_fd)
                if current_fd is not None
                else layout.legacy_files(dir_fd, subdirs)
            )
            version, version_fd = layout.build_version(dir_fd, files, current_fd, carry)
        finally:
            if current_fd is not None:
                os.close(current_fd)
        try:
            names = layout.version_files(version_fd)
            self._apply_acls(dir_fd, version, names)
        except BaseException:
            layout.remove_version(dir_fd, version)
            raise
        finally:
            os.close(version_fd)
        layout.publish(dir_fd, version)
        layout.place_links(dir_fd, layout.top_level_names(names))
        layout.prune(dir_fd, keep={version, current} if current else {version})

    # -- ACLs -----------------------------------------------------------------

    def _effective_readers(self, dir_fd: int) -> tuple[Reader, ...]:
        if self.acls == "off" or self._acls_failed:
            return ()
        if self.readers:
            return self.readers
        try:
            os.getxattr(dir_fd, "system.posix_acl_access")
        except OSError:
            return ()  # no ACL on the directory (the common case): skip loading the ACL code
        from tbot_py.destinations.acl import readers_from_acl

        # Readers that `tbot-py init --reader-user` left on the directory itself; the
        # bot's own entry there (when root owns the directory) is not a reader.
        me = str(os.geteuid())
        inherited = readers_from_acl(dir_fd)
        return tuple(r for r in inherited if not (r.kind == "user" and r.id == me))

    def _check_acl_support(self, dir_fd: int) -> None:
        from tbot_py.destinations.acl import acl_support_problem

        problem = acl_support_problem(dir_fd)
        if problem is None:
            return
        if self.acls == "required":
            raise DestinationError(
                f"ACLs are required (acls: required) but {problem}", path=str(self.path)
            )
        self._acls_failed = True
        log.warning("%s: readers will not get ACLs: %s (acls: try)", self.path, problem)

    def _apply_acls(self, dir_fd: int, version: str, names: Iterable[str]) -> None:
        readers = self._effective_readers(dir_fd)
        if not readers:
            return
        from tbot_py.destinations.acl import apply_reader_acls
        from tbot_py.errors import AclError

        try:
            subdirs = sorted(layout.subdirectories(names))
            apply_reader_acls(
                dir_fd,
                directories=[version, *(f"{version}/{sub}" for sub in subdirs)],
                files=[f"{version}/{name}" for name in names],
                readers=readers,
            )
        except AclError as exc:
            if self.acls == "required":
                raise DestinationError(f"cannot set ACLs: {exc}", path=str(self.path)) from None
            self._acls_failed = True
            log.warning("%s: readers will not get ACLs: %s (acls: try)", self.path, exc)

    # -- reads --------------------------------------------------------------

    def read(self, name: str) -> bytes | None:
        """The contents of ``name``, or None if it does not exist. Never creates anything."""
        return self.read_many([name])[name]

    def read_many(self, names: Iterable[str]) -> dict[str, bytes | None]:
        """Several artifacts, all from the same version: a matching set, never a mix."""
        wanted = [check_artifact_name(name) for name in names]
        try:
            dir_fd = open_directory(self.path, self.symlinks)
        except DestinationError:
            if not os.path.lexists(self.path):
                return dict.fromkeys(wanted)
            raise
        try:
            current = layout.current_version(dir_fd)
            source_fd = layout.open_version(dir_fd, current) if current else dir_fd
            try:
                return {name: layout.read_file(source_fd, name) for name in wanted}
            finally:
                if source_fd != dir_fd:
                    os.close(source_fd)
        except layout.LayoutError as exc:
            raise self._layout_error(exc) from None
        except OSError as exc:
            raise self._error("cannot read files", exc) from None
        finally:
            os.close(dir_fd)

    # -- lock ---------------------------------------------------------------

    def lock(self) -> DirectoryLock:
        """Take the exclusive, non-blocking lock on ``<dir>/lock``.

        Raise StorageLockedError, naming the holder's pid, if another process
        (or another lock object in this one) has it.
        """
        lock_path = self.path / LOCK_NAME
        with self._opened() as dir_fd:
            try:
                fd = os.open(
                    LOCK_NAME,
                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                    FILE_MODE,
                    dir_fd=dir_fd,
                )
            except OSError as exc:
                raise DestinationError(
                    f"cannot open lock file: {reason(exc)}", path=str(lock_path)
                ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StorageLockedError(
                f"another tbot-py process holds the lock on {lock_path} (pid {holder}); "
                "stop it or use a different storage directory",
                path=str(self.path),
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise DestinationError(
                f"cannot write lock file: {reason(exc)}", path=str(lock_path)
            ) from None
        return DirectoryLock(fd, lock_path)

    # -- helpers --------------------------------------------------------------

    def _opened(self, *, create: bool = False) -> AbstractContextManager[int]:
        return opened_directory(self.path, self.symlinks, create=create)

    def _error(self, what: str, exc: OSError) -> DestinationError:
        name = exc.filename
        plain = isinstance(name, str) and "/" not in name and not name.startswith(".")
        where = self.path / name if plain else self.path
        if exc.errno == errno.ENOENT:
            return DestinationError(f"{what}: directory was removed while writing", path=str(where))
        if exc.errno in (errno.EACCES, errno.EPERM):
            return DestinationError(
                f"{what}: {reason(exc)}; run tbot-py as the directory's owner or give that "
                "user write access (e.g. chown, chmod 0700)",
                path=str(where),
            )
        return DestinationError(f"{what}: {reason(exc)}", path=str(where))

    def _layout_error(self, exc: layout.LayoutError) -> DestinationError:
        return DestinationError(
            f"{exc.problem}; tbot-py did not create it", path=str(self.path / exc.name)
        )


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
