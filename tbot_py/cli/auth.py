"""``tbot-py auth ...``: run the auth service and administer its roles, bots, tokens and locks.

The admin commands work on the data directory directly; the server need not
run. Every user error is one ``ERROR: ...`` line on stderr with exit code 1.
The only secret ever printed is a join token the command has just created.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

if TYPE_CHECKING:
    from datetime import datetime

    from tbot_py.authservice.admin import IssuedToken
    from tbot_py.authservice.locks import Lock

P = ParamSpec("P")
R = TypeVar("R")

_FORMAT = click.Choice(["text", "json"])


class _UserError(click.ClickException):
    """One ``ERROR: <message>`` line on stderr, exit code 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"ERROR: {self.format_message()}", err=True)


def _user_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can cause into one line instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import sqlite3

        from tbot_py.authservice.errors import AuthServiceError
        from tbot_py.errors import Error

        try:
            return func(*args, **kwargs)
        except (AuthServiceError, Error) as exc:
            raise _UserError(str(exc)) from None
        except sqlite3.Error as exc:
            # e.g. "database is locked" after the busy timeout, or a damaged file.
            raise _UserError(f"state database: {exc}") from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise _UserError(f"{where}{exc.strerror or exc}") from None

    return wrapper


def _data_dir_option(func: Callable[P, R]) -> Callable[P, R]:
    return click.option(
        "--data-dir",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory holding the cluster's CA keys and state (created 0700 on first use).",
    )(func)


def _format_option(func: Callable[P, R]) -> Callable[P, R]:
    return click.option("--format", "output_format", type=_FORMAT, default="text")(func)


def _print_json(doc: object) -> None:
    click.echo(json.dumps(doc))


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, two spaces apart."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _when(t: datetime) -> str:
    from tbot_py.client.wire import format_time

    return format_time(t.replace(microsecond=0))


@click.group(name="auth")
def auth() -> None:
    """Run the cluster-side auth service and manage its roles, bots and join tokens."""


@auth.command(name="start")
@_data_dir_option
@click.option("--listen", default="127.0.0.1:3025", show_default=True, help="HOST:PORT; 0 = any.")
@click.option("--cluster-name", default=None, help="Name of a new cluster [tbot-py.local].")
@click.option(
    "--public-addr",
    "public_addrs",
    multiple=True,
    help="HOST:PORT clients use to reach this service; repeatable.",
)
@click.option(
    "--join-rate",
    default="10/m",
    show_default=True,
    help="Join attempts allowed per source address, as COUNT/UNIT (UNIT s, m or h); "
    "COUNT is also the burst.",
)
@_user_errors
def start(
    data_dir: Path,
    listen: str,
    cluster_name: str | None,
    public_addrs: tuple[str, ...],
    join_rate: str,
) -> None:
    """Serve the auth API over HTTPS until SIGTERM or SIGINT.

    When ready, prints one JSON line: {"addr": "HOST:PORT", "ca_pin": "sha256:..."}.
    """
    from tbot_py.authservice.ratelimit import parse_rate
    from tbot_py.authservice.server import serve

    rate = parse_rate(join_rate)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    serve(data_dir, listen, cluster_name=cluster_name, public_addrs=public_addrs, join_rate=rate)


@auth.command(name="ca-pin")
@_data_dir_option
@_user_errors
def ca_pin(data_dir: Path) -> None:
    """Print the CA pin clients pass as --ca-pin."""
    from tbot_py.authservice.cluster import read_ca_pin

    click.echo(read_ca_pin(data_dir))


