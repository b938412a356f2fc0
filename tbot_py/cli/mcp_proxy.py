"""``tbot-py mcp-proxy start``: run the MCP access proxy (:mod:`tbot_py.mcp.proxy`).

A bad config file is one ``ERROR:`` line and exit code 2; any other failure to start
(identity file, auth service, listen address) is one line and exit code 1. Once it
listens, the proxy prints one JSON line on stdout, ``{"addr": "HOST:PORT"}``, and
serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
from typing import IO, Any

import click

from tbot_py.errors import ConfigError

#: The exit code of a config file that cannot be used.
CONFIG_EXIT_CODE = 2


class ProxyConfigError(click.ClickException):
    """One ``ERROR: <message>`` line on stderr, exit code 2."""

    exit_code = CONFIG_EXIT_CODE

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"ERROR: {self.format_message()}", err=True)


@click.group(name="mcp-proxy")
def mcp_proxy() -> None:
    """The MCP access proxy: MCP servers enrolled as apps, reached by tbot-py mcp connect."""


@mcp_proxy.command("start")
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The proxy's config file (YAML).",
)
@click.option("-d", "--debug", is_flag=True, help="Verbose logging.")
def start(config_path: str, debug: bool) -> None:
    """Serve MCP sessions until SIGTERM or SIGINT.

    When listening, prints one JSON line: {"addr": "HOST:PORT"}.
    """
    from tbot_py.cli.main import setup_logging
    from tbot_py.mcp.proxyconfig import load_proxy_config

    setup_logging(debug)
    try:
        config = load_proxy_config(config_path)
    except ConfigError as exc:
        raise ProxyConfigError(str(exc)) from None

    from tbot_py.mcp.proxy import run_proxy

    def ready(addr: str) -> None:
        click.echo(json.dumps({"addr": addr}))

    run_proxy(config, ready=ready)
