"""The ``tbot-py`` command line.

Commands parse argv, build a validated config and call the core; the core
never reads argv or the environment. Every failure a user can cause ends as
one ``ERROR:`` line on stderr and exit code 1; a traceback is shown only with
``--debug``. Sub-command groups are imported only when used, so a one-shot run
never imports the auth service.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from typing import Any

import click

from tbot_py import __version__
from tbot_py.errors import Error

# name -> (module, attribute): loaded on first use to keep start-up cheap.
_LAZY_COMMANDS = {
    "start": ("tbot_py.cli.start", "start"),
    "configure": ("tbot_py.cli.start", "configure"),
    "auth": ("tbot_py.cli.auth", "auth"),
    "wait": ("tbot_py.cli.wait", "wait"),
    "install": ("tbot_py.cli.install", "install"),
    "init": ("tbot_py.cli.init", "init"),
    "mcp": ("tbot_py.cli.mcp", "mcp"),
    "mcp-proxy": ("tbot_py.cli.mcp_proxy", "mcp_proxy"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS:
            module, attr = _LAZY_COMMANDS[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)


class JSONFormatter(logging.Formatter):
    """One JSON object per line, for journald, Loki and friends (``--log-format json``)."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(debug: bool, log_format: str = "text") -> None:
    """Logs on stderr, text for people or JSON for machines; stdout is kept for output."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        formatter: logging.Formatter = JSONFormatter()
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)-5s [%(name)s] %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True
    )
    # APScheduler narrates every job run at INFO; our own lines say what matters.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if debug else logging.WARNING)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """tbot-py: short-lived machine credentials, tbot-compatible."""


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(f"tbot-py v{__version__} python{sys.version_info[0]}.{sys.version_info[1]}")


def _debug_requested(argv: list[str]) -> bool:
    return "-d" in argv or "--debug" in argv


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: run the CLI and turn errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return cli.main(args=args, prog_name="tbot-py", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ERROR: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Error as exc:
        if _debug_requested(args):
            logging.getLogger("tbot_py").exception("failed")
        click.echo(f"ERROR: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("ERROR: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`tbot-py ... | head`): stop quietly, as Unix tools do.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except Exception as exc:  # a bug: still one line, with the trace only on request
        if _debug_requested(args):
            logging.getLogger("tbot_py").exception("internal error")
        click.echo(
            f"ERROR: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
