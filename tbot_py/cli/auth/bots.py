"""``tbot-py auth bots``: add, list, update and remove bots, and list or add their instances.

``bots add`` prints the new bot's first join token, the only secret it shows.
"""

from __future__ import annotations

from pathlib import Path

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
@admin_target_option
@user_errors
def bots_add(
    *, name: str, roles: str, logins: str, ttl: str, output_format: str, data_dir: Path | None
) -> None:
    """Create bot NAME and a single-use join token for it."""
    from tbot_py.authservice import admin

    role_list = admin.parse_name_list(roles, "role")
    login_list = admin.parse_name_list(logins, "login")
    token_ttl = admin.parse_go_duration(ttl)
    admin.validate_bot_name(name)
    remote = remote_admin()
    if remote is not None:
        body = {"name": name, "roles": list(role_list), "logins": list(login_list), "ttl": ttl}
        doc = remote.call("POST", "bots", body)
        pin = remote.ca_pin
    else:
        cluster = local_cluster(data_dir)
        created = admin.add_bot(
            cluster, name, roles=role_list, logins=login_list, token_ttl=token_ttl
        )
        doc, pin = created.to_json(), cluster.ca_pin
    if output_format == "json":
        print_json(doc)
        return
    click.echo(f'Bot "{name}" created with roles: {", ".join(doc["roles"])}')
    click.echo(f"SSH logins: {', '.join(doc['logins']) or '(none)'}")
    print_token_text(doc, pin)


@bots.command(name="ls")
@format_option
@admin_target_option
@user_errors
def bots_ls(output_format: str, data_dir: Path | None) -> None:
    """List bots with their roles, logins and number of joined instances."""
    from tbot_py.authservice import admin

    remote = remote_admin()
    if remote is not None:
        docs = remote.call("GET", "bots")
    else:
        cluster = local_cluster(data_dir)
        docs = [admin.bot_summary_json(s) for s in admin.list_bots(cluster)]
    if output_format == "json":
        print_json(docs)
        return
    if not docs:
        click.echo("No bots.")
        return
    print_table(
        ("NAME", "ROLES", "LOGINS", "INSTANCES", "CREATED"),
        [
            (
                d["bot_name"],
                ",".join(d["roles"]),
                ",".join(d["logins"]) or "-",
                str(d["instances"]),
                d["created"],
            )
            for d in docs
        ],
    )


@bots.command(name="rm")
@click.argument("name")
@admin_target_option
@user_errors
def bots_rm(name: str, data_dir: Path | None) -> None:
    """Remove bot NAME with its join tokens and instances."""
    from tbot_py.authservice import admin

    remote = remote_admin()
    if remote is not None:
        admin.validate_bot_name(name)
        remote.call("DELETE", f"bots/{name}")
    else:
        admin.remove_bot(local_cluster(data_dir), name)
    click.echo(f'Bot "{name}" removed.')


@bots.command(name="update")
@click.argument("name")
@click.option("--add-roles", default="", help="Comma-separated existing roles to add.")
@click.option("--remove-roles", default="", help="Comma-separated roles to take away.")
@format_option
@admin_target_option
@user_errors
def bots_update(
    name: str, add_roles: str, remove_roles: str, output_format: str, data_dir: Path | None
) -> None:
    """Change the roles of bot NAME; it keeps at least one."""
    from tbot_py.authservice import admin

    add = admin.parse_name_list(add_roles, "role")
    remove = admin.parse_name_list(remove_roles, "role")
    remote = remote_admin()
    if remote is not None:
        admin.validate_bot_name(name)
        body = {"add_roles": list(add), "remove_roles": list(remove)}
        doc = remote.call("PATCH", f"bots/{name}", body)
    else:
        cluster = local_cluster(data_dir)
        doc = admin.bot_json(admin.update_bot_roles(cluster, name, add=add, remove=remove))
    if output_format == "json":
        print_json(doc)
        return
    click.echo(f'Bot "{name}" updated; roles: {", ".join(doc["roles"])}')
    click.echo("Running instances get certificates with the new roles at their next renewal.")


@bots.group(name="instances")
def bots_instances() -> None:
    """Manage the joined instances of a bot."""


@bots_instances.command(name="ls")
@click.argument("name")
@format_option
@admin_target_option
@user_errors
def instances_ls(name: str, output_format: str, data_dir: Path | None) -> None:
    """List the instances that joined as bot NAME."""
    from tbot_py.authservice import admin

    remote = remote_admin()
    if remote is not None:
        admin.validate_bot_name(name)
        docs = remote.call("GET", f"bots/{name}/instances")
    else:
        cluster = local_cluster(data_dir)
        docs = [admin.instance_json(i) for i in admin.list_instances(cluster, name)]
    if output_format == "json":
        print_json(docs)
        return
    if not docs:
        click.echo(f'No instances of bot "{name}".')
        return
    print_table(
        ("ID", "GENERATION", "CREATED", "LAST SEEN"),
        [(d["instance_id"], str(d["generation"]), d["created"], d["last_seen"]) for d in docs],
    )


@bots_instances.command(name="add")
@click.argument("name")
@click.option("--ttl", default="1h", show_default=True, help="Token lifetime (Go duration).")
@format_option
@admin_target_option
@user_errors
def instances_add(name: str, ttl: str, output_format: str, data_dir: Path | None) -> None:
    """Create a join token for a new instance of the existing bot NAME."""
    issue_token(name, ttl, output_format, data_dir)
