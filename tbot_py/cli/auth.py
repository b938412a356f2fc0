"""``tbot-py auth ...``: run the auth service and administer its bots and join tokens.

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
    from tbot_py.authservice.admin import IssuedToken

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


@click.group(name="auth")
def auth() -> None:
    """Run the cluster-side auth service and manage its bots and join tokens."""


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
@_user_errors
def start(
    data_dir: Path, listen: str, cluster_name: str | None, public_addrs: tuple[str, ...]
) -> None:
    """Serve the auth API over HTTPS until SIGTERM or SIGINT.

    When ready, prints one JSON line: {"addr": "HOST:PORT", "ca_pin": "sha256:..."}.
    """
    from tbot_py.authservice.server import serve

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    serve(data_dir, listen, cluster_name=cluster_name, public_addrs=public_addrs)


@auth.command(name="ca-pin")
@_data_dir_option
@_user_errors
def ca_pin(data_dir: Path) -> None:
    """Print the CA pin clients pass as --ca-pin."""
    from tbot_py.authservice.cluster import read_ca_pin

    click.echo(read_ca_pin(data_dir))


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
    from tbot_py.client.wire import format_time

    summaries = admin.list_bots(open_cluster(data_dir))
    if output_format == "json":
        _print_json(
            [
                {
                    "bot_name": s.bot.name,
                    "roles": list(s.bot.roles),
                    "logins": list(s.bot.logins),
                    "instances": s.instance_count,
                    "created": format_time(s.bot.created_at.replace(microsecond=0)),
                }
                for s in summaries
            ]
        )
        return
    if not summaries:
        click.echo("No bots.")
        return
    table = [("NAME", "ROLES", "LOGINS", "INSTANCES", "CREATED")]
    table += [
        (
            s.bot.name,
            ",".join(s.bot.roles),
            ",".join(s.bot.logins) or "-",
            str(s.instance_count),
            format_time(s.bot.created_at.replace(microsecond=0)),
        )
        for s in summaries
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


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
    from tbot_py.authservice import admin
    from tbot_py.authservice.cluster import open_cluster

    token_ttl = admin.parse_go_duration(ttl)
    cluster = open_cluster(data_dir)
    issued = admin.add_token(cluster, bot_name, ttl=token_ttl)
    if output_format == "json":
        _print_json(issued.to_json())
        return
    _print_token_text(issued, cluster.ca_pin)


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
