"""``tbot-py auth bots``: add, list, update and remove bots, and list or add their instances.

``bots add`` prints the new bot's first join token, the only secret it shows.
"""

from __future__ import annotations

from pathlib import Path

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
from tbot_py.cli.auth.tokens import issue_token, print_token_text


@click.group(name="bots")
def bots() -> None:
    """Manage bots."""


@bots.command(name="add")
@click.argument("name")
@click.option("--roles", required=True, help="Comma-separated roles the bot may use.")
@click.option("--logins", default="", help="Comma-separated SSH logins.")
@click.option("--ttl", default="1h", show_default=True, help="Join token lifetime (Go duration).")
@format_option
@data_dir_option
@user_errors
def bots_add(
    *, name: str, roles: str, logins: str, ttl: str, output_format: str, data_dir: Path
) -> None:
    """Create bot NAME and a single-use join token for it."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    role_list = admin.parse_name_list(roles, "role")
    login_list = admin.parse_name_list(logins, "login")
    token_ttl = admin.parse_go_duration(ttl)
    admin.validate_bot_name(name)
    cluster = open_cluster(data_dir, storage=storage_url())
    created = admin.add_bot(cluster, name, roles=role_list, logins=login_list, token_ttl=token_ttl)
    if output_format == "json":
        print_json(created.to_json())
        return
    click.echo(f'Bot "{name}" created with roles: {", ".join(created.bot.roles)}')
    click.echo(f"SSH logins: {', '.join(created.bot.logins) or '(none)'}")
    print_token_text(created.token, cluster.ca_pin)


@bots.command(name="ls")
@format_option
@data_dir_option
@user_errors
def bots_ls(output_format: str, data_dir: Path) -> None:
    """List bots with their roles, logins and number of joined instances."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    summaries = admin.list_bots(open_cluster(data_dir, storage=storage_url()))
    if output_format == "json":
        print_json(
            [
                {
                    "bot_name": s.bot.name,
                    "roles": list(s.bot.roles),
                    "logins": list(s.bot.logins),
                    "instances": s.instance_count,
                    "created": when(s.bot.created_at),
                }
                for s in summaries
            ]
        )
        return
    if not summaries:
        click.echo("No bots.")
        return
    print_table(
        ("NAME", "ROLES", "LOGINS", "INSTANCES", "CREATED"),
        [
            (
                s.bot.name,
                ",".join(s.bot.roles),
                ",".join(s.bot.logins) or "-",
                str(s.instance_count),
                when(s.bot.created_at),
            )
            for s in summaries
        ],
    )


@bots.command(name="rm")
@click.argument("name")
@data_dir_option
@user_errors
def bots_rm(name: str, data_dir: Path) -> None:
    """Remove bot NAME with its join tokens and instances."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    admin.remove_bot(open_cluster(data_dir, storage=storage_url()), name)
    click.echo(f'Bot "{name}" removed.')


@bots.command(name="update")
@click.argument("name")
@click.option("--add-roles", default="", help="Comma-separated existing roles to add.")
@click.option("--remove-roles", default="", help="Comma-separated roles to take away.")
@format_option
@data_dir_option
@user_errors
def bots_update(
    name: str, add_roles: str, remove_roles: str, output_format: str, data_dir: Path
) -> None:
    """Change the roles of bot NAME; it keeps at least one."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    add = admin.parse_name_list(add_roles, "role")
    remove = admin.parse_name_list(remove_roles, "role")
    bot = admin.update_bot_roles(
        open_cluster(data_dir, storage=storage_url()), name, add=add, remove=remove
    )
    if output_format == "json":
        print_json({"bot_name": bot.name, "roles": list(bot.roles), "logins": list(bot.logins)})
        return
    click.echo(f'Bot "{name}" updated; roles: {", ".join(bot.roles)}')
    click.echo("Running instances get certificates with the new roles at their next renewal.")


@bots.group(name="instances")
def bots_instances() -> None:
    """Manage the joined instances of a bot."""


@bots_instances.command(name="ls")
@click.argument("name")
@format_option
@data_dir_option
@user_errors
def instances_ls(name: str, output_format: str, data_dir: Path) -> None:
    """List the instances that joined as bot NAME."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    instances = admin.list_instances(open_cluster(data_dir, storage=storage_url()), name)
    if output_format == "json":
        print_json(
            [
                {
                    "instance_id": i.id,
                    "bot_name": i.bot_name,
                    "generation": i.generation,
                    "created": when(i.created_at),
                    "last_seen": when(i.last_seen_at),
                }
                for i in instances
            ]
        )
        return
    if not instances:
        click.echo(f'No instances of bot "{name}".')
        return
    print_table(
        ("ID", "GENERATION", "CREATED", "LAST SEEN"),
        [(i.id, str(i.generation), when(i.created_at), when(i.last_seen_at)) for i in instances],
    )


@bots_instances.command(name="add")
@click.argument("name")
@click.option("--ttl", default="1h", show_default=True, help="Token lifetime (Go duration).")
@format_option
@data_dir_option
@user_errors
def instances_add(name: str, ttl: str, output_format: str, data_dir: Path) -> None:
    """Create a join token for a new instance of the existing bot NAME."""
    issue_token(name, ttl, output_format, data_dir)
