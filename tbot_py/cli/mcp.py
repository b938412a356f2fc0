"""``tbot-py mcp ...``: reach MCP servers enrolled as apps, through the access proxy.

``mcp config`` prints the ``mcpServers`` entry that runs ``tbot-py mcp connect``
for an app, or with ``--write`` merges it into Claude Desktop's or Cursor's config
file (:mod:`tbot_py.mcp.clientconfig` holds the logic; the file I/O is here).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

import click

from tbot_py.errors import ConfigError
from tbot_py.mcp import clientconfig

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
