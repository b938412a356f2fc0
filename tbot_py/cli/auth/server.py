"""``tbot-py auth start`` and ``auth ca-pin``: run the auth service and print its CA pin."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from tbot_py.cli.auth._common import data_dir_option, storage_url, user_errors


@click.command(name="start")
@data_dir_option
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
@click.option(
    "--write-admin-identity",
    "admin_identity",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="On every start, write a 12h admin identity file (0600) for the OS user here, "
    "for admin commands with --auth-server and -i.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Serve from this many processes sharing the port (the join rate limit is per worker).",
)
@user_errors
def start(
    *,
    data_dir: Path,
    listen: str,
    cluster_name: str | None,
    public_addrs: tuple[str, ...],
    join_rate: str,
    admin_identity: Path | None,
    workers: int,
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
    serve(
        data_dir,
        listen,
        cluster_name=cluster_name,
        public_addrs=public_addrs,
        join_rate=rate,
        storage=storage_url(),
        admin_identity=admin_identity,
        workers=workers,
    )


@click.command(name="ca-pin")
@data_dir_option
@user_errors
def ca_pin(data_dir: Path) -> None:
    """Print the CA pin clients pass as --ca-pin."""
    from tbot_py.authservice.cluster import read_ca_pin

    click.echo(read_ca_pin(data_dir, storage_url()))
