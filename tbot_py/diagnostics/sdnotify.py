"""systemd's notify protocol (sd_notify(3)) without a dependency.

A notification is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``; a leading ``@`` names a socket in the abstract
namespace. Outside systemd the variable is unset and every call is a no-op, so
the daemon can notify unconditionally. Failures are logged at debug level and
never raised: a lost notification must not take the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("tbot_py.diagnostics.sdnotify")


def notify(message: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET``; False if it is unset or sending failed."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    return _send(address, message)


def _send(address: str, message: str) -> bool:
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        # systemd also speaks vsock ("vsock:CID:PORT") to VMs; we are not one of those.
        log.debug("sd_notify: unsupported NOTIFY_SOCKET %r", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify: cannot send %r: %s", message, exc)
        return False
    return True


class Notifier:
    """The daemon's notifications, from an environment read once at construction.

    Pass ``env`` to test without touching ``os.environ``. With ``Type=notify`` the
    daemon calls ``ready()`` once it can serve, ``reloading()`` then ``ready()``
    around a reload, and ``stopping()`` on shutdown, and runs ``run_watchdog``
    if systemd asked for a watchdog.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        source = os.environ if env is None else env
        self._address = source.get("NOTIFY_SOCKET", "")
        self._watchdog_usec = source.get("WATCHDOG_USEC", "")
        self._watchdog_pid = source.get("WATCHDOG_PID", "")

    @property
    def enabled(self) -> bool:
        """Whether systemd is listening (``$NOTIFY_SOCKET`` was set)."""
        return bool(self._address)

    def ready(self) -> bool:
        """Startup (or a reload) is complete."""
        return _send(self._address, "READY=1")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return _send(self._address, "STATUS=" + text.replace("\n", " "))

    def reloading(self) -> bool:
        """A reload started; follow with ``ready()`` when it is done."""
        # systemd >= 253 requires the monotonic time of the reload request alongside.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return _send(self._address, f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Shutdown started."""
        return _send(self._address, "STOPPING=1")

    def watchdog(self) -> bool:
        """One keep-alive ping."""
        return _send(self._address, "WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises).

        None when no watchdog is configured, or when ``WATCHDOG_PID`` names
        another process (the variables were inherited, not meant for us).
        """
        if not self._address or not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.debug("sd_notify: ignoring WATCHDOG_USEC=%r", self._watchdog_usec)
            return None
        return usec / 2 / 1_000_000 if usec > 0 else None

    async def run_watchdog(self, stop: asyncio.Event) -> None:
        """Ping the watchdog every interval until ``stop`` is set; return at once if disabled."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        while not stop.is_set():
            self.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
