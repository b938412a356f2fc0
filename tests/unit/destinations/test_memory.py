from __future__ import annotations

import pytest

from tbot_py.destinations import Destination, MemoryDestination
from tbot_py.errors import DestinationError


def test_memory_destination_round_trips_and_is_not_persistent() -> None:
    dest: Destination = MemoryDestination()
    dest.init()
    assert not dest.is_persistent
    assert dest.describe() == "memory"
    assert dest.read("key") is None
    dest.write("key", b"k")
    dest.write_many({"tlscert": b"t", "key": b"k2"})
    assert dest.read("key") == b"k2"
    assert dest.read("tlscert") == b"t"


def test_memory_destination_copies_the_bytes() -> None:
    dest = MemoryDestination()
    buf = bytearray(b"secret")
    dest.write("key", buf)  # type: ignore[arg-type]
    buf[:] = b"XXXXXX"
    assert dest.read("key") == b"secret"
    assert type(dest.read("key")) is bytes


def test_memory_destination_rejects_bad_names_before_storing_any() -> None:
    dest = MemoryDestination()
    with pytest.raises(DestinationError, match="invalid artifact name"):
        dest.write_many({"fine": b"x", "../evil": b"y"})
    assert dest.read("fine") is None


def test_memory_lock_always_succeeds() -> None:
    dest = MemoryDestination()
    with dest.lock(), dest.lock():
        pass
