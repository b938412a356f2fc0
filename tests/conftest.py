"""Fixtures every test package shares: the throwaway PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import pg


@pytest.fixture(scope="session")
def _postgres_session() -> Iterator[pg._Started]:
    yield from pg.start_postgres()


@pytest.fixture
def postgres_dsn(_postgres_session: pg._Started) -> str:
    """The DSN of a new, empty database on the session's PostgreSQL server (else a loud skip)."""
    return pg.require(_postgres_session).new_database()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for reason in pg.skip_reasons:
        terminalreporter.write_line(f"POSTGRESQL TESTS SKIPPED: {reason}", red=True, bold=True)
