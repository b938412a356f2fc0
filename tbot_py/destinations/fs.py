"""File system primitives: open a directory without following symlinks; write a file atomically.

Opening a destination path is where a planted symlink would redirect our
writes (``/var/lib/tbot/out -> /etc``). In the ``secure`` and ``try-secure``
modes every component of the path is resolved without following symlinks:
with Linux ``openat2(RESOLVE_NO_SYMLINKS)`` in one system call where the kernel
allows it, and otherwise by walking the path one component at a time with
``O_NOFOLLOW`` relative to the previous component's descriptor. Both refuse the
same paths; tbot's ``try-secure`` follows symlinks when ``openat2`` is blocked
(containers, seccomp), the walk does not need to. Everything after the open is
done relative to the directory descriptor, so swapping a path component after
the check cannot move a write elsewhere.

:func:`write_file_atomic` is the plain single-file writer (temp file, fsync,
rename, fsync the directory) used for files outside destinations: the auth
service's keys and ``configure -o``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from tbot_py.errors import DestinationError

log = logging.getLogger(__name__)

SymlinkMode = Literal["secure", "try-secure", "insecure"]
SYMLINK_MODES: tuple[SymlinkMode, ...] = ("secure", "try-secure", "insecure")

DIR_MODE = 0o700
FILE_MODE = 0o600

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW

# Short reasons for the failures a user can fix; anything else uses strerror.
_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "does not exist",
    errno.ELOOP: "is a symlink, which tbot-py does not follow",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "is not a directory",
}


def reason(exc: OSError) -> str:
    """A short, user-facing reason for ``exc`` (no path: callers add the path)."""
    if exc.errno is not None and exc.errno in _REASONS:
        return _REASONS[exc.errno]
    return exc.strerror or str(exc)


# --- openat2 --------------------------------------------------------------------------------

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (asm-generic table)
_RESOLVE_NO_SYMLINKS = 0x04
_AT_FDCWD = -100
_openat2_state: bool | None = None  # None: untried; False: blocked or missing


def _openat2(path: str, flags: int) -> int | None:
    """``openat2(AT_FDCWD, path, flags, RESOLVE_NO_SYMLINKS)``; None if the kernel refuses it."""
    global _openat2_state  # noqa: PLW0603 - one probe per process
    if _openat2_state is False or not sys.platform.startswith("linux"):
        return None
    fd, err = _openat2_syscall()(os.fsencode(path), flags)
    if fd >= 0:
        _openat2_state = True
        return fd
    if err in (errno.ENOSYS, errno.EPERM, errno.E2BIG) and _openat2_state is None:
        # Missing (kernel < 5.6) or blocked by a seccomp filter: walk instead, from now on.
        _openat2_state = False
        log.info("openat2 is unavailable (%s); resolving paths component by component", err)
        return None
    raise OSError(err, os.strerror(err), path)


@functools.cache
def _openat2_syscall() -> Callable[[bytes, int], tuple[int, int]]:
    """The raw system call through libc's ``syscall()``: ``(path, flags) -> (fd, errno)``.

    Built once: loading libc and defining the argument struct cost several times
    the call itself, and every write and read of a destination opens it.
    """
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = (
            ("flags", ctypes.c_uint64),
            ("mode", ctypes.c_uint64),
            ("resolve", ctypes.c_uint64),
        )

    libc = ctypes.CDLL(None, use_errno=True)
    number, at_cwd = ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(_AT_FDCWD)
    size = ctypes.c_size_t(ctypes.sizeof(OpenHow))

    def call(path: bytes, flags: int) -> tuple[int, int]:
        how = OpenHow(flags, 0, _RESOLVE_NO_SYMLINKS)
        fd = int(libc.syscall(number, at_cwd, ctypes.c_char_p(path), ctypes.byref(how), size))
        return fd, (ctypes.get_errno() if fd < 0 else 0)

    return call


def openat2_available() -> bool:
    """Whether ``openat2`` works here (probed once, on ``/``)."""
    fd = _openat2("/", _DIR_FLAGS)
    if fd is None:
        return False
    os.close(fd)
    return True


# --- opening directories ----------------------------------------------------------------------


def _components(path: Path) -> list[str]:
    return [part for part in path.parts[1:] if part]


def _walk(path: Path, *, create: bool) -> int:
    """Open ``path`` one component at a time with ``O_NOFOLLOW``; create missing ones if asked."""
    fd = os.open("/", _PATH_FLAGS)
    try:
        parts = _components(path)
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            flags = (_DIR_FLAGS if last else _PATH_FLAGS) | os.O_NOFOLLOW
            try:
                next_fd = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                next_fd = _make_dir_at(fd, part)
            os.close(fd)
            fd = next_fd
        if not parts:  # the root itself: reopen readable
            next_fd = os.open("/", _DIR_FLAGS)
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _make_dir_at(parent_fd: int, name: str) -> int:
    """Create directory ``name`` with mode 0700 (whatever the umask) and open it."""
    created = True
    try:
        os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
    except FileExistsError:
        created = False  # made concurrently: not ours to chmod
    fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    if created:
        try:
            os.fchmod(fd, DIR_MODE)
        except BaseException:
            os.close(fd)
            raise
    return fd


def _symlink_in(path: Path) -> Path | None:
    """The first component of ``path`` that is a symlink, if any (for error messages)."""
    current = Path("/")
    for part in _components(path):
        current = current / part
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return current
        except OSError:
            return None
    return None


def open_directory(path: Path, mode: SymlinkMode, *, create: bool = False) -> int:
    """Open the directory ``path`` (absolute) for reading and ``*at`` calls; the caller closes it.

    ``create`` makes missing components, each with mode 0700. Raise DestinationError
    with a clear reason: a symlink in the path (secure modes), not a directory,
    missing, permission denied.
    """
    try:
        if mode == "insecure":
            if create:
                _make_dirs_following(path)
            return os.open(path, _DIR_FLAGS)
        if not create:
            fd = _openat2(str(path), _DIR_FLAGS)
            if fd is not None:
                return fd
        return _walk(path, create=create)
    except OSError as exc:
        raise _open_error(path, mode, exc) from None


def _make_dirs_following(path: Path) -> None:
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, DIR_MODE)
            os.chmod(directory, DIR_MODE)


def _open_error(path: Path, mode: SymlinkMode, exc: OSError) -> DestinationError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and mode != "insecure":
        link = _symlink_in(path)
        if link is not None:
            return DestinationError(
                f"{link} is a symlink; with symlinks: {mode} tbot-py follows no symlink in a "
                f"destination path (use the real path {os.path.realpath(link)}, or set "
                "symlinks: insecure)",
                path=str(path),
            )
    if exc.errno == errno.ENOTDIR:
        return DestinationError("destination path is not a directory", path=str(path))
    if exc.errno == errno.ENOENT:
        return DestinationError(
            "destination directory does not exist (was it removed?)", path=str(path)
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DestinationError(
            "tbot-py does not have permission to write to this directory; run tbot-py as the "
            "directory's owner or give that user write access (e.g. chown, chmod 0700)",
            path=str(path),
        )
    return DestinationError(f"cannot open destination: {reason(exc)}", path=str(path))


@contextlib.contextmanager
def opened_directory(path: Path, mode: SymlinkMode, *, create: bool = False) -> Iterator[int]:
    """:func:`open_directory` as a context manager that closes the descriptor."""
    fd = open_directory(path, mode, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


# --- writing ------------------------------------------------------------------------------------


def write_new_file(dir_fd: int, name: str, data: bytes, mode: int = FILE_MODE) -> None:
    """Create ``name`` (which must not exist) in ``dir_fd`` with ``data`` and flush it to disk."""
    fd = os.open(name, _NEW_FILE_FLAGS, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        unlink_quietly(dir_fd, name)
        raise


def fsync_directory(dir_fd: int) -> None:
    """Flush a directory's entries (renames, links) to disk where the file system can."""
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        # Some file systems (certain FUSE and network ones) cannot fsync a
        # directory; the renames are still atomic there, just not flushed.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def unlink_quietly(dir_fd: int, name: str) -> None:
    """Best effort: the error worth reporting is the one that got us here."""
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def write_file_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Atomically replace the file ``path`` with ``data``, durable on return.

    A temp file in the same directory, flushed, renamed over ``path`` (a symlink
    there is replaced, not followed), then the directory is flushed. The directory
    must exist. Raise DestinationError with the reason.
    """
    directory = path.parent
    temp = f".{path.name}.tmp-{os.urandom(6).hex()}"
    try:
        dir_fd = os.open(directory, _DIR_FLAGS)
    except OSError as exc:
        raise DestinationError(f"cannot write file: {reason(exc)}", path=str(path)) from None
    try:
        write_new_file(dir_fd, temp, data, mode)
        try:
            os.replace(temp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            unlink_quietly(dir_fd, temp)
            raise
        fsync_directory(dir_fd)
    except OSError as exc:
        raise DestinationError(f"cannot write file: {reason(exc)}", path=str(path)) from None
    finally:
        os.close(dir_fd)
