"""Roles through the real CLI: `auth create -f`, then a one-shot daemon's certificate obeys them."""

from __future__ import annotations

import re
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

from tests.integration.conftest import AuthService, clean_env, run_tbot, start_identity_args

SHORT_ROLE = """\
kind: role
version: v7
metadata:
  name: short-lived
spec:
  options:
    max_session_ttl: 30m
  allow:
    logins: ['{{internal.logins}}', deploy]
  deny:
    logins: [root]
"""


def test_role_max_session_ttl_limits_the_ssh_certificate_of_a_oneshot_run(
    auth: AuthService, tmp_path: Path, need_tools: None
) -> None:
    role_file = tmp_path / "role.yaml"
    role_file.write_text(SHORT_ROLE)
    created = run_tbot("auth", "create", "-f", str(role_file), "--data-dir", str(auth.data_dir))
    assert created.returncode == 0, created.stderr
    assert created.stdout == 'role "short-lived" has been created\n'
    token = auth.add_bot("short", roles="short-lived", logins="root,ubuntu")

    out = tmp_path / "out"
    done = run_tbot(
        *start_identity_args(auth, out, tmp_path / "storage"),
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )
    assert done.returncode == 0, done.stderr
    assert "shorter than" in done.stderr  # the daemon asked for 1h and says so

    listing = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(out / "key-cert.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    valid = re.search(r"Valid: from (\S+) to (\S+)", listing)
    assert valid is not None
    start, end = (datetime.fromisoformat(v) for v in valid.groups())
    # 30 minutes from the role, plus NotBefore backdated by one minute.
    assert timedelta(minutes=30) <= end - start <= timedelta(minutes=31, seconds=5)
    principals = re.search(r"Principals:\s*\n((?:\s+\S+\n)+)", listing)
    assert principals is not None
    assert principals.group(1).split() == ["ubuntu", "deploy"]  # root is denied
    assert "teleport-traits" in listing