@auth.command(name="audit")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they are written.")
@click.option("--since", default=None, help="Only events from this long ago on (e.g. 1h, 30m).")
@_format_option
@_data_dir_option
@_user_errors
def audit_log(follow: bool, since: str | None, output_format: str, data_dir: Path) -> None:
    """Print the audit log: one event per line, as text or as the stored JSON."""
    import time
    from datetime import UTC, datetime

    from tbot_py.authservice import admin, audit
    from tbot_py.authservice.errors import BadParameter, ClusterNotInitialized

    try:
        cutoff = datetime.now(UTC) - admin.parse_go_duration(since) if since else None
    except BadParameter as exc:
        raise BadParameter(f"--since: {exc.message}") from None
    if not data_dir.is_dir():
        raise ClusterNotInitialized(f"no cluster in {data_dir}; check --data-dir")
    reader = audit.AuditReader(audit.audit_log_path(data_dir))
    try:
        while True:
            for number, doc in reader.read_events(since=cutoff):
                if doc is None:
                    where = f"{reader.path}:{number}"
                    click.echo(f"WARNING: {where}: not an audit event; skipped", err=True)
                elif output_format == "json":
                    click.echo(json.dumps(doc))
                else:
                    click.echo(audit.format_text(doc))
            if not follow:
                return
            time.sleep(audit.FOLLOW_POLL_S)
    except KeyboardInterrupt:  # the normal end of --follow
        return


@auth.group(name="bots")
def bots() -> None:
    """Manage bots."""


@bots.command(name="add")
@click.argument("name")
@click.option("--roles", required=True, help="Comma-separated roles the bot may use.")
@click.option("--logins", default="", help="Comma-separated SSH logins.")
@click.option("--ttl", default="1h", show_default=True, help="Join token lifetime (Go duration).")
@_format_option
@_data_dir_option
@_user_errors
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
    cluster = open_cluster(data_dir)
    created = admin.add_bot(cluster, name, roles=role_list, logins=login_list, token_ttl=token_ttl)
    if output_format == "json":
        _print_json(created.to_json())
        return
    click.echo(f'Bot "{name}" created with roles: {", ".join(created.bot.roles)}')
    click.echo(f"SSH logins: {', '.join(created.bot.logins) or '(none)'}")
    _print_token_text(created.token, cluster.ca_pin)


@bots.command(name="ls")
@_format_option
@_data_dir_option
@_user_errors
def bots_ls(output_format: str, data_dir: Path) -> None:
    """List bots with their roles, logins and number of joined instances."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    summaries = admin.list_bots(open_cluster(data_dir))
    if output_format == "json":
        _print_json(
            [
                {
                    "bot_name": s.bot.name,
                    "roles": list(s.bot.roles),
                    "logins": list(s.bot.logins),
                    "instances": s.instance_count,
                    "created": _when(s.bot.created_at),
                }
                for s in summaries
            ]
        )
        return
    if not summaries:
        click.echo("No bots.")
        return
    _print_table(
        ("NAME", "ROLES", "LOGINS", "INSTANCES", "CREATED"),
        [
            (
                s.bot.name,
                ",".join(s.bot.roles),
                ",".join(s.bot.logins) or "-",
                str(s.instance_count),
                _when(s.bot.created_at),
            )
            for s in summaries
        ],
    )


@bots.command(name="rm")
@click.argument("name")
@_data_dir_option
@_user_errors
def bots_rm(name: str, data_dir: Path) -> None:
    """Remove bot NAME with its join tokens and instances."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    admin.remove_bot(open_cluster(data_dir), name)
    click.echo(f'Bot "{name}" removed.')


@bots.command(name="update")
@click.argument("name")
@click.option("--add-roles", default="", help="Comma-separated existing roles to add.")
@click.option("--remove-roles", default="", help="Comma-separated roles to take away.")
@_format_option
@_data_dir_option
@_user_errors
def bots_update(
    name: str, add_roles: str, remove_roles: str, output_format: str, data_dir: Path
) -> None:
    """Change the roles of bot NAME; it keeps at least one."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    add = admin.parse_name_list(add_roles, "role")
    remove = admin.parse_name_list(remove_roles, "role")
    bot = admin.update_bot_roles(open_cluster(data_dir), name, add=add, remove=remove)
    if output_format == "json":
        _print_json({"bot_name": bot.name, "roles": list(bot.roles), "logins": list(bot.logins)})
        return
    click.echo(f'Bot "{name}" updated; roles: {", ".join(bot.roles)}')
    click.echo("Running instances get certificates with the new roles at their next renewal.")


@bots.group(name="instances")
def bots_instances() -> None:
    """Manage the joined instances of a bot."""


@bots_instances.command(name="ls")
@click.argument("name")
@_format_option
@_data_dir_option
@_user_errors
def instances_ls(name: str, output_format: str, data_dir: Path) -> None:
    """List the instances that joined as bot NAME."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    instances = admin.list_instances(open_cluster(data_dir), name)
    if output_format == "json":
        _print_json(
            [
                {
                    "instance_id": i.id,
                    "bot_name": i.bot_name,
                    "generation": i.generation,
                    "created": _when(i.created_at),
                    "last_seen": _when(i.last_seen_at),
                }
                for i in instances
            ]
        )
        return
    if not instances:
        click.echo(f'No instances of bot "{name}".')
        return
    _print_table(
        ("ID", "GENERATION", "CREATED", "LAST SEEN"),
        [(i.id, str(i.generation), _when(i.created_at), _when(i.last_seen_at)) for i in instances],
    )


