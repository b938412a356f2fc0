"""What every destination offers: named byte blobs, written and read back.

A destination never knows what it stores. Services render artifacts to bytes
and hand them over by name; the bot's storage is a destination like any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Protocol

from tbot_py.errors import DestinationError


class DestinationLock(Protocol):
    """An exclusive hold on a destination, kept until :meth:`release` or the ``with`` exits."""

    def release(self) -> None:
        """Give the lock up. Calling it twice is harmless."""

    def __enter__(self) -> DestinationLock: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Destination(Protocol):
    """A place artifacts are written to: a directory, process memory, ..."""

    @property
    def is_persistent(self) -> bool:
        """True when what is written survives the process (false for memory)."""

    def init(self) -> None:
        """Prepare the destination and prove it is writable, or raise DestinationError."""

    def write(self, name: str, data: bytes) -> None:
        """Replace the artifact ``name`` with ``data``."""

    def write_many(self, files: Mapping[str, bytes]) -> None:
        """Replace several artifacts together: a reader sees all of them new or all old."""

    def read(self, name: str) -> bytes | None:
        """The bytes of artifact ``name``, or None when it does not exist."""

    def read_many(self, names: Iterable[str]) -> dict[str, bytes | None]:
        """Several artifacts from one consistent state: never a new key with an old certificate."""

    def describe(self) -> str:
        """A short human description for logs, e.g. ``directory /var/lib/tbot``."""

    def lock(self) -> DestinationLock:
        """Take the exclusive lock that keeps two bots off the same storage."""


#: How many directory levels an artifact name may have: ``cockroach/node.key`` and no deeper.
MAX_SUBDIRECTORIES = 1


def _plain_part(part: str) -> bool:
    return bool(part) and part not in (".", "..") and "\0" not in part and ".." not in part


def check_artifact_name(name: str) -> str:
    """Return ``name`` if it is a plain file name or ``dir/file``; raise DestinationError otherwise.

    Names come from services, not users, but a name like ``../x`` would let an
    artifact escape its destination, so every destination refuses them before
    touching anything. One directory level is allowed (tbot's ``cockroach``
    database format writes ``cockroach/node.key``); each part must be plain.
    """
    parts = name.split("/")
    if len(parts) > MAX_SUBDIRECTORIES + 1 or not all(_plain_part(part) for part in parts):
        raise DestinationError(
            f"invalid artifact name {name!r}: must be a plain file name, or one directory "
            "and a file name (dir/file)"
        )
    return name


def split_artifact_name(name: str) -> tuple[str | None, str]:
    """``"cockroach/node.key"`` -> ``("cockroach", "node.key")``; ``"key"`` -> ``(None, "key")``."""
    directory, _, leaf = name.rpartition("/")
    return (directory or None), leaf


def top_level_name(name: str) -> str:
    """The entry at the top of a destination that holds ``name``: ``cockroach`` or ``key``."""
    return name.split("/", 1)[0]


def check_name_conflicts(names: Iterable[str]) -> None:
    """Refuse a set of names in which one is both a file and a directory (``a`` and ``a/b``)."""
    names = list(names)
    directories = {name.split("/", 1)[0] for name in names if "/" in name}
    clash = sorted(directories.intersection(names))
    if clash:
        raise DestinationError(
            f"invalid artifact names: {clash[0]!r} would be both a file and a directory"
        )
