"""A directory of artifact files, each replaced atomically, mode 0600 in a 0700 directory.

tbot truncates and rewrites files in place, so a crash or a full disk can leave
a torn private key next to a fresh certificate. Here every write goes to a
temporary file in the same directory, is flushed to disk, and is renamed over
the old file; the directory is then flushed so the rename itself survives a
power cut. A reader sees either the old file or the new one, never a mix.

Symlinks at artifact names are neither followed on write (the rename replaces
the link itself) nor on read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from tbot_py.destinations.base import check_artifact_name
from tbot_py.errors import DestinationError, StorageLockedError

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
LOCK_NAME = "lock"

# Short reasons for the failures a user can fix; anything else uses strerror.
_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "directory does not exist (was the destination initialised?)",
    errno.ELOOP: "is a symlink, which tbot-py does not follow",
    errno.EISDIR: "is a directory",
}

_TEMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def _reason(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in _REASONS:
        return _REASONS[exc.errno]
    return exc.strerror or str(exc)


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

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # Absolute, so that a later chdir cannot move the destination and so
        # that ssh_config can point at it.
        self.path = Path(os.path.abspath(path))

    def describe(self) -> str:
        """``directory <path>``."""
        return f"directory {self.path}"

    def __repr__(self) -> str:
        return f"DirectoryDestination({str(self.path)!r})"

    # -- init ---------------------------------------------------------------

    def init(self) -> None:
        """Create the directory (and missing parents) with mode 0700 and prove we can write it.

        An existing directory is left as it is: its mode is not changed and the
        write probe removes its own file.
        """
        try:
            self._make_dirs()
            self._probe_writable()
        except PermissionError:
            raise DestinationError(
                f"tbot-py does not have permission to write to {self.path}; run tbot-py as "
                "the directory's owner or give that user write access (e.g. chown, chmod 0700)",
                path=str(self.path),
            ) from None
        except OSError as exc:
            raise DestinationError(
                f"cannot prepare destination: {_reason(exc)}", path=str(self.path)
            ) from None

    def _make_dirs(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            st = None
        except NotADirectoryError:
            raise self._not_a_directory() from None
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                raise self._not_a_directory()
            if st.st_mode & 0o077:
                log.warning(
                    "destination directory %s has mode %o: other users may read credentials",
                    self.path,
                    stat.S_IMODE(st.st_mode),
                )
            return
        # os.makedirs gives only the leaf the requested mode, and the umask
        # still applies, so create each missing component and chmod it.
        missing: list[Path] = []
        current = self.path
        while not current.exists():
            missing.append(current)
            current = current.parent
        if not current.is_dir():
            raise self._not_a_directory()
        for directory in reversed(missing):
            try:
                os.mkdir(directory, DIR_MODE)
            except FileExistsError:
                if not directory.is_dir():
                    raise self._not_a_directory() from None
                continue  # created concurrently: not ours to chmod
            except NotADirectoryError:
                raise self._not_a_directory() from None
            os.chmod(directory, DIR_MODE)

    def _not_a_directory(self) -> DestinationError:
        return DestinationError("destination path is not a directory", path=str(self.path))

    def _probe_writable(self) -> None:
        probe = self.path / f".write-probe-{os.getpid()}-{os.urandom(6).hex()}"
        fd = os.open(probe, _TEMP_FLAGS, FILE_MODE)
        os.close(fd)
        os.unlink(probe)

    # -- writes -------------------------------------------------------------

    def write(self, name: str, data: bytes) -> None:
        """Atomically replace ``name`` with ``data`` (mode 0600), durable on return."""
        self.write_many({name: data})

    def write_many(self, files: Mapping[str, bytes]) -> None:
        """Atomically replace each file, in order; durable on return.

        All temporary files are written and flushed before the first rename, so
        a failure while writing (a full disk, say) replaces nothing. Each rename
        is atomic; the directory is flushed once after the last one, which is
        enough to make every rename durable. A crash between renames can leave
        some files new and some old, but never a partial file.
        """
        for name in files:
            check_artifact_name(name)
        staged: list[tuple[str, Path]] = []
        renamed = 0
        try:
            for name, data in files.items():
                staged.append((name, self._write_temp(name, data)))
            for name, temp in staged:
                try:
                    os.replace(temp, self.path / name)
                except OSError as exc:
                    raise self._write_error(name, exc) from None
                renamed += 1
        finally:
            # Only a failure leaves temp files behind: those not yet renamed.
            for _, temp in staged[renamed:]:
                _unlink_quietly(temp)
        try:
            _fsync_directory(self.path)
        except OSError as exc:
            raise DestinationError(
                f"cannot flush directory: {_reason(exc)}", path=str(self.path)
            ) from None

    def _write_temp(self, name: str, data: bytes) -> Path:
        """Write ``data`` to a new 0600 temp file next to ``name`` and flush it to disk."""
        temp = self.path / f".{name}.tmp-{os.urandom(6).hex()}"
        try:
            fd = os.open(temp, _TEMP_FLAGS, FILE_MODE)
        except OSError as exc:
            raise self._write_error(name, exc) from None
        try:
            try:
                # The umask may have taken bits away from 0600; put them back.
                os.fchmod(fd, FILE_MODE)
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            _unlink_quietly(temp)
            if isinstance(exc, OSError):
                raise self._write_error(name, exc) from None
            raise
        return temp

    def _write_error(self, name: str, exc: OSError) -> DestinationError:
        return DestinationError(f"cannot write file: {_reason(exc)}", path=str(self.path / name))

    # -- reads --------------------------------------------------------------

    def read(self, name: str) -> bytes | None:
        """The contents of ``name``, or None if it does not exist. Never creates anything."""
        check_artifact_name(name)
        target = self.path / name
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DestinationError(f"cannot read file: {_reason(exc)}", path=str(target)) from None
        try:
            with os.fdopen(fd, "rb") as f:
                return f.read()
        except OSError as exc:
            raise DestinationError(f"cannot read file: {_reason(exc)}", path=str(target)) from None

    # -- lock ---------------------------------------------------------------

    def lock(self) -> DirectoryLock:
        """Take the exclusive, non-blocking lock on ``<dir>/lock``.

        Raise StorageLockedError, naming the holder's pid, if another process
        (or another lock object in this one) has it.
        """
        lock_path = self.path / LOCK_NAME
        try:
            fd = os.open(
                lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE
            )
        except OSError as exc:
            raise DestinationError(
                f"cannot open lock file: {_reason(exc)}", path=str(lock_path)
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
                f"cannot write lock file: {_reason(exc)}", path=str(lock_path)
            ) from None
        return DirectoryLock(fd, lock_path)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _unlink_quietly(path: Path) -> None:
    # Best effort: the error worth reporting is the one that got us here.
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems (certain FUSE and network ones) cannot fsync a
        # directory; the renames are still atomic there, just not flushed.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