@bots_instances.command(name="add")
@click.argument("name")
@click.option("--ttl", default="1h", show_default=True, help="Token lifetime (Go duration).")
@_format_option
@_data_dir_option
@_user_errors
def instances_add(name: str, ttl: str, output_format: str, data_dir: Path) -> None:
    """Create a join token for a new instance of the existing bot NAME."""
    _add_token(name, ttl, output_format, data_dir)


@auth.group(name="tokens")
def tokens() -> None:
    """Manage join tokens."""


@tokens.command(name="add")
@click.option("--bot", "bot_name", required=True, help="The existing bot the token joins as.")
@click.option("--ttl", default="1h", show_default=True, help="Token lifetime (Go duration).")
@_format_option
@_data_dir_option
@_user_errors
def tokens_add(bot_name: str, ttl: str, output_format: str, data_dir: Path) -> None:
    """Create a single-use join token for an existing bot."""
    _add_token(bot_name, ttl, output_format, data_dir)


@tokens.command(name="ls")
@_format_option
@_data_dir_option
@_user_errors
def tokens_ls(output_format: str, data_dir: Path) -> None:
    """List join tokens by a short id, never the token or its hash."""
    from datetime import UTC, datetime

    from tbot_py.authservice import admin, audit
    from tbot_py.authservice.cluster import open_cluster

    records = admin.list_tokens(open_cluster(data_dir))
    now = datetime.now(UTC)
    if output_format == "json":
        _print_json(
            [
                {
                    "id": audit.token_id(r.token_hash),
                    "bot_name": r.bot_name,
                    "join_method": r.join_method,
                    "expires": _when(r.expires_at),
                    "expired": r.expires_at <= now,
                }
                for r in records
            ]
        )
        return
    if not records:
        click.echo("No join tokens.")
        return
    _print_table(
        ("ID", "BOT", "JOIN METHOD", "EXPIRES"),
        [
            (
                audit.token_id(r.token_hash),
                r.bot_name,
                r.join_method,
                _when(r.expires_at) + (" (expired)" if r.expires_at <= now else ""),
            )
            for r in records
        ],
    )


@tokens.command(name="rm")
@click.argument("token_id", metavar="ID")
@_data_dir_option
@_user_errors
def tokens_rm(token_id: str, data_dir: Path) -> None:
    """Remove the join token whose ID (from tokens ls) starts with ID."""
    from tbot_py.authservice import admin, audit
    from tbot_py.authservice.cluster import open_cluster

    removed = admin.remove_token(open_cluster(data_dir), token_id)
    click.echo(f'Token {audit.token_id(removed.token_hash)} of bot "{removed.bot_name}" removed.')


