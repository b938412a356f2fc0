"""An in-process destination: artifacts live in a dict and vanish when the process exits.

Useful for CI jobs that join fresh every run (delegated joins), and as the
bot's storage when nothing may touch the disk. As storage it loses the bot
instance between runs, so the caller should warn (tbot.md §3.2).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType

from tbot_py.destinations.base import check_artifact_name


class MemoryLock:
    """The lock of a memory destination: nothing else can reach the dict, so a no-op."""

    def release(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> MemoryLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class MemoryDestination:
    """Artifacts held in this process only."""

    is_persistent = False

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}

    def init(self) -> None:
        """Nothing to prepare."""

    def write(self, name: str, data: bytes) -> None:
        """Store a copy of ``data`` under ``name``."""
        self._files[check_artifact_name(name)] = bytes(data)

    def write_many(self, files: Mapping[str, bytes]) -> None:
        """Store all files at once; all names are checked before any is stored."""
        for name in files:
            check_artifact_name(name)
        self._files.update((name, bytes(data)) for name, data in files.items())

    def read(self, name: str) -> bytes | None:
        """The stored bytes of ``name``, or None."""
        return self._files.get(check_artifact_name(name))

    def read_many(self, names: Iterable[str]) -> dict[str, bytes | None]:
        """The stored bytes of each name (None where missing)."""
        return {name: self._files.get(check_artifact_name(name)) for name in names}

    def describe(self) -> str:
        """``memory``."""
        return "memory"

    def lock(self) -> MemoryLock:
        """A lock that always succeeds: memory is private to this process."""
        return MemoryLock()

    def __repr__(self) -> str:
        return f"MemoryDestination({sorted(self._files)!r})"
