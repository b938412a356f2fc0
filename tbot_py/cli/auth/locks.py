"""``tbot-py auth locks``: lock a bot or one bot instance, list locks and lift them."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from tbot_py.cli.auth._common import (
    admin_target_option,
    format_option,
    local_cluster,
    print_json,
    print_table,
    remote_admin,
    user_errors,
)


@click.group(name="locks")
def locks_group() -> None:
    """Manage locks: a locked bot or bot instance is refused every call, a locked bot every join."""


@locks_group.command(name="ls")
@format_option
@admin_target_option
@user_errors
def locks_ls(output_format: str, data_dir: Path | None) -> None:
    """List locks, expired ones included, oldest first."""
    remote = remote_admin()
    if remote is not None:
        docs = remote.call("GET", "locks")
    else:
        from datetime import UTC, datetime

        from tbot_py.authservice import admin

        records = admin.list_locks(local_cluster(data_dir))
        now = datetime.now(UTC)
        docs = [admin.lock_json(lock, now) for lock in records]
    if output_format == "json":
        print_json(docs)
        return
    if not docs:
        click.echo("No locks.")
        return
    print_table(
        ("ID", "KIND", "TARGET", "CREATED BY", "CREATED", "EXPIRES", "MESSAGE"),
        [
            (
                d["id"],
                d["target_kind"],
                d["target"],
                d["created_by"],
                d["created"],
                _lock_expiry(d),
                d["message"],
            )
            for d in docs
        ],
    )


@locks_group.command(name="add")
@click.option("--bot", "bot_name", default=None, help="Lock every instance of bot NAME.")
@click.option("--instance", default=None, metavar="BOT/ID", help="Lock one instance of a bot.")
@click.option("--message", default=None, help="Why; shown to the refused bot.")
@click.option("--ttl", default=None, help="Lift the lock after this long (Go duration).")
@format_option
@admin_target_option
@user_errors
def locks_add(
    *,
    bot_name: str | None,
    instance: str | None,
    message: str | None,
    ttl: str | None,
    output_format: str,
    data_dir: Path | None,
) -> None:
    """Lock a bot (--bot NAME) or one bot instance (--instance BOT/ID)."""
    from datetime import UTC, datetime

    from tbot_py.authservice import admin

    lock_ttl = admin.parse_go_duration(ttl) if ttl is not None else None
    remote = remote_admin()
    if remote is not None:
        body = {"bot": bot_name, "instance": instance, "message": message, "ttl": ttl}
        doc = remote.call("POST", "locks", body)
    else:
        lock = admin.add_lock(
            local_cluster(data_dir),
            bot=bot_name,
            instance=instance,
            message=message,
            ttl=lock_ttl,
        )
        doc = admin.lock_json(lock, datetime.now(UTC))
    if output_format == "json":
        print_json(doc)
        return
    click.echo(f"Lock {doc['id']} created on {_describe_target(doc)}: {doc['message']}")
    until = "removed" if doc["expires"] is None else f"it expires at {doc['expires']}"
    click.echo(f"It holds until {until}; remove it with tbot-py auth locks rm {doc['id']}")


@locks_group.command(name="rm")
@click.argument("lock_id", metavar="ID")
@admin_target_option
@user_errors
def locks_rm(lock_id: str, data_dir: Path | None) -> None:
    """Remove the lock ID (from locks ls)."""
    from datetime import UTC, datetime

    from tbot_py.authservice import admin

    remote = remote_admin()
    if remote is not None:
        doc = remote.call("DELETE", f"locks/{quote(lock_id, safe='')}")
    else:
        cluster = local_cluster(data_dir)
        doc = admin.lock_json(admin.remove_lock(cluster, lock_id), datetime.now(UTC))
    click.echo(f"Lock {doc['id']} on {_describe_target(doc)} removed.")


def _describe_target(doc: dict[str, Any]) -> str:
    """``Lock.describe_target`` of a lock's JSON."""
    from tbot_py.authservice.locks import describe_target

    return describe_target(doc["target_kind"], doc["target"])


def _lock_expiry(doc: dict[str, Any]) -> str:
    if doc["expires"] is None:
        return "never"
    return str(doc["expires"]) + (" (expired)" if doc["expired"] else "")
