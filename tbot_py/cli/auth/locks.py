"""``tbot-py auth locks``: lock a bot or one bot instance, list locks and lift them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from tbot_py.cli.auth._common import (
    data_dir_option,
    format_option,
    print_json,
    print_table,
    storage_url,
    user_errors,
    when,
)

if TYPE_CHECKING:
    from datetime import datetime

    from tbot_py.authservice.locks import Lock


@click.group(name="locks")
def locks_group() -> None:
    """Manage locks: a locked bot or bot instance is refused every call, a locked bot every join."""


@locks_group.command(name="ls")
@format_option
@data_dir_option
@user_errors
def locks_ls(output_format: str, data_dir: Path) -> None:
    """List locks, expired ones included, oldest first."""
    from datetime import UTC, datetime

    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    records = admin.list_locks(open_cluster(data_dir, storage=storage_url()))
    now = datetime.now(UTC)
    if output_format == "json":
        print_json([_lock_json(lock, now) for lock in records])
        return
    if not records:
        click.echo("No locks.")
        return
    print_table(
        ("ID", "KIND", "TARGET", "CREATED BY", "CREATED", "EXPIRES", "MESSAGE"),
        [
            (
                lock.id,
                lock.target_kind,
                lock.target,
                lock.created_by,
                when(lock.created_at),
                _lock_expiry(lock, now),
                lock.message,
            )
            for lock in records
        ],
    )


@locks_group.command(name="add")
@click.option("--bot", "bot_name", default=None, help="Lock every instance of bot NAME.")
@click.option("--instance", default=None, metavar="BOT/ID", help="Lock one instance of a bot.")
@click.option("--message", default=None, help="Why; shown to the refused bot.")
@click.option("--ttl", default=None, help="Lift the lock after this long (Go duration).")
@format_option
@data_dir_option
@user_errors
def locks_add(
    *,
    bot_name: str | None,
    instance: str | None,
    message: str | None,
    ttl: str | None,
    output_format: str,
    data_dir: Path,
) -> None:
    """Lock a bot (--bot NAME) or one bot instance (--instance BOT/ID)."""
    from datetime import UTC, datetime

    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    lock_ttl = admin.parse_go_duration(ttl) if ttl is not None else None
    lock = admin.add_lock(
        open_cluster(data_dir, storage=storage_url()),
        bot=bot_name,
        instance=instance,
        message=message,
        ttl=lock_ttl,
    )
    if output_format == "json":
        print_json(_lock_json(lock, datetime.now(UTC)))
        return
    click.echo(f"Lock {lock.id} created on {lock.describe_target()}: {lock.message}")
    until = "removed" if lock.expires_at is None else f"it expires at {when(lock.expires_at)}"
    click.echo(f"It holds until {until}; remove it with tbot-py auth locks rm {lock.id}")


@locks_group.command(name="rm")
@click.argument("lock_id", metavar="ID")
@data_dir_option
@user_errors
def locks_rm(lock_id: str, data_dir: Path) -> None:
    """Remove the lock ID (from locks ls)."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    removed = admin.remove_lock(open_cluster(data_dir, storage=storage_url()), lock_id)
    click.echo(f"Lock {removed.id} on {removed.describe_target()} removed.")


def _lock_json(lock: Lock, now: datetime) -> dict[str, object]:
    """A lock in ``locks ls`` and ``locks add`` JSON."""
    return {
        "id": lock.id,
        "target_kind": lock.target_kind,
        "target": lock.target,
        "message": lock.message,
        "created_by": lock.created_by,
        "created": when(lock.created_at),
        "expires": None if lock.expires_at is None else when(lock.expires_at),
        "expired": not lock.in_force(now),
    }


def _lock_expiry(lock: Lock, now: datetime) -> str:
    if lock.expires_at is None:
        return "never"
    return when(lock.expires_at) + ("" if lock.in_force(now) else " (expired)")
