"""tbot-py: a machine-identity daemon, the Python equivalent of Teleport's tbot."""

from __future__ import annotations

__version__ = "0.1.0"
