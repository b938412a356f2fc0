"""``tbot-py auth ...``: run the auth service and administer its roles, bots, tokens and locks.

The admin commands work on the data directory directly (the server need not
run), or on a running server's admin API with ``--auth-server H:P -i FILE``
(:mod:`.remote`). Every user error is one ``ERROR: ...`` line on stderr with exit code 1.
The only secret ever printed is a join token the command has just created.

This module defines the ``auth`` group; each concern has its own module:
:mod:`.server` (start, ca-pin), :mod:`.audit`, :mod:`.bots` (and their
instances), :mod:`.tokens`, :mod:`.resources` (create, get, rm of roles) and
:mod:`.locks`, with the shared options and output in :mod:`._common`. None
of them imports the auth service until a command runs.
"""

from __future__ import annotations

import click

from tbot_py.cli.auth.audit import audit_log
from tbot_py.cli.auth.bots import bots
from tbot_py.cli.auth.locks import locks_group
from tbot_py.cli.auth.resources import create, get, rm
from tbot_py.cli.auth.server import ca_pin, start
from tbot_py.cli.auth.tokens import tokens

__all__ = ["auth"]


@click.group(name="auth")
def auth() -> None:
    """Run the cluster-side auth service and manage its roles, bots and join tokens."""


for _command in (start, ca_pin, audit_log, bots, tokens, locks_group, create, get, rm):
    auth.add_command(_command)
