"""``tbot-py auth audit``: print the audit log, once or as it is written (``--follow``)."""

from __future__ import annotations

from pathlib import Path

import click

from tbot_py.cli.auth._common import (
    admin_target_option,
    format_option,
    local_data_dir,
    print_json,
    user_errors,
)


@click.command(name="audit")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they are written.")
@click.option("--since", default=None, help="Only events from this long ago on (e.g. 1h, 30m).")
@format_option
@admin_target_option
@user_errors
def audit_log(follow: bool, since: str | None, output_format: str, data_dir: Path | None) -> None:
    """Print the audit log: one event per line, as text or as the stored JSON."""
    import time
    from datetime import UTC, datetime

    from tbot_py.authservice import admin, audit
    from tbot_py.authservice.errors import BadParameter, ClusterNotInitialized

    data_dir = local_data_dir(data_dir)
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
                    print_json(doc)
                else:
                    click.echo(audit.format_text(doc))
            if not follow:
                return
            time.sleep(audit.FOLLOW_POLL_S)
    except KeyboardInterrupt:  # the normal end of --follow
        return
