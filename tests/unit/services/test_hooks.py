"""Post-renew hooks, run as real subprocesses (``sys.executable -c ...``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from tbot_py.services.hooks import OUTPUT_LIMIT, Hook, hook_environment, run_hooks

LOGGER = "tests.hooks"
SHORT = timedelta(seconds=0.3)


def python(code: str, *, timeout: timedelta = timedelta(seconds=30)) -> Hook:
    return Hook(command=(sys.executable, "-c", code), timeout=timeout)


def run(
    hooks: Sequence[Hook],
    *,
    directory: str | None = "/tmp/out",
    files: Sequence[str] = ("identity", "tlscert"),
) -> float:
    """Run the hooks like the daemon does; returns how long they took in seconds."""
    started = time.monotonic()
    asyncio.run(
        run_hooks(
            hooks,
            service="deployer",
            destination="directory /tmp/out",
            directory=directory,
            files=files,
            log=logging.getLogger(LOGGER),
        )
    )
    return time.monotonic() - started


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process; a zombie waiting for its reaper counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def wait_gone(pid: int, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


def test_hook_receives_event_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TBOT_PY_TEST_INHERITED", "yes")
    out = tmp_path / "env.json"
    run(
        [
            python(
                "import json, os, sys; "
                f"json.dump(dict(os.environ), open({str(out)!r}, 'w')); "
                "sys.exit(0 if sys.stdin.read() == '' else 9)"  # stdin is /dev/null
            )
        ],
        directory="relative/out",
    )
    env = json.loads(out.read_text())
    assert env["TBOT_PY_SERVICE"] == "deployer"
    assert env["TBOT_PY_DESTINATION"] == "directory /tmp/out"
    assert env["TBOT_PY_DESTINATION_DIR"] == os.path.abspath("relative/out")
    assert env["TBOT_PY_FILES"] == "identity tlscert"
    assert env["TBOT_PY_EVENT"] == "renewed"
    assert env["TBOT_PY_TEST_INHERITED"] == "yes"


def test_destination_dir_is_unset_for_non_directory_destinations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TBOT_PY_DESTINATION_DIR", "/stale/from/parent")
    env = hook_environment(service="s", destination="memory", directory=None, files=[])
    assert "TBOT_PY_DESTINATION_DIR" not in env
    assert env["TBOT_PY_FILES"] == ""


def test_hook_output_is_logged_line_by_line_with_service_prefix(
    info_logs: pytest.LogCaptureFixture,
) -> None:
    run([python("import sys; print('one'); print('two'); print('oops', file=sys.stderr)")])
    logged = messages(info_logs, logging.INFO)
    assert len(logged) == 3
    assert logged[0].startswith("deployer: hook 1 (")
    assert logged[0].endswith("stdout: one")
    assert logged[1].endswith("stdout: two")
    assert logged[2].endswith("stderr: oops")
    assert messages(info_logs, logging.WARNING) == []


def test_long_output_is_truncated_and_control_characters_are_neutralised(
    info_logs: pytest.LogCaptureFixture,
) -> None:
    run([python("print('\\x1b[31mred'); print('y' * 20000)")])
    logged = messages(info_logs, logging.INFO)
    assert logged[0].endswith("stdout: ?[31mred")
    assert sum(len(m.rsplit("stdout: ", 1)[1]) for m in logged[:2]) <= OUTPUT_LIMIT
    assert logged[-1].endswith(f"stdout: ... (output truncated to {OUTPUT_LIMIT} bytes)")


def test_non_zero_exit_is_logged_as_warning_with_exit_code(
    info_logs: pytest.LogCaptureFixture,
) -> None:
    run([python("import sys; print('reload failed', file=sys.stderr); sys.exit(3)")])
    warnings = messages(info_logs, logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].startswith("deployer: hook 1 (")
    assert warnings[0].endswith("exited with code 3")
    assert messages(info_logs, logging.INFO)[0].endswith("stderr: reload failed")


def test_hook_killed_by_a_signal_is_logged_with_the_signal_name(
    info_logs: pytest.LogCaptureFixture,
) -> None:
    run([python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")])
    assert messages(info_logs, logging.WARNING)[0].endswith("was killed by SIGSEGV")


def test_hook_past_its_timeout_is_killed_with_its_child(
    tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    hook = python(
        "import subprocess, time; "
        "child = subprocess.Popen(['sleep', '60']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); "
        "print('started', flush=True); "
        "time.sleep(60)",
        timeout=SHORT,
    )
    took = run([hook])
    assert took < 5
    grandchild = int(pid_file.read_text())
    assert wait_gone(grandchild)
    warnings = messages(info_logs, logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].endswith("timed out after 0.3s and was killed")
    assert messages(info_logs, logging.INFO)[0].endswith("stdout: started")


def test_hook_ignoring_sigterm_is_killed_after_grace_period(
    tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "stubborn.pid"
    hook = python(
        "import os, signal, subprocess, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "child = subprocess.Popen(['sleep', '60']); "  # inherits SIG_IGN for SIGTERM
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); "
        "time.sleep(60)",
        timeout=SHORT,
    )
    took = run([hook])
    assert 2.0 <= took < 6
    assert wait_gone(int(pid_file.read_text()))
    assert messages(info_logs, logging.WARNING)[0].endswith("timed out after 0.3s and was killed")


def test_missing_command_is_logged_and_later_hooks_still_run(
    tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "ran"
    run(
        [
            Hook(command=(str(tmp_path / "no-such-program"), "--flag")),
            python(f"open({str(marker)!r}, 'w').close()"),
        ]
    )
    warnings = messages(info_logs, logging.WARNING)
    assert warnings == [f"deployer: hook 1 ({tmp_path / 'no-such-program'}): command not found"]
    assert marker.exists()


def test_non_executable_command_is_logged(
    tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    run([Hook(command=(str(script),))])
    warnings = messages(info_logs, logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].endswith("command is not executable (permission denied)")


def test_hooks_run_one_after_another_in_order(tmp_path: Path) -> None:
    log_file = tmp_path / "order"
    hooks = [
        python(
            "import time; "
            f"open({str(log_file)!r}, 'a').write('start{n} '); "
            "time.sleep(0.1); "
            f"open({str(log_file)!r}, 'a').write('end{n} ')"
        )
        for n in range(3)
    ]
    run(hooks)
    assert log_file.read_text().split() == [
        "start0",
        "end0",
        "start1",
        "end1",
        "start2",
        "end2",
    ]


def test_background_process_holding_output_does_not_stall_the_hook(
    tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "daemon.pid"
    hook = python(
        "import subprocess; "
        "child = subprocess.Popen(['sleep', '60']); "  # inherits our stdout and stderr
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); "
        "print('reloaded')"
    )
    try:
        took = run([hook])
        assert took < 5
        assert messages(info_logs, logging.INFO)[-1].endswith("stdout: reloaded")
        assert messages(info_logs, logging.WARNING) == []
    finally:
        os.kill(int(pid_file.read_text()), 9)


def test_cancelling_run_hooks_kills_the_running_hook(tmp_path: Path) -> None:
    pid_file = tmp_path / "hook.pid"
    hook = python(
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )

    async def cancel_midway() -> None:
        task = asyncio.create_task(
            run_hooks(
                [hook],
                service="s",
                destination="memory",
                directory=None,
                files=(),
                log=logging.getLogger(LOGGER),
            )
        )
        while not pid_file.exists() or not pid_file.read_text():
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert wait_gone(int(pid_file.read_text()))


def test_hook_requires_a_command() -> None:
    with pytest.raises(ValueError, match="command"):
        Hook(command=())
    with pytest.raises(ValueError, match="command"):
        Hook(command=("",))
    with pytest.raises(ValueError, match="timeout"):
        Hook(command=("true",), timeout=timedelta(0))
