"""``tbot-py auth tokens``: add, list and remove join tokens, and how a new token is shown.

A token value is printed only by the command that has just created it; the
listing shows a short id derived from its hash, never the token or the hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


@click.group(name="tokens")
def tokens() -> None:
    """Manage join tokens."""


@tokens.command(name="add")
@click.option("--bot", "bot_name", required=True, help="The existing bot the token joins as.")
@click.option("--ttl", default="1h", show_default=True, help="Token lifetime (Go duration).")
@format_option
@admin_target_option
@user_errors
def tokens_add(bot_name: str, ttl: str, output_format: str, data_dir: Path | None) -> None:
    """Create a single-use join token for an existing bot."""
    issue_token(bot_name, ttl, output_format, data_dir)


@tokens.command(name="ls")
@format_option
@admin_target_option
@user_errors
def tokens_ls(output_format: str, data_dir: Path | None) -> None:
    """List join tokens by a short id, never the token or its hash.

    In text, the OIDC token resources (``auth get tokens``) are named after the table.
    """
    from tbot_py.authservice.resource_kinds import JOIN_TOKEN

    text = output_format != "json"
    oidc: list[str] = []
    remote = remote_admin()
    if remote is not None:
        docs = remote.call("GET", "tokens")
        if text:
            oidc = [str(d["metadata"]["name"]) for d in remote.call("GET", JOIN_TOKEN.api_path)]
    else:
        from datetime import UTC, datetime

        from tbot_py.authservice import admin

        cluster = local_cluster(data_dir)
        now = datetime.now(UTC)
        docs = [admin.token_json(r, now) for r in admin.list_tokens(cluster)]
        if text:
            oidc = [t.name for t in admin.list_resources(cluster, JOIN_TOKEN)]
    if not text:
        print_json(docs)
        return
    if not docs:
        click.echo("No join tokens.")
    else:
        print_table(
            ("ID", "BOT", "JOIN METHOD", "EXPIRES"),
            [
                (
                    d["id"],
                    d["bot_name"],
                    d["join_method"],
                    d["expires"] + (" (expired)" if d["expired"] else ""),
                )
                for d in docs
            ],
        )
    if oidc:
        click.echo(f"OIDC join token resources (tbot-py auth get tokens): {', '.join(oidc)}")


@tokens.command(name="rm")
@click.argument("token_id", metavar="ID")
@admin_target_option
@user_errors
def tokens_rm(token_id: str, data_dir: Path | None) -> None:
    """Remove the join token whose ID (from tokens ls) starts with ID."""
    from tbot_py.authservice import admin

    remote = remote_admin()
    if remote is not None:
        doc = remote.call("DELETE", f"tokens/{admin.normalize_token_id(token_id)}")
    else:
        cluster = local_cluster(data_dir)
        doc = admin.removed_token_json(admin.remove_token(cluster, token_id))
    click.echo(f'Token {doc["id"]} of bot "{doc["bot_name"]}" removed.')


def issue_token(bot_name: str, ttl: str, output_format: str, data_dir: Path | None) -> None:
    """Issue and print a join token for an existing bot (tokens add, bots instances add)."""
    from tbot_py.authservice import admin

    token_ttl = admin.parse_go_duration(ttl)
    remote = remote_admin()
    if remote is not None:
        admin.validate_bot_name(bot_name)
        doc = remote.call("POST", "tokens", {"bot": bot_name, "ttl": ttl})
        pin = remote.ca_pin
    else:
        cluster = local_cluster(data_dir)
        doc = admin.add_token(cluster, bot_name, ttl=token_ttl).to_json()
        pin = cluster.ca_pin
    if output_format == "json":
        print_json(doc)
        return
    print_token_text(doc, pin)


def print_token_text(issued: dict[str, Any], pin: str) -> None:
    """tctl-style token output of an issued token's JSON; the hint reads it from a file."""
    click.echo(f"The bot token: {issued['token']}")
    click.echo(f"This token will expire at {issued['token_expires']} and can be used once.")
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
