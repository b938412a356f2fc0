"""Destinations: where rendered artifacts are stored (a directory, or process memory).

A destination stores named bytes and never knows what they mean.
"""

from __future__ import annotations

from tbot_py.destinations.base import Destination, DestinationLock, check_artifact_name
from tbot_py.destinations.directory import DirectoryDestination, DirectoryLock
from tbot_py.destinations.memory import MemoryDestination, MemoryLock

__all__ = [
    "Destination",
    "DestinationLock",
    "DirectoryDestination",
    "DirectoryLock",
    "MemoryDestination",
    "MemoryLock",
    "check_artifact_name",
]
