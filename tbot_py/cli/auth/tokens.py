"""``tbot-py auth tokens``: add, list and remove join tokens, and how a new token is shown.

A token value is printed only by the command that has just created it; the
listing shows a short id derived from its hash, never the token or the hash.
"""

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
    from tbot_py.authservice.admin import IssuedToken


@click.group(name="tokens")
def tokens() -> None:
    """Manage join tokens."""


@tokens.command(name="add")
@click.option("--bot", "bot_name", required=True, help="The existing bot the token joins as.")
@click.option("--ttl", default="1h", show_default=True, help="Token lifetime (Go duration).")
@format_option
@data_dir_option
@user_errors
def tokens_add(bot_name: str, ttl: str, output_format: str, data_dir: Path) -> None:
    """Create a single-use join token for an existing bot."""
    issue_token(bot_name, ttl, output_format, data_dir)


@tokens.command(name="ls")
@format_option
@data_dir_option
@user_errors
def tokens_ls(output_format: str, data_dir: Path) -> None:
    """List join tokens by a short id, never the token or its hash."""
    from datetime import UTC, datetime

    from tbot_py.authservice import admin, audit
    from tbot_py.authservice.cluster import open_cluster

    records = admin.list_tokens(open_cluster(data_dir, storage=storage_url()))
    now = datetime.now(UTC)
    if output_format == "json":
        print_json(
            [
                {
                    "id": audit.token_id(r.token_hash),
                    "bot_name": r.bot_name,
                    "join_method": r.join_method,
                    "expires": when(r.expires_at),
                    "expired": r.expires_at <= now,
                }
                for r in records
            ]
        )
        return
    if not records:
        click.echo("No join tokens.")
        return
    print_table(
        ("ID", "BOT", "JOIN METHOD", "EXPIRES"),
        [
            (
                audit.token_id(r.token_hash),
                r.bot_name,
                r.join_method,
                when(r.expires_at) + (" (expired)" if r.expires_at <= now else ""),
            )
            for r in records
        ],
    )


@tokens.command(name="rm")
@click.argument("token_id", metavar="ID")
@data_dir_option
@user_errors
def tokens_rm(token_id: str, data_dir: Path) -> None:
    """Remove the join token whose ID (from tokens ls) starts with ID."""
    from tbot_py.authservice import admin, audit
    from tbot_py.authservice.cluster import open_cluster

    removed = admin.remove_token(open_cluster(data_dir, storage=storage_url()), token_id)
    click.echo(f'Token {audit.token_id(removed.token_hash)} of bot "{removed.bot_name}" removed.')


def issue_token(bot_name: str, ttl: str, output_format: str, data_dir: Path) -> None:
    """Issue and print a join token for an existing bot (tokens add, bots instances add)."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    token_ttl = admin.parse_go_duration(ttl)
    cluster = open_cluster(data_dir, storage=storage_url())
    issued = admin.add_token(cluster, bot_name, ttl=token_ttl)
    if output_format == "json":
        print_json(issued.to_json())
        return
    print_token_text(issued, cluster.ca_pin)


def print_token_text(issued: IssuedToken, pin: str) -> None:
    """tctl-style token output; the hint reads the token from a file, never from argv."""
    from tbot_py.client.wire import format_time

    click.echo(f"The bot token: {issued.token}")
    click.echo(f"This token will expire at {format_time(issued.expires)} and can be used once.")
    click.echo("")
    click.echo("Save the token to a file only the bot's user can read, e.g. /etc/tbot-py/token")
    click.echo("(mode 0600; the path must be absolute), then run on the bot's machine:")
    click.echo("")
    click.echo(
        f"  tbot-py start identity --proxy-server=<auth-addr> --token=/etc/tbot-py/token "
        f"--ca-pin={pin} --destination=./tbot-user"
    )
    click.echo("")
    click.echo("<auth-addr> is the address 'tbot-py auth start' printed.")
