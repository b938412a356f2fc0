"""What every ``tbot-py auth`` command shares: its options, its output and its error lines.

Every user error is one ``ERROR: ...`` line on stderr with exit code 1
(:func:`user_errors`). Tables are left-aligned columns two spaces apart, and
``--format json`` prints one JSON document.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

if TYPE_CHECKING:
    from datetime import datetime

    from tbot_py.authservice.cluster import Cluster
    from tbot_py.cli.auth.remote import RemoteAdmin

P = ParamSpec("P")
R = TypeVar("R")

_FORMAT = click.Choice(["text", "json"])


class UserError(click.ClickException):
    """One ``ERROR: <message>`` line on stderr, exit code 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"ERROR: {self.format_message()}", err=True)


def user_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can cause into one line instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import sqlite3

        from tbot_py.authservice.errors import AuthServiceError
        from tbot_py.errors import Error

        try:
            return func(*args, **kwargs)
        except (AuthServiceError, Error) as exc:
            raise UserError(str(exc)) from None
        except sqlite3.Error as exc:
            # e.g. "database is locked" after the busy timeout, or a damaged file.
            raise UserError(f"state database: {exc}") from None
        except BrokenPipeError:
            raise  # the reader went away; the CLI entry point exits quietly
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise UserError(f"{where}{exc.strerror or exc}") from None

    return wrapper


_STORAGE_KEY = "tbot_py.auth.storage"


def _remember_storage(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta[_STORAGE_KEY] = value or None


def _storage_option(func: Callable[P, R]) -> Callable[P, R]:
    return click.option(
        "--storage",
        envvar="TBOT_PY_AUTH_STORAGE",
        default=None,
        expose_value=False,
        callback=_remember_storage,
        metavar="postgres://USER@HOST:PORT/DB",
        help="Keep the state and CAs in this PostgreSQL database, shared by replicas "
        "[env TBOT_PY_AUTH_STORAGE; default: SQLite in --data-dir].",
    )(func)


def data_dir_option(func: Callable[P, R]) -> Callable[P, R]:
    """The ``--data-dir`` and ``--storage`` options every command takes.

    ``--storage`` is not passed to the command; read it with :func:`storage_url`.
    """
    func = _storage_option(func)
    return click.option(
        "--data-dir",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory holding the cluster's CA keys and state (created 0700 on first use).",
    )(func)


_AUTH_SERVER_KEY = "tbot_py.auth.auth_server"
_IDENTITY_KEY = "tbot_py.auth.identity"


def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        ctx.meta[key] = value or None

    return callback


def admin_target_option(func: Callable[P, R]) -> Callable[P, R]:
    """Where an admin command acts: ``--data-dir``/``--storage``, or ``--auth-server`` and ``-i``.

    ``data_dir`` is passed (None when not given); the command calls
    :func:`remote_admin` first, then :func:`local_data_dir` when that is None.
    """
    func = click.option(
        "-i",
        "--identity",
        default=None,
        expose_value=False,
        callback=_remember(_IDENTITY_KEY),
        type=click.Path(dir_okay=False, path_type=Path),
        help="Admin identity file (auth start --write-admin-identity); with --auth-server.",
    )(func)
    func = click.option(
        "--auth-server",
        default=None,
        expose_value=False,
        callback=_remember(_AUTH_SERVER_KEY),
        metavar="HOST:PORT",
        help="Act on this running auth service over mTLS instead of --data-dir.",
    )(func)
    func = _storage_option(func)
    return click.option(
        "--data-dir",
        default=None,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory holding the cluster's CA keys and state (created 0700 on first use).",
    )(func)


def remote_admin() -> RemoteAdmin | None:
    """The admin API client when ``--auth-server`` and ``-i`` were given, else None."""
    ctx = click.get_current_context()
    server, identity = ctx.meta.get(_AUTH_SERVER_KEY), ctx.meta.get(_IDENTITY_KEY)
    if server is None and identity is None:
        return None
    if server is None or identity is None:
        raise UserError("--auth-server and -i/--identity go together; give both")
    if ctx.params.get("data_dir") is not None or ctx.meta.get(_STORAGE_KEY):
        raise UserError(
            "--auth-server/-i and --data-dir/--storage are mutually exclusive; give one of them"
        )
    from tbot_py.cli.auth.remote import RemoteAdmin

    return RemoteAdmin.from_file(str(server), Path(identity))


def local_data_dir(data_dir: Path | None) -> Path:
    """``--data-dir`` of a command run locally; one ERROR line when it is missing or remote."""
    ctx = click.get_current_context()
    if ctx.meta.get(_AUTH_SERVER_KEY) is not None or ctx.meta.get(_IDENTITY_KEY) is not None:
        raise UserError(
            f"'{ctx.command_path}' is not supported with --auth-server yet; "
            "run it on the auth service's host with --data-dir"
        )
    if data_dir is None:
        raise UserError("give --data-dir DIR, or --auth-server HOST:PORT -i FILE")
    return data_dir


def local_cluster(data_dir: Path | None) -> Cluster:
    """The cluster of a command run locally: ``--data-dir`` with ``--storage``, opened."""
    from tbot_py.authservice.cluster import open_cluster

    return open_cluster(local_data_dir(data_dir), storage=storage_url())


def storage_url() -> str | None:
    """The ``--storage`` URL of the running command, or None for SQLite in the data directory."""
    value = click.get_current_context().meta.get(_STORAGE_KEY)
    return str(value) if value else None


def format_option(func: Callable[P, R]) -> Callable[P, R]:
    """``--format text|json``, passed as ``output_format``."""
    return click.option("--format", "output_format", type=_FORMAT, default="text")(func)


def print_json(doc: object) -> None:
    """``doc`` as one line of JSON on stdout."""
    click.echo(json.dumps(doc))


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, two spaces apart."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def when(t: datetime) -> str:
    """A time as the commands show it: RFC 3339 UTC, whole seconds."""
    from tbot_py.client.wire import format_time

    return format_time(t.replace(microsecond=0))
