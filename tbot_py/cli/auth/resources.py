"""``tbot-py auth create``, ``get`` and ``rm``: role resources, tctl-style (``role/NAME``)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import click

from tbot_py.cli.auth._common import (
    admin_target_option,
    local_cluster,
    print_json,
    print_table,
    remote_admin,
    user_errors,
)


@click.command(name="create")
@click.option(
    "-f",
    "--filename",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The role YAML file (kind: role).",
)
@click.option("--force", is_flag=True, help="Replace the role if it exists.")
@admin_target_option
@user_errors
def create(filename: Path, force: bool, data_dir: Path | None) -> None:
    """Create a role from a YAML file, or replace one with --force."""
    from tbot_py.authservice import admin

    role = admin.read_role_file(filename)  # before opening: a bad file changes nothing
    remote = remote_admin()
    if remote is not None:
        # The server parses it again; the text sent is what passed the check above.
        doc = remote.call("POST", "roles", {"yaml": role.to_yaml(), "force": force})
        replaced = bool(doc["replaced"])
    else:
        cluster = local_cluster(data_dir)
        replaced = admin.create_role(cluster, role, force=force)
    click.echo(f'role "{role.name}" has been {"updated" if replaced else "created"}')


@click.command(name="get")
@click.argument("resource")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "yaml", "json"]),
    default="text",
    help="text: YAML for role/NAME, a table for roles.",
)
@admin_target_option
@user_errors
def get(resource: str, output_format: str, data_dir: Path | None) -> None:
    """Show role/NAME as YAML, or list every role (RESOURCE: roles)."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.roles import role_from_data
    from tbot_py.config.duration import format_duration

    _, name = admin.parse_resource_ref(resource)
    remote = remote_admin()
    if name is not None:
        if remote is not None:
            doc = remote.call("GET", f"roles/{quote(name, safe='')}")
            role_json, role_yaml = doc["role"], str(doc["yaml"])
        else:
            cluster = local_cluster(data_dir)
            role = admin.get_role(cluster, name)
            role_json, role_yaml = role.to_json(), role.to_yaml()
        if output_format == "json":
            print_json(role_json)
        else:
            click.echo(role_yaml, nl=False)
        return
    if remote is not None:
        roles = [role_from_data(doc) for doc in remote.call("GET", "roles")]
    else:
        roles = admin.list_roles(local_cluster(data_dir))
    if output_format == "json":
        print_json([role.to_json() for role in roles])
    elif output_format == "yaml":
        click.echo("---\n".join(role.to_yaml() for role in roles), nl=False)
    elif not roles:
        click.echo("No roles.")
    else:
        print_table(
            ("NAME", "MAX SESSION TTL", "LOGINS", "DESCRIPTION"),
            [
                (
                    role.name,
                    format_duration(role.max_session_ttl),
                    ",".join(role.spec.allow.logins) or "-",
                    role.metadata.description or "-",
                )
                for role in roles
            ],
        )


@click.command(name="rm")
@click.argument("resource")
@admin_target_option
@user_errors
def rm(resource: str, data_dir: Path | None) -> None:
    """Delete role/NAME; refused while a bot uses it."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.errors import BadParameter

    _, name = admin.parse_resource_ref(resource)
    if name is None:
        raise BadParameter("name the role to remove: role/NAME")
    remote = remote_admin()
    if remote is not None:
        remote.call("DELETE", f"roles/{quote(name, safe='')}")
    else:
        admin.delete_role(local_cluster(data_dir), name)
    click.echo(f'role "{name}" has been deleted')
