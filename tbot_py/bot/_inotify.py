"""inotify(7) read by the asyncio loop itself: directory watches without threads.

watchdog's observer runs a thread per watch and two more, and hands every event
across three of them before it reaches the loop. The output watcher moves one
watch to each output's new version directory on every write, which there cost a
thread start and a join per output and renewal: with 100 outputs, more CPU than
the renewals themselves. Here one inotify descriptor is read with
``loop.add_reader``, and adding or moving a watch is one system call.

Linux only. Creating an :class:`Inotify` raises OSError where it cannot work
(another system, ``fs.inotify.max_user_instances`` reached); the caller then
polls with watchdog instead.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import logging
import os
import struct
from collections.abc import Callable

log = logging.getLogger(__name__)

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x1000000
_IN_DONT_FOLLOW = 0x2000000

#: Changes to a directory's entries and to the files in it; no opens, reads or closes.
CHANGES = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_SELF = IN_DELETE_SELF | IN_MOVE_SELF
# Event names as watchdog spells them, so that both sources feed the same sinks.
_KINDS = (
    (IN_CREATE, "created"),
    (IN_DELETE, "deleted"),
    (IN_MOVED_FROM | IN_MOVED_TO, "moved"),
    (IN_MODIFY, "modified"),
    (IN_ATTRIB, "attrib"),
    (IN_CLOSE_WRITE, "closed"),
)
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_READ_SIZE = 64 * 1024

#: Receives an event's kind and paths; ``("overflow", ())`` when the kernel dropped events.
Sink = Callable[[str, tuple[str, ...]], None]


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1  # noqa: B018 - AttributeError here, not at the first watch, off Linux
    return libc


def _check(result: int, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return result


class Inotify:
    """Non-recursive watches on directories; each event goes to ``sink`` on the loop.

    The kernel reports ``mask`` events in each directory, and the directory's own
    deletion or move as ``deleted`` of the directory. A directory is watched once
    however many paths name it. Call every method from the loop's thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Sink, mask: int = CHANGES) -> None:
        try:
            libc = _libc()
        except (OSError, AttributeError) as exc:
            raise OSError(errno.ENOSYS, f"no inotify here ({exc})") from None
        self._fd = _check(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        self._loop = loop
        self._sink = sink
        self._mask = mask | _SELF | _IN_ONLYDIR | _IN_DONT_FOLLOW
        self._paths: dict[int, str] = {}  # watch descriptor -> directory
        self._watches: dict[str, int] = {}  # directory -> watch descriptor
        loop.add_reader(self._fd, self._read)

    def add(self, directory: str) -> None:
        """Watch ``directory``; raise OSError (ENOENT, ENOSPC at the watch limit, ...)."""
        if directory in self._watches:
            return
        wd = _check(
            _libc().inotify_add_watch(self._fd, os.fsencode(directory), self._mask), directory
        )
        self._paths.setdefault(wd, directory)
        self._watches[directory] = wd

    def remove(self, directory: str) -> None:
        """Stop watching ``directory``; events already queued for it are dropped."""
        wd = self._watches.pop(directory, None)
        if wd is None:
            return
        others = [path for path, other in self._watches.items() if other == wd]
        if others:
            self._paths[wd] = others[0]  # still watched under another name
            return
        del self._paths[wd]
        _libc().inotify_rm_watch(self._fd, wd)  # fails only if the kernel dropped it already

    def close(self) -> None:
        """Drop every watch and the descriptor. Idempotent."""
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._paths.clear()
        self._watches.clear()

    def _read(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, size = _HEADER.unpack_from(data, offset)
            name = data[offset + _HEADER.size : offset + _HEADER.size + size].rstrip(b"\0")
            offset += _HEADER.size + size
            try:
                self._dispatch(wd, mask, os.fsdecode(name))
            except Exception:
                log.exception("error while handling a file system event")

    def _dispatch(self, wd: int, mask: int, name: str) -> None:
        if mask & _IN_Q_OVERFLOW:
            self._sink("overflow", ())
            return
        directory = self._paths.get(wd)
        if directory is None:
            return  # removed meanwhile
        if mask & _IN_IGNORED:  # the kernel dropped the watch: its directory is gone
            del self._paths[wd]
            self._watches = {p: w for p, w in self._watches.items() if w != wd}
        elif mask & _SELF:
            self._sink("deleted", (directory,))
        else:
            kind = next((kind for bits, kind in _KINDS if mask & bits), None)
            if kind is not None:
                self._sink(kind, (os.path.join(directory, name),))
