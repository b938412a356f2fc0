"""``tbot-py mcp ...``: reach MCP servers enrolled as apps, through the access proxy.

``mcp config`` prints the ``mcpServers`` entry that runs ``tbot-py mcp connect``
for an app, or with ``--write`` merges it into Claude Desktop's or Cursor's config
file (:mod:`tbot_py.mcp.clientconfig` holds the logic; the file I/O is here).

``mcp connect`` is the stdio server an MCP client runs: it bridges to the access
proxy (:mod:`tbot_py.mcp.connector`). ``mcp ls`` lists the apps the proxy lets the
identity reach. Bad flags exit 2; an unreachable or refusing proxy exits 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from tbot_py.errors import ConfigError
from tbot_py.mcp import clientconfig

if TYPE_CHECKING:
    from tbot_py.mcp.dial import ProxyAddress

#: The file a client config is created with; an existing file keeps its own mode.
NEW_FILE_MODE = 0o600
NEW_DIR_MODE = 0o700


@click.group(name="mcp")
def mcp() -> None:
    """MCP access: connect MCP clients to MCP servers enrolled as apps."""


@mcp.command("config")
@click.argument("app")
@click.option(
    "-i", "--identity", required=True, help="Identity file the connector uses (made absolute)."
)
@click.option("--proxy", required=True, metavar="HOST:PORT", help="Access proxy address.")
@click.option(
    "--client-config",
    type=click.Choice(clientconfig.CLIENTS),
    default="json",
    show_default=True,
    help="Whose config: claude (Claude Desktop), cursor, or json to print the entry only.",
)
@click.option("--write", is_flag=True, help="Merge the entry into the client's config file.")
@click.option(
    "--config-path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The client's config file, instead of its default location.",
)
def config(
    *,
    app: str,
    identity: str,
    proxy: str,
    client_config: str,
    write: bool,
    config_path: Path | None,
) -> None:
    """Print or write an MCP client's entry for APP.

    The entry runs `tbot-py mcp connect` with the identity and proxy given here.
    """
    clientconfig.check_app_name(app)
    _check_proxy(proxy)
    if client_config not in clientconfig.FILE_CLIENTS and (write or config_path is not None):
        flag = "--write" if write else "--config-path"
        raise ConfigError(f"{flag} needs --client-config claude or cursor")
    name = clientconfig.server_name(app)
    entry = clientconfig.connector_entry(
        _tbot_py_executable(), os.path.abspath(identity), proxy, app
    )
    if client_config not in clientconfig.FILE_CLIENTS:
        click.echo(clientconfig.render_client_config({"mcpServers": {name: entry}}), nl=False)
        return
    path = config_path or clientconfig.default_config_path(
        client_config,
        home=Path.home(),
        platform=sys.platform,
        xdg_config_home=os.environ.get("XDG_CONFIG_HOME"),
    )
    if not write:
        click.echo(clientconfig.render_client_config({"mcpServers": {name: entry}}), nl=False)
        click.echo(f"Add this to {path}, or run again with --write.", err=True)
        return
    written, replaced = write_server_entry(path, name, entry)
    action = "replaced" if replaced else "added"
    click.echo(f"{written}: {action} MCP server {name!r}; restart the MCP client to load it.")


_IDENTITY_OPTION = click.option(
    "-i",
    "--identity",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The bot's identity file (an identity output of tbot-py).",
)
_PROXY_OPTION = click.option(
    "--proxy", required=True, metavar="HOST:PORT", help="Access proxy address."
)
_DEBUG_OPTION = click.option("-d", "--debug", is_flag=True, help="Verbose logs on stderr.")


@mcp.command("connect")
@click.argument("app")
@_IDENTITY_OPTION
@_PROXY_OPTION
@_DEBUG_OPTION
def connect(*, app: str, identity: Path, proxy: str, debug: bool) -> None:
    """Bridge stdin/stdout to APP through the access proxy (an MCP client runs this).

    Logs go to stderr. The identity file is re-read when tbot-py renews it, without
    ending the MCP session.
    """
    from tbot_py.mcp import connector

    _setup_logging(debug)
    try:
        clientconfig.check_app_name(app)
        address = _proxy_address(proxy)
    except ConfigError as exc:
        _exit_bad_flags(exc)
    code = asyncio.run(connector.connect_stdio(address, identity, app))
    click.get_current_context().exit(code)


@mcp.command("ls")
@_IDENTITY_OPTION
@_PROXY_OPTION
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
)
@_DEBUG_OPTION
def ls(*, identity: Path, proxy: str, output_format: str, debug: bool) -> None:
    """List the MCP apps the access proxy lets this identity reach, and their tools."""
    from tbot_py.mcp import dial

    _setup_logging(debug)
    try:
        address = _proxy_address(proxy)
    except ConfigError as exc:
        _exit_bad_flags(exc)
    answer = asyncio.run(dial.list_apps(address, identity))
    apps = [a for a in answer.get("apps", []) if isinstance(a, dict)]
    if output_format == "json":
        click.echo(json.dumps(apps, indent=2))
        return
    if not apps:
        click.echo(f"No MCP apps are available to {answer.get('user', 'this identity')}.")
        return
    from tbot_py.cli.auth._common import print_table

    print_table(("NAME", "DESCRIPTION", "LABELS", "ALLOWED TOOLS"), app_rows(apps))


def app_rows(apps: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The ``mcp ls`` table rows: labels as k=v, denied tools as "except ..."."""
    rows: list[tuple[str, ...]] = []
    for app in apps:
        labels = _object(app.get("labels"))
        tools = _object(app.get("tools"))
        allow = ",".join(str(t) for t in tools.get("allow") or []) or "(none)"
        deny = ",".join(str(t) for t in tools.get("deny") or [])
        rows.append(
            (
                str(app.get("name", "")),
                str(app.get("description", "")),
                ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
                f"{allow} except {deny}" if deny else allow,
            )
        )
    return rows


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _exit_bad_flags(exc: ConfigError) -> NoReturn:
    """One line and exit 2, the code for bad flags (1 means the proxy failed)."""
    click.echo(f"ERROR: {exc}", err=True)
    click.get_current_context().exit(2)