def _add_token(bot_name: str, ttl: str, output_format: str, data_dir: Path) -> None:
    """Issue and print a join token for an existing bot (tokens add, bots instances add)."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    token_ttl = admin.parse_go_duration(ttl)
    cluster = open_cluster(data_dir)
    issued = admin.add_token(cluster, bot_name, ttl=token_ttl)
    if output_format == "json":
        _print_json(issued.to_json())
        return
    _print_token_text(issued, cluster.ca_pin)


@auth.group(name="locks")
def locks_group() -> None:
    """Manage locks: a locked bot or bot instance is refused every call, a locked bot every join."""


@locks_group.command(name="ls")
@_format_option
@_data_dir_option
@_user_errors
def locks_ls(output_format: str, data_dir: Path) -> None:
    """List locks, expired ones included, oldest first."""
    from datetime import UTC, datetime

    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    records = admin.list_locks(open_cluster(data_dir))
    now = datetime.now(UTC)
    if output_format == "json":
        _print_json([_lock_json(lock, now) for lock in records])
        return
    if not records:
        click.echo("No locks.")
        return
    _print_table(
        ("ID", "KIND", "TARGET", "CREATED BY", "CREATED", "EXPIRES", "MESSAGE"),
        [
            (
                lock.id,
                lock.target_kind,
                lock.target,
                lock.created_by,
                _when(lock.created_at),
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
@_format_option
@_data_dir_option
@_user_errors
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
        open_cluster(data_dir), bot=bot_name, instance=instance, message=message, ttl=lock_ttl
    )
    if output_format == "json":
        _print_json(_lock_json(lock, datetime.now(UTC)))
        return
    click.echo(f"Lock {lock.id} created on {lock.describe_target()}: {lock.message}")
    until = "removed" if lock.expires_at is None else f"it expires at {_when(lock.expires_at)}"
    click.echo(f"It holds until {until}; remove it with tbot-py auth locks rm {lock.id}")


@locks_group.command(name="rm")
@click.argument("lock_id", metavar="ID")
@_data_dir_option
@_user_errors
def locks_rm(lock_id: str, data_dir: Path) -> None:
    """Remove the lock ID (from locks ls)."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    removed = admin.remove_lock(open_cluster(data_dir), lock_id)
    click.echo(f"Lock {removed.id} on {removed.describe_target()} removed.")


def _lock_json(lock: Lock, now: datetime) -> dict[str, object]:
    """A lock in ``locks ls`` and ``locks add`` JSON."""
    return {
        "id": lock.id,
        "target_kind": lock.target_kind,
        "target": lock.target,
        "message": lock.message,
        "created_by": lock.created_by,
        "created": _when(lock.created_at),
        "expires": None if lock.expires_at is None else _when(lock.expires_at),
        "expired": not lock.in_force(now),
    }


def _lock_expiry(lock: Lock, now: datetime) -> str:
    if lock.expires_at is None:
        return "never"
    return _when(lock.expires_at) + ("" if lock.in_force(now) else " (expired)")


@auth.command(name="create")
@click.option(
    "-f",
    "--filename",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The role YAML file (kind: role).",
)
@click.option("--force", is_flag=True, help="Replace the role if it exists.")
@_data_dir_option
@_user_errors
def create(filename: Path, force: bool, data_dir: Path) -> None:
    """Create a role from a YAML file, or replace one with --force."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    role = admin.read_role_file(filename)  # before opening: a bad file changes nothing
    replaced = admin.create_role(open_cluster(data_dir), role, force=force)
    click.echo(f'role "{role.name}" has been {"updated" if replaced else "created"}')


@auth.command(name="get")
@click.argument("resource")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "yaml", "json"]),
    default="text",
    help="text: YAML for role/NAME, a table for roles.",
)
@_data_dir_option
@_user_errors
def get(resource: str, output_format: str, data_dir: Path) -> None:
    """Show role/NAME as YAML, or list every role (RESOURCE: roles)."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster
    from tbot_py.config.duration import format_duration

    _, name = admin.parse_resource_ref(resource)
    cluster = open_cluster(data_dir)
    if name is not None:
        role = admin.get_role(cluster, name)
        if output_format == "json":
            _print_json(role.to_json())
        else:
            click.echo(role.to_yaml(), nl=False)
        return
    roles = admin.list_roles(cluster)
    if output_format == "json":
        _print_json([role.to_json() for role in roles])
    elif output_format == "yaml":
        click.echo("---\n".join(role.to_yaml() for role in roles), nl=False)
    elif not roles:
        click.echo("No roles.")
    else:
        _print_table(
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


@auth.command(name="rm")
@click.argument("resource")
@_data_dir_option
@_user_errors
def rm(resource: str, data_dir: Path) -> None:
    """Delete role/NAME; refused while a bot uses it."""
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster
    from tbot_py.authservice.errors import BadParameter

    _, name = admin.parse_resource_ref(resource)
    if name is None:
        raise BadParameter("name the role to remove: role/NAME")
    admin.delete_role(open_cluster(data_dir), name)
    click.echo(f'role "{name}" has been deleted')


def _print_token_text(issued: IssuedToken, pin: str) -> None:
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
