"""What the modules that own tables of the state database share: encodings and the transaction.

:mod:`.storage` owns the database and its schema; :mod:`.bots_store`,
:mod:`.tokens_store`, :mod:`.instances_store`, :mod:`.roles_store` and
:mod:`.locks` own the tables. Each statement runs in a transaction from
``Storage``, so a check in one module and a write in another are atomic together.

The queries are written once, in SQLite's dialect with ``?`` placeholders.
:class:`Connection` is the thin dialect layer that lets them run on PostgreSQL
as well: it rewrites the placeholders and turns each driver's integrity error
into :class:`IntegrityError`.

Times are stored as fixed-width UTC text, which sorts and compares correctly
as a string and reads well in the ``sqlite3`` and ``psql`` shells.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, Protocol

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class IntegrityError(Exception):
    """A statement broke a constraint (a duplicate key, a missing foreign key)."""


class Cursor(Protocol):
    """What the stores read from a statement: rows and the count of rows changed."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class _DriverConnection(Protocol):
    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...


class Connection:
    """One open transaction; ``execute`` takes SQLite-dialect SQL on either database."""

    def __init__(
        self,
        raw: _DriverConnection,
        *,
        postgres: bool,
        integrity_errors: tuple[type[BaseException], ...],
    ) -> None:
        self._raw = raw
        self.postgres = postgres
        self._integrity_errors = integrity_errors

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        """Run ``sql`` with ``?`` placeholders; IntegrityError when it breaks a constraint."""
        if self.postgres:
            # None of our statements holds a literal '?' or '%'.
            sql = sql.replace("?", "%s")
        try:
            cursor: Cursor = self._raw.execute(sql, tuple(params))
        except self._integrity_errors as exc:
            raise IntegrityError(str(exc)) from None
        return cursor

    def for_update(self, select: str) -> str:
        """``select`` locking the rows it reads until COMMIT (PostgreSQL).

        SQLite needs nothing: a write transaction there holds the whole database.
        """
        return f"{select} FOR UPDATE" if self.postgres else select


class Transaction(Protocol):
    """``Storage``'s transaction helper: ``with transaction(write=True) as conn: ...``.

    A write transaction takes the database's write lock up front (``BEGIN
    IMMEDIATE`` on SQLite, a transaction-level advisory lock on PostgreSQL), so
    a read-then-write step cannot race another process.
    """

    def __call__(self, *, write: bool = False) -> AbstractContextManager[Connection]: ...


def ts(t: datetime) -> str:
    """``t`` as stored: fixed-width UTC text."""
    return t.astimezone(UTC).strftime(_TIME_FORMAT)


def dt(value: object) -> datetime:
    """A stored time back as an aware UTC datetime."""
    return datetime.strptime(str(value), _TIME_FORMAT).replace(tzinfo=UTC)


def placeholders(values: tuple[object, ...]) -> str:
    """``?, ?, ?``: one placeholder per value, for an ``IN (...)`` list (never empty)."""
    return ", ".join("?" * len(values))
