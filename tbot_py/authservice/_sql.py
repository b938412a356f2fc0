"""What the modules that own tables of ``state.db`` share: value encodings and the transaction type.

:mod:`.storage` owns the file and its schema; :mod:`.bots_store`,
:mod:`.tokens_store`, :mod:`.instances_store`, :mod:`.roles_store` and
:mod:`.locks` own the tables. Each statement runs in a transaction from
``Storage``, so a check in one module and a write in another are atomic together.

Times are stored as fixed-width UTC text, which sorts and compares correctly
as a string and reads well in the ``sqlite3`` shell.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Protocol

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class Transaction(Protocol):
    """``Storage``'s transaction helper: ``with transaction(write=True) as conn: ...``.

    A write transaction takes the database's write lock up front (``BEGIN IMMEDIATE``).
    """

    def __call__(self, *, write: bool = False) -> AbstractContextManager[sqlite3.Connection]: ...


def ts(t: datetime) -> str:
    """``t`` as stored: fixed-width UTC text."""
    return t.astimezone(UTC).strftime(_TIME_FORMAT)


def dt(value: object) -> datetime:
    """A stored time back as an aware UTC datetime."""
    return datetime.strptime(str(value), _TIME_FORMAT).replace(tzinfo=UTC)


def placeholders(values: tuple[object, ...]) -> str:
    """``?, ?, ?``: one placeholder per value, for an ``IN (...)`` list."""
    return ", ".join("?" * len(values))
