"""Go-style durations ("90s", "20m", "1h30m", "1.5h") as used in tbot config files."""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["DURATION_HINT", "InvalidDurationError", "format_duration", "parse_duration"]

DURATION_HINT = "use Go syntax such as 30s, 20m, 1h"

_NS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign, what Go prints
    "\u03bcs": 1_000,  # Greek mu, also accepted by Go
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
# One component: digits with an optional fraction (Go accepts "1.", ".5", not "."), then a unit.
_COMPONENT = re.compile(r"(\d+\.?\d*|\.\d+)([a-z\u00b5\u03bc]+)")
_GO_MAX_NS = 2**63 - 1  # time.Duration is an int64 of nanoseconds


class InvalidDurationError(ValueError):
    """A string is not a valid non-negative Go duration."""


def parse_duration(text: str) -> timedelta:
    """Parse a Go duration string into a ``timedelta``.

    Accepts the syntax of Go's ``time.ParseDuration`` (a sequence of decimal numbers,
    each with an optional fraction and a unit ns/us/ms/s/m/h, and the bare "0"),
    but rejects negative values: nothing in a tbot config may be negative.
    Precision below one microsecond is truncated.
    """
    invalid = InvalidDurationError(f"invalid duration {_quote(text)} ({DURATION_HINT})")
    body = text.strip()
    if body.startswith("-"):
        raise InvalidDurationError(f"invalid duration {_quote(text)}: must not be negative")
    body = body.removeprefix("+")
    if body == "0":
        return timedelta(0)
    if not body:
        raise invalid
    total_ns = 0
    pos = 0
    while pos < len(body):
        match = _COMPONENT.match(body, pos)
        if match is None or match.group(2) not in _NS_PER_UNIT:
            raise invalid
        number, unit = match.groups()
        whole, _, fraction = number.partition(".")
        scale = _NS_PER_UNIT[unit]
        total_ns += int(whole or "0") * scale
        if fraction:
            total_ns += int(fraction) * scale // 10 ** len(fraction)
        pos = match.end()
    if total_ns > _GO_MAX_NS:
        raise InvalidDurationError(f"invalid duration {_quote(text)}: out of range")
    return timedelta(microseconds=total_ns // 1_000)


def format_duration(value: timedelta) -> str:
    """Format a ``timedelta`` in compact Go syntax: "1h", "20m", "1h30m", "1m30s", "500ms".

    Zero components are left out (Go's own ``String()`` would write "1h0m0s"); the result
    always parses back with ``parse_duration`` and with Go's ``time.ParseDuration``.
    """
    total_us = value // timedelta(microseconds=1)
    if total_us == 0:
        return "0s"
    sign = "-" if total_us < 0 else ""
    total_us = abs(total_us)
    seconds, micros = divmod(total_us, 1_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if hours == 0 and minutes == 0 and seconds == 0:
        if micros % 1_000 == 0:
            return f"{sign}{micros // 1_000}ms"
        return f"{sign}{micros}us"
    parts = [sign]
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if micros:
        parts.append(f"{seconds}.{micros:06d}".rstrip("0") + "s")
    elif seconds:
        parts.append(f"{seconds}s")
    return "".join(parts)


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'
