"""``tbot-py install systemd``: write (or print) a hardened unit for the daemon (tbot.md §8.1).

Like ``tbot install systemd`` it is a dry run unless ``--write`` is given, leaves
an identical file alone and refuses to replace a different one without
``--force``. Unlike tbot's unit, ours is ``Type=notify`` with a watchdog (the
daemon speaks sd_notify) and sandboxed: the service may write only its state
directory and the paths the operator lists in ``ReadWritePaths=``.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import click

from tbot_py.errors import ConfigError, DestinationError

UNIT_MODE = 0o644
DEFAULT_EXECUTABLE = "/usr/local/bin/tbot-py"
# systemd unit names: letters, digits and ":-_.\" (and "@" for templates, which we are not).
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\-]+")
# User and group names as useradd accepts them; also keeps "\n" out of the unit.
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")


@click.group()
def install() -> None:
    """Install tbot-py as a system service."""


@install.command("systemd")
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The config file the service runs (made absolute).",
)
@click.option("--name", default="tbot-py", show_default=True, help="Unit name.")
@click.option("--user", default="tbot-py", show_default=True, help="User to run as.")
@click.option("--group", default="tbot-py", show_default=True, help="Group to run as.")
@click.option(
    "--write/--no-write",
    default=False,
    help="Write the unit file (default: print it; a dry run).",
)
@click.option("--force/--no-force", default=False, help="Replace a different existing unit.")
@click.option(
    "--systemd-directory",
    default="/etc/systemd/system",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where to write the unit.",
)
@click.option("--diag-addr", help="Serve diagnostics here, e.g. 127.0.0.1:3001.")
def install_systemd(
    *,
    config_path: str,
    name: str,
    user: str,
    group: str,
    write: bool,
    force: bool,
    systemd_directory: str,
    diag_addr: str | None,
) -> None:
    """Print or write a systemd unit that runs `tbot-py start -c CONFIG` as a daemon."""
    from tbot_py.cli.start import own_executable

    executable = own_executable()
    if not os.path.isabs(executable):
        click.echo(
            f"warning: cannot find the tbot-py executable; the unit runs {DEFAULT_EXECUTABLE}",
            err=True,
        )
        executable = DEFAULT_EXECUTABLE
    unit = render_systemd_unit(
        name=name,
        user=user,
        group=group,
        executable=executable,
        config_path=os.path.abspath(config_path),
        diag_addr=diag_addr,
    )
    path = Path(systemd_directory) / f"{name}.service"
    if not write:
        click.echo(unit, nl=False)
        click.echo(f"(dry run: pass --write to install it as {path})", err=True)
        return
    if write_unit(path, unit, force=force):
        click.echo(f"Wrote {path}.")
    else:
        click.echo(f"{path} is already up to date.")
    click.echo(
        "Next: create the user and group if needed, list your output directories in "
        "ReadWritePaths=, then run:\n"
        "  systemctl daemon-reload\n"
        f"  systemctl enable --now {name}"
    )


def write_unit(path: Path, unit: str, *, force: bool) -> bool:
    """Write ``unit`` to ``path`` atomically with mode 0644; False if it was already there."""
    try:
        existing: str | None = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        existing = None
    except (OSError, UnicodeDecodeError) as exc:
        raise DestinationError(f"cannot read the existing unit: {exc}", path=str(path)) from None
    if existing == unit:
        return False
    if existing is not None and not force:
        raise ConfigError(
            "a different unit file already exists; pass --force to replace it", source=str(path)
        )
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise DestinationError(
            f"cannot write the unit: {exc.strerror or exc} (run as root, or pass "
            "--systemd-directory)",
            path=str(path),
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), UNIT_MODE)  # mkstemp makes it 0600; systemd wants it readable
            out.write(unit)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise DestinationError(f"cannot write the unit: {exc}", path=str(path)) from None
    return True


def render_systemd_unit(
    *,
    name: str = "tbot-py",
    user: str = "tbot-py",
    group: str = "tbot-py",
    executable: str = DEFAULT_EXECUTABLE,
    config_path: str = "/etc/tbot-py.yaml",
    diag_addr: str | None = None,
) -> str:
    """The unit file text.

    With the defaults it is meant to match the body of the repository's
    ``systemd/tbot-py.service`` (that file adds an explanatory header).
    """
    if not _UNIT_NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use letters, digits and :-_. only")
    for flag, account in (("--user", user), ("--group", group)):
        if not _ACCOUNT.fullmatch(account):
            raise ConfigError(f"{flag} {account!r} is not a valid user or group name")
    command = [executable, "start", "-c", config_path]
    if diag_addr:
        command += ["--diag-addr", diag_addr]
    exec_start = " ".join(_exec_argument(arg) for arg in command)
    return f"""\
# Generated by tbot-py
[Unit]
Description={name} - machine identity daemon
After=network-online.target
Wants=network-online.target

[Service]
# The daemon tells systemd when it is ready, reloading and stopping, and pings
# the watchdog every WatchdogSec/2; a hung daemon is restarted.
Type=notify
NotifyAccess=main
WatchdogSec=60
# READY=1 waits until every output is written; during an outage at boot that can take
# a while, and killing the daemon for it would only restart the wait.
TimeoutStartSec=infinity
User={user}
Group={group}
ExecStart={exec_start}
# `systemctl reload` (SIGHUP) re-reads and validates the config; SIGUSR1 renews now.
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=5

# StateDirectory= creates /var/lib/{name} (0700, owned by the service user) and exports
# $STATE_DIRECTORY, which tbot-py uses as the default storage directory.
StateDirectory={name}
StateDirectoryMode=0700
UMask=0077

# Hardening: the daemon only needs the network, its storage and its destinations.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
CapabilityBoundingSet=
AmbientCapabilities=
# ProtectSystem=strict makes everything else read-only: uncomment and list every
# output destination of the config, separated by spaces.
#ReadWritePaths=/opt/machine-id

[Install]
WantedBy=multi-user.target
"""


def _exec_argument(arg: str) -> str:
    """Quote one ExecStart= argument so systemd passes it through unchanged."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in arg):
        raise ConfigError(f"{arg!r}: control characters cannot go into a unit file")
    # "%" starts a specifier and "$" a variable in ExecStart=; doubling keeps them literal.
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and not any(c in escaped for c in " \t\"'\\;"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
