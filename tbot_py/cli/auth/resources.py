"""``tbot-py auth create``, ``get`` and ``rm``: resources, tctl-style (``role/NAME``).

Kinds: ``role`` (``role/NAME``, ``roles``), and the stored kinds of
:mod:`tbot_py.authservice.resource_kinds`: ``workload_identity`` (``workload_identities``),
``token``, the OIDC join tokens (``tokens``), ``app`` (``apps``) and ``db`` (``dbs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
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

if TYPE_CHECKING:
    from tbot_py.authservice.resource_kinds import Resource, ResourceKind


@click.command(name="create")
@click.option(
    "-f",
    "--filename",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The resource YAML file (kind: role, workload_identity, token, app or db).",
)
@click.option("--force", is_flag=True, help="Replace the resource if it exists.")
@admin_target_option
@user_errors
def create(filename: Path, force: bool, data_dir: Path | None) -> None:
    """Create a role, workload identity, join token, app or db from YAML (--force replaces)."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.roles import Role

    resource = admin.read_resource_file(filename)  # before opening: a bad file changes nothing
    if not isinstance(resource, Role):
        _create_resource(resource, force, data_dir)
        return
    role = resource
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
    help="text: YAML for KIND/NAME, a table for a list.",
)
@admin_target_option
@user_errors
def get(resource: str, output_format: str, data_dir: Path | None) -> None:
    """Show KIND/NAME as YAML, or list a kind: roles, workload_identities, tokens, apps, dbs."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.resource_kinds import KINDS
    from tbot_py.authservice.roles import role_from_data
    from tbot_py.config.duration import format_duration

    kind, name = admin.parse_resource_ref(resource)
    if kind in KINDS:
        _get_resources(KINDS[kind], name, output_format, data_dir)
        return
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
    """Delete KIND/NAME: a role (not while a bot uses it), workload_identity, token, app or db."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.errors import BadParameter
    from tbot_py.authservice.resource_kinds import KINDS

    kind, name = admin.parse_resource_ref(resource)
    if name is None:
        title = KINDS[kind].title if kind in KINDS else kind
        raise BadParameter(f"name the {title} to remove: {kind}/NAME")
    remote = remote_admin()
    if kind in KINDS:
        stored = KINDS[kind]
        if remote is not None:
            remote.call("DELETE", f"{stored.api_path}/{quote(name, safe='')}")
        else:
            admin.delete_resource(local_cluster(data_dir), stored, name)
        click.echo(f'{stored.title} "{name}" has been deleted')
        return
    if remote is not None:
        remote.call("DELETE", f"roles/{quote(name, safe='')}")
    else:
        admin.delete_role(local_cluster(data_dir), name)
    click.echo(f'role "{name}" has been deleted')


def _create_resource(resource: Resource, force: bool, data_dir: Path | None) -> None:
    from tbot_py.authservice import admin

    kind = admin.kind_of(resource)
    remote = remote_admin()
    if remote is not None:
        body = {"yaml": resource.to_yaml(), "force": force}
        replaced = bool(remote.call("POST", kind.api_path, body)["replaced"])
    else:
        replaced = admin.create_resource(local_cluster(data_dir), resource, force=force)
    click.echo(f'{kind.title} "{resource.name}" has been {"updated" if replaced else "created"}')


def _get_resources(
    kind: ResourceKind[Any], name: str | None, output_format: str, data_dir: Path | None
) -> None:
    from tbot_py.authservice import admin

    remote = remote_admin()
    if name is not None:
        if remote is not None:
            doc = remote.call("GET", f"{kind.api_path}/{quote(name, safe='')}")
            found = kind.from_data(doc[kind.kind])
        else:
            found = admin.get_resource(local_cluster(data_dir), kind, name)
        if output_format == "json":
            print_json(found.to_json())
        else:
            click.echo(found.to_yaml(), nl=False)
        return
    if remote is not None:
        resources = [kind.from_data(doc) for doc in remote.call("GET", kind.api_path)]
    else:
        resources = admin.list_resources(local_cluster(data_dir), kind)
    if output_format == "json":
        print_json([resource.to_json() for resource in resources])
    elif output_format == "yaml":
        click.echo("---\n".join(resource.to_yaml() for resource in resources), nl=False)
    elif not resources:
        click.echo(f"No {kind.plural.replace('_', ' ')}.")
    else:
        print_table(kind.columns, [kind.row(resource) for resource in resources])