def _proxy_address(proxy: str) -> ProxyAddress:
    from tbot_py.client._http1 import split_host_port
    from tbot_py.mcp.dial import ProxyAddress

    _check_proxy(proxy)
    host, port = split_host_port(proxy)
    return ProxyAddress(host, port)


def _setup_logging(debug: bool) -> None:
    """Logs on stderr only: stdout carries the MCP protocol. Warnings unless --debug."""
    from tbot_py.cli.main import setup_logging

    setup_logging(debug)
    logging.getLogger().setLevel(logging.DEBUG if debug else logging.WARNING)


def write_server_entry(path: Path, name: str, entry: dict[str, object]) -> tuple[Path, bool]:
    """Merge ``mcpServers[name] = entry`` into the JSON file ``path``, atomically.

    A symlinked file is updated where it points (dotfile managers link these). A
    missing file is created 0600, with missing parent directories 0700; an existing
    file keeps its mode. A file that is not a JSON object is left unchanged (ConfigError).
    Returns the file written and whether an entry of that name was replaced.
    """
    from tbot_py.destinations.fs import write_file_atomic

    target = path.resolve() if path.is_symlink() else path.absolute()
    try:
        data = target.read_bytes()
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        data, mode = b"", NEW_FILE_MODE
        _make_parents(target.parent)
    except IsADirectoryError:
        raise ConfigError("is a directory, not a client config file", source=str(target)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=str(target)) from None
    document = clientconfig.parse_client_config(data, source=str(target))
    merged, replaced = clientconfig.with_server(document, name, entry)
    write_file_atomic(target, clientconfig.render_client_config(merged).encode(), mode)
    return target, replaced


def _make_parents(directory: Path) -> None:
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for d in reversed(missing):
        try:
            d.mkdir(mode=NEW_DIR_MODE)
        except FileExistsError:
            pass  # created meanwhile
        except OSError as exc:
            raise ConfigError(
                f"cannot create directory: {exc.strerror or exc}", source=str(d)
            ) from None


def _check_proxy(proxy: str) -> None:
    from tbot_py.client._http1 import split_host_port

    try:
        host, _ = split_host_port(proxy)
    except ValueError:
        host = "/"  # refused below
    if any(c in host for c in "/@ ?#"):
        # Not echoed: a mistaken URL may carry a password.
        raise ConfigError(
            "invalid --proxy: use host:port without scheme or user, e.g. proxy.example.com:443"
        )


def _tbot_py_executable() -> str:
    """The absolute path of the ``tbot-py`` command that the client will run."""
    argv0 = sys.argv[0]
    # Under `python -m tbot_py` argv[0] is a .py file the client cannot run; look on PATH.
    # Symlinks are kept: a stable link (/usr/local/bin/tbot-py) outlives the version it names.
    if Path(argv0).name == "tbot-py" and os.path.isfile(argv0) and os.access(argv0, os.X_OK):
        return os.path.abspath(argv0)
    found = shutil.which("tbot-py")
    if found is None:
        raise ConfigError(
            "cannot find the tbot-py executable: run this as tbot-py, or put it on PATH"
        )
    return os.path.abspath(found)
