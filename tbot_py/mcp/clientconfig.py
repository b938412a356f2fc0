"""The ``mcpServers`` entry that makes an MCP client run ``tbot-py mcp connect``.

Claude Desktop and Cursor read the same shape from a JSON file::

    {"mcpServers": {"teleport-mcp-APP": {
        "command": "/abs/path/tbot-py",
        "args": ["mcp", "connect", "-i", IDENTITY, "--proxy", HOST:PORT, APP]}}}

This module renders that entry, finds each client's default file, and merges the
entry into a file's parsed contents without touching any other key or server.
Everything here is pure: the CLI (:mod:`tbot_py.cli.mcp`) reads and writes the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tbot_py.errors import ConfigError

SERVER_PREFIX = "teleport-mcp-"
CLIENTS = ("claude", "cursor", "json")
#: Clients with a config file of their own; ``json`` only prints the entry.
FILE_CLIENTS = ("claude", "cursor")
#: The rule for resource names in :data:`tbot_py.authservice.roles.NAME_RE` (a test keeps
#: them equal); copied so that configuring a client does not load the auth service.
APP_NAME_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")

JSONObject = dict[str, Any]


def check_app_name(app: str) -> str:
    """Return ``app`` if it is a valid app name; ConfigError otherwise."""
    if not APP_NAME_RE.match(app):
        raise ConfigError(
            f"invalid app name {app[:130]!r}: use 1-128 letters, digits and _ . @ : -"
        )
    return app


def server_name(app: str) -> str:
    """The key of the app's entry under ``mcpServers``, as ``tsh mcp config`` names it."""
    return SERVER_PREFIX + app


def connector_entry(executable: str, identity: str, proxy: str, app: str) -> JSONObject:
    """The server entry: run ``executable mcp connect -i identity --proxy proxy app``."""
    return {
        "command": executable,
        "args": ["mcp", "connect", "-i", identity, "--proxy", proxy, app],
    }


def default_config_path(
    client: str, *, home: Path, platform: str, xdg_config_home: str | None = None
) -> Path:
    """Where ``client`` (claude or cursor) reads its MCP servers on ``platform`` (sys.platform).

    Cursor's global file is ``~/.cursor/mcp.json`` everywhere. Claude Desktop documents
    ``~/Library/Application Support/Claude`` on macOS; its Linux builds follow XDG.
    """
    if client == "cursor":
        return home / ".cursor" / "mcp.json"
    if client != "claude":
        raise ConfigError(f"client {client!r} has no config file: use claude or cursor")
    if platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        # XDG says a relative XDG_CONFIG_HOME is invalid and must be ignored.
        xdg = Path(xdg_config_home) if xdg_config_home else None
        base = xdg if xdg is not None and xdg.is_absolute() else home / ".config"
    return base / "Claude" / "claude_desktop_config.json"


def parse_client_config(data: bytes, *, source: str) -> JSONObject:
    """The JSON object in a client's config file; ConfigError naming ``source`` otherwise.

    An empty file counts as ``{}``: there is nothing in it to keep.
    """
    if not data.strip():
        return {}
    try:
        document = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"not valid JSON ({exc.msg}, column {exc.colno}): fix or move the file; "
            "it was not changed",
            source=source,
            line=exc.lineno,
        ) from None
    except ValueError:  # UnicodeDecodeError: not UTF-8/16/32 text
        raise ConfigError(
            "not UTF-8 JSON text: fix or move the file; it was not changed", source=source
        ) from None
    if not isinstance(document, dict):
        raise ConfigError(
            f"expected a JSON object at the top, got {_json_type(document)}: "
            "fix or move the file; it was not changed",
            source=source,
        )
    servers = document.get("mcpServers")
    if servers is not None and not isinstance(servers, dict):
        raise ConfigError(
            f'"mcpServers" is {_json_type(servers)}, expected an object: '
            "fix or move the file; it was not changed",
            source=source,
        )
    return document


def with_server(
    document: Mapping[str, Any], name: str, entry: Mapping[str, Any]
) -> tuple[JSONObject, bool]:
    """A copy of ``document`` whose ``mcpServers[name]`` is ``entry``, and whether it replaced one.

    Every other key and server is kept as it was, in its place; a replaced entry keeps
    its position, a new one goes last.
    """
    servers = dict(document.get("mcpServers") or {})
    replaced = name in servers
    servers[name] = dict(entry)
    merged = dict(document)
    merged["mcpServers"] = servers
    return merged, replaced


def render_client_config(document: Mapping[str, Any]) -> str:
    """The file's new text: two-space indented JSON, non-ASCII kept, newline at the end."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else "an object"
