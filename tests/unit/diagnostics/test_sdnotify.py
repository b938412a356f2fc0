from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tbot_py.diagnostics.sdnotify import Notifier, notify


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": env_value}

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        messages = []
        self.sock.setblocking(False)
        try:
            while True:
                messages.append(self.receive())
        except BlockingIOError:
            return messages
        finally:
            self.sock.setblocking(True)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env_value = path
    else:
        name = f"tbot-py-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        env_value = "@" + name
    with sock:
        yield Listener(sock, env_value)


def test_notify_sends_one_datagram(listener: Listener) -> None:
    assert notify("READY=1\nSTATUS=up", env=listener.env)
    assert listener.receive() == "READY=1\nSTATUS=up"


def test_notify_without_notify_socket_is_a_no_op() -> None:
    assert not notify("READY=1", env={})
    assert not Notifier(env={}).ready()
    assert not Notifier(env={}).enabled


def test_notify_errors_are_not_raised(tmp_path: Path) -> None:
    assert not notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"})


def test_notifier_sends_the_lifecycle_messages(listener: Listener) -> None:
    notifier = Notifier(env=listener.env)
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("2 outputs fresh\nall good")
    assert notifier.stopping()
    assert listener.pending() == ["READY=1", "STATUS=2 outputs fresh all good", "STOPPING=1"]


def test_reloading_carries_the_monotonic_time(listener: Listener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(env=listener.env).reloading()
    first, second = listener.receive().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) < before + 10_000_000


def test_notifier_reads_the_environment_once(listener: Listener) -> None:
    env = dict(listener.env)
    notifier = Notifier(env=env)
    env.clear()
    assert notifier.ready()


@pytest.mark.parametrize(
    ("usec", "interval"),
    [("60000000", 30.0), ("1000000", 0.5), ("0", None), ("soon", None), ("", None)],
)
def test_watchdog_interval_is_half_of_watchdog_usec(usec: str, interval: float | None) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": usec}
    assert Notifier(env=env).watchdog_interval() == interval


def test_watchdog_pid_of_another_process_disables_the_watchdog() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "2000000"}
    assert Notifier(env={**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 1.0
    assert Notifier(env={**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval() is None


def test_watchdog_needs_a_notify_socket() -> None:
    assert Notifier(env={"WATCHDOG_USEC": "2000000"}).watchdog_interval() is None


def test_run_watchdog_pings_until_stopped(listener: Listener) -> None:
    notifier = Notifier(env={**listener.env, "WATCHDOG_USEC": "100000"})  # every 50 ms

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(notifier.run_watchdog(stop))
        await asyncio.sleep(0.18)
        stop.set()
        await asyncio.wait_for(task, timeout=1)

    asyncio.run(run())
    pings = listener.pending()
    assert set(pings) == {"WATCHDOG=1"}
    assert 3 <= len(pings) <= 5


def test_run_watchdog_returns_at_once_when_disabled() -> None:
    async def run() -> None:
        await asyncio.wait_for(Notifier(env={}).run_watchdog(asyncio.Event()), timeout=1)

    asyncio.run(run())
