"""Post-renew hooks: commands run after a service has written renewed credentials.

A hook is an argv list, run without a shell (a user who wants one writes ``["sh", "-c", ...]``),
in its own process group, with stdin from /dev/null and a timeout. Its output is logged, never
parsed. A failing hook is logged and otherwise ignored: it never blocks or fails a renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["KILL_GRACE", "OUTPUT_LIMIT", "Hook", "hook_environment", "run_hooks"]

OUTPUT_LIMIT = 4096  # bytes of stdout, and of stderr, kept per hook run for the log
KILL_GRACE = timedelta(seconds=2)  # between SIGTERM and SIGKILL
_PIPE_GRACE = 1.0  # seconds to wait for output still in the pipes once a hook has exited
_POLL = 0.05
_STREAMS = {1: "stdout", 2: "stderr"}
# Control characters would let hook output forge or garble log lines.
_PRINTABLE = {code: "?" for code in (*range(32), 127) if code != 9}


@dataclass(frozen=True)
class Hook:
    """One command to run after a renewal: an argv list and how long it may take."""

    command: tuple[str, ...]
    timeout: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        if not self.command or not self.command[0]:
            raise ValueError("a hook needs a command: a non-empty argv list")
        if self.timeout <= timedelta(0):
            raise ValueError(f"a hook timeout must be positive, got {self.timeout}")


def hook_environment(
    *, service: str, destination: str, directory: str | None, files: Sequence[str]
) -> dict[str, str]:
    """The environment a hook runs with: ours plus the ``TBOT_PY_*`` variables of the event."""
    env = dict(os.environ)
    env.pop("TBOT_PY_DESTINATION_DIR", None)  # never pass on a stale value from our own env
    env.update(
        TBOT_PY_SERVICE=service,
        TBOT_PY_DESTINATION=destination,
        TBOT_PY_FILES=" ".join(files),
        TBOT_PY_EVENT="renewed",
    )
    if directory is not None:
        env["TBOT_PY_DESTINATION_DIR"] = os.path.abspath(directory)
    return env


async def run_hooks(
    hooks: Sequence[Hook],
    *,
    service: str,
    destination: str,
    directory: str | None,
    files: Sequence[str],
    log: logging.Logger,
) -> None:
    """Run ``hooks`` one after another, in order, logging what each did. Never raises.

    Meant to run as a background task after a renewal. Cancelling it kills the running hook's
    process group with SIGKILL and re-raises the cancellation.
    """
    env = hook_environment(
        service=service, destination=destination, directory=directory, files=files
    )
    for number, hook in enumerate(hooks, start=1):
        label = f"{service}: hook {number} ({hook.command[0]})"
        try:
            await _run_hook(hook, env, label, log)
        except Exception as exc:  # a bug here must not take the renewal loop down
            log.warning("%s failed: %s: %s", label, type(exc).__name__, exc)


async def _run_hook(hook: Hook, env: dict[str, str], label: str, log: logging.Logger) -> None:
    loop = asyncio.get_running_loop()
    try:
        # loop.subprocess_exec rather than create_subprocess_exec: on Python 3.11,
        # Process.wait() also waits for every holder of the output pipes, so a hook that leaves
        # a background process behind would look hung. The protocol reports the exit itself.
        transport, run = await loop.subprocess_exec(
            lambda: _HookRun(loop),
            *hook.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
    except FileNotFoundError:
        log.warning("%s: command not found", label)
        return
    except PermissionError:
        log.warning("%s: command is not executable (permission denied)", label)
        return
    except OSError as exc:
        log.warning("%s: cannot start: %s", label, exc.strerror or type(exc).__name__)
        return
    try:
        timeout = hook.timeout.total_seconds()
        try:
            await asyncio.wait_for(asyncio.shield(run.exited), timeout)
        except TimeoutError:
            await _stop_group(transport.get_pid(), run)
            _log_output(run, label, log)
            log.warning("%s timed out after %gs and was killed", label, timeout)
            return
        # A background process left behind may hold the pipes; then log what we have.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.closed), _PIPE_GRACE)
        _log_output(run, label, log)
        _log_exit(transport.get_returncode(), label, log)
    except asyncio.CancelledError:
        _signal_group(transport.get_pid(), signal.SIGKILL)
        # Reap it before the cancellation goes on, or the loop may close with it unreaped.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.exited), KILL_GRACE.total_seconds())
        raise
    finally:
        transport.close()


class _HookRun(asyncio.SubprocessProtocol):
    """Collects a hook's output (capped) and tells when it exits and when its pipes close."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.output = {fd: bytearray() for fd in _STREAMS}
        self.truncated: set[int] = set()
        self._open = set(_STREAMS)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        kept = self.output[fd]
        room = OUTPUT_LIMIT - len(kept)
        kept += data[: max(room, 0)]
        if len(data) > room:
            self.truncated.add(fd)  # the rest is read and dropped, so the hook never blocks

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open.discard(fd)
        if not self._open and not self.closed.done():
            self.closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


async def _stop_group(pid: int, run: _HookRun) -> None:
    """SIGTERM the hook's process group, then SIGKILL whatever is left after ``KILL_GRACE``."""
    _signal_group(pid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + KILL_GRACE.total_seconds()
    while _group_alive(pid) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(_POLL)
    _signal_group(pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(run.exited), KILL_GRACE.total_seconds())
        await asyncio.wait_for(asyncio.shield(run.closed), _PIPE_GRACE)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_output(run: _HookRun, label: str, log: logging.Logger) -> None:
    for fd, stream in _STREAMS.items():
        text = run.output[fd].decode("utf-8", errors="replace")
        for line in text.splitlines():
            log.info("%s %s: %s", label, stream, line.translate(_PRINTABLE))
        if fd in run.truncated:
            log.info("%s %s: ... (output truncated to %d bytes)", label, stream, OUTPUT_LIMIT)


def _log_exit(returncode: int | None, label: str, log: logging.Logger) -> None:
    if returncode is None or returncode == 0:
        return
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        log.warning("%s was killed by %s", label, name)
    else:
        log.warning("%s exited with code %d", label, returncode)
