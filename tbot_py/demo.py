"""``make demo``: the whole system on one machine, in one process, in about a second.

Starts the auth service on 127.0.0.1 with state in a temporary directory, adds
a bot, runs one one-shot join into ``./tbot-demo-out/`` (or ``--out DIR``),
and prints what was written and how to inspect it with standard tools.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tbot_py.bot.oneshot import OneshotResult, run_oneshot
from tbot_py.cli.main import setup_logging
from tbot_py.config.loader import load_config_text
from tbot_py.identity.model import Identity

CONFIG_TEMPLATE = """\
version: v2
proxy_server: {addr}
onboarding:
  join_method: token
  token: {token_file}
  ca_pins: [{pin}]
storage:
  type: directory
  path: {storage}
oneshot: true
services:
  - type: identity
    name: demo-identity
    destination:
      type: directory
      path: {out}
"""


def own_executable() -> str:
    """The ``tbot-py`` script next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "tbot-py"
    return str(beside) if beside.exists() else shutil.which("tbot-py") or "tbot-py"


def _run_tool(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return f"({argv[0]} not installed)"
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip()


def _summary(result: OneshotResult, out: Path, elapsed: float) -> str:
    output = result.outputs[0]
    identity = output.identity
    assert isinstance(identity, Identity)  # the demo runs one identity output
    lines = [
        "",
        f"One-shot run finished in {elapsed:.2f}s. Files in {out}/:",
    ]
    for name in sorted(os.listdir(out)):
        st = (out / name).lstat()
        lines.append(f"  {stat.filemode(st.st_mode)}  {st.st_size:6d}  {name}")
    lines += [
        "",
        f"Identity:   {identity.username} in cluster {identity.cluster_name}",
        f"Roles:      {', '.join(identity.roles) or '-'}",
        f"Principals: {', '.join(identity.principals)}",
        f"Expires:    {identity.not_after:%Y-%m-%d %H:%M:%S} UTC "
        f"(bot identity: {result.bot_identity.not_after:%H:%M:%S} UTC, renewable)",
        "",
        "Inspect them:",
        f"  ssh-keygen -L -f {out}/key-cert.pub",
        f"  openssl x509 -in {out}/tlscert -noout -subject -issuer -enddate",
        f"  openssl verify -CAfile {out}/teleport-user-ca.crt {out}/tlscert",
        f"  ssh -F {out}/ssh_config -G node1.{identity.cluster_name}",
        "",
        "openssl verify says: "
        + _run_tool(
            ["openssl", "verify", "-CAfile", f"{out}/teleport-user-ca.crt", f"{out}/tlscert"]
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--out", default="tbot-demo-out", help="output directory")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    setup_logging(debug=False)
    # The auth service's per-request logs would drown the story; keep its warnings.
    logging.getLogger("tbot_py.authservice").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    from tbot_py.authservice import admin
    from tbot_py.authservice.server import start_in_thread

    with tempfile.TemporaryDirectory(prefix="tbot-py-demo-") as tmp:
        tmp_path = Path(tmp)
        with start_in_thread(tmp_path / "auth", "127.0.0.1:0") as auth:
            print(f"Auth service on https://{auth.addr}, cluster {auth.cluster_name}")
            print(f"CA pin {auth.ca_pin}")
            new = admin.add_bot(
                auth.cluster, "demo", roles=("access", "editor"), logins=(getpass.getuser(),)
            )
            print("Bot 'demo' added with roles access, editor; join token issued")
            token_file = tmp_path / "token"
            token_file.write_text(new.token.token)
            token_file.chmod(0o600)
            config_text = CONFIG_TEMPLATE.format(
                addr=auth.addr,
                token_file=token_file,
                pin=auth.ca_pin,
                storage=tmp_path / "bot-storage",
                out=out,
            )
            config_path = tmp_path / "tbot.yaml"
            config_path.write_text(config_text)
            print(f"\nConfig ({config_path}):\n{config_text}")
            config = load_config_text(config_text, source=str(config_path))
            started = time.perf_counter()
            result = asyncio.run(run_oneshot(config, executable=own_executable()))
            elapsed = time.perf_counter() - started
        print(_summary(result, out, elapsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
