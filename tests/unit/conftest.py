"""Fixtures shared by the unit tests: a real in-process auth service and a bot's join token."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tbot_py.authservice import admin
from tbot_py.authservice.server import RunningAuthService, start_in_thread

#: The bot every ``token`` fixture creates: roles access and dev, login root.
BOT = "ci"


def utc_now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[RunningAuthService]:
    """A fresh cluster per test on 127.0.0.1 (it starts in about 25 ms)."""
    with start_in_thread(tmp_path / "auth") as running:
        yield running


@pytest.fixture
def token(service: RunningAuthService) -> str:
    """The first join token of bot "ci" (roles access and dev, login root)."""
    return admin.add_bot(
        service.cluster, BOT, roles=("access", "dev"), logins=("root",)
    ).token.token
