"""Start-up cost rules from DESIGN.md: one-shot never imports the server, scheduler or metrics."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("aiohttp", "tbot_py.authservice", "apscheduler", "prometheus_client", "sqlite3")
#: The bot talks HTTP/1.1 itself (tbot_py.client._http1); httpx stays a test-only dependency.
HTTP_LIBRARIES = ("httpx", "httpcore", "anyio", "h11")


def loaded_modules(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    modules = json.loads(done.stdout)
    assert isinstance(modules, list)
    return [str(m) for m in modules]


def test_oneshot_path_imports_no_server_scheduler_or_metrics_code() -> None:
    modules = loaded_modules(
        "import tbot_py.cli.main, tbot_py.cli.start, tbot_py.bot.oneshot, tbot_py.demo"
    )
    offenders = [m for m in modules if m.startswith(FORBIDDEN + HTTP_LIBRARIES)]
    assert offenders == []


def test_daemon_and_admin_cli_import_no_http_library() -> None:
    modules = loaded_modules("import tbot_py.bot.daemon, tbot_py.cli.auth.remote")
    offenders = [m for m in modules if m.startswith(HTTP_LIBRARIES)]
    assert offenders == []


def test_cli_entry_point_alone_does_not_load_subcommands() -> None:
    modules = loaded_modules("import tbot_py.cli.main")
    assert "tbot_py.cli.start" not in modules
    assert "tbot_py.cli.auth" not in modules
    assert "pydantic" not in modules
