"""What an output service is: something that turns the bot identity into files.

A service never talks to the network except through the :class:`AuthAPI` it
is handed, and never knows how its destination stores bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from tbot_py.client import wire
from tbot_py.client.api import AuthAPI
from tbot_py.destinations.base import Destination
from tbot_py.identity.model import Identity


@dataclass(frozen=True)
class BotContext:
    """Everything a service may use for one generation cycle, shared by all services.

    ``cert_authorities`` and ``ping`` are fetched once per cycle with the bot's
    own client, so ten outputs cost one CA fetch, not ten.
    """

    client: AuthAPI
    bot_identity: Identity
    ping: wire.PingResponse
    cert_authorities: tuple[wire.CertAuthority, ...]
    clock: Callable[[], datetime]
    executable: str = "tbot-py"
    extra: dict[str, object] = field(default_factory=dict)

    def cas_of_type(self, ca_type: str) -> tuple[wire.CertAuthority, ...]:
        return tuple(ca for ca in self.cert_authorities if ca.type == ca_type)


class Validity(Protocol):
    """When a generated credential is valid: what the daemon schedules renewals from."""

    @property
    def not_before(self) -> datetime: ...

    @property
    def not_after(self) -> datetime: ...


@dataclass(frozen=True)
class CertValidity:
    """The validity of a credential that is not an :class:`Identity` (a host certificate)."""

    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class GenerateResult:
    """What one service produced: for logs and the one-shot summary. Holds no secret."""

    service: str
    destination: str
    files: tuple[str, ...]
    #: The issued identity (``identity`` output) or just its validity (``ssh_host``).
    identity: Validity
    #: True when any file's bytes differ from what the destination held before.
    changed: bool = True
    #: What was written, by name (holds the private key: never log it).
    written: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


S = TypeVar("S", bound=_Named)


class DestinationOutput(Generic[S]):
    """What every output service shares: its settings, which name it, and one destination."""

    def __init__(self, settings: S, destination: Destination) -> None:
        self.settings = settings
        self.destination = destination

    @property
    def name(self) -> str:
        return self.settings.name

    def init(self) -> None:
        """Prepare the destination (no network); raise DestinationError if unusable."""
        self.destination.init()


def _store(destination: Destination, files: Mapping[str, bytes]) -> bool:
    """Write ``files`` (blocking); whether any differs from what the destination held."""
    changed = destination.read_many(files) != files
    destination.write_many(files)
    return changed


async def write_output(
    name: str,
    destination: Destination,
    files: Mapping[str, bytes],
    validity: Validity,
    *,
    what: str,
    log: logging.Logger,
) -> GenerateResult:
    """Write one output's ``files``, log one line about ``what`` was written, say what it was.

    In a worker thread: a directory write fsyncs every file, and on the event loop a
    daemon with many outputs would renew them one fsync at a time.
    """
    changed = await asyncio.to_thread(_store, destination, files)
    log.info(
        "%s: wrote %d files to %s (%s, valid %s to %s)",
        name,
        len(files),
        destination.describe(),
        what,
        validity.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
        validity.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return GenerateResult(
        service=name,
        destination=destination.describe(),
        files=tuple(files),
        identity=validity,
        changed=changed,
        written=files,
    )


class OutputService(Protocol):
    """An output service: ``generate`` issues credentials and writes them once."""

    @property
    def name(self) -> str: ...

    def init(self) -> None:
        """Prepare the destination (no network); raise DestinationError if unusable."""

    async def generate(self, bot: BotContext) -> GenerateResult: ...
