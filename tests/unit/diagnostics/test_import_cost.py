"""Only metrics.py may load prometheus_client; the CLI entry point loads no diagnostics."""

from __future__ import annotations

import json
import subprocess
import sys


def loaded_modules(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout))


def test_health_http_sdnotify_and_wait_do_not_load_prometheus_client() -> None:
    modules = loaded_modules(
        "import tbot_py.diagnostics.health, tbot_py.diagnostics.http, "
        "tbot_py.diagnostics.sdnotify, tbot_py.cli.wait, tbot_py.cli.install"
    )
    assert not any(m.startswith("prometheus_client") for m in modules)
    assert "pydantic" not in modules  # wait and install load the config code only when run


def test_cli_entry_point_loads_no_diagnostics() -> None:
    modules = loaded_modules("import tbot_py.cli.main")
    assert not any(m.startswith(("tbot_py.diagnostics", "tbot_py.cli.wait")) for m in modules)
