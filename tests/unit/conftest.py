"""Fixtures shared by the unit tests: a real in-process auth service and a bot's join token."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tbot_py.authservice import admin
from tbot_py.authservice.cluster import Cluster
from tbot_py.authservice.roles import LOGINS_TRAIT, RoleConditions, new_role
from tbot_py.authservice.server import RunningAuthService, start_in_thread

#: The bot every ``token`` fixture creates: roles access and dev, login root.
BOT = "ci"


def create_login_roles(cluster: Cluster, *names: str) -> None:
    """Create roles that allow the bot's own logins and nothing else, like the tests expect."""
    for name in names:
        admin.create_role(cluster, new_role(name, allow=RoleConditions(logins=(LOGINS_TRAIT,))))


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
    create_login_roles(service.cluster, "dev")
    return admin.add_bot(
        service.cluster, BOT, roles=("access", "dev"), logins=("root",)
    ).token.token
