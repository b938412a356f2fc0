"""Errors the auth service reports, each mapped to Teleport's HTTP status (protocol §8).

Every message is written for the caller: it may be sent verbatim in an HTTP
error body or printed by the admin CLI, so it must never carry a join token,
a key, or an internal detail such as a file path inside the data directory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tbot_py.authservice.locks import Lock


class AuthServiceError(Exception):
    """Base class: a failure whose message is safe to show to the caller."""

    #: HTTP status sent when this error ends a request.
    status: int = 500

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class BadParameter(AuthServiceError):
    """The request or command is malformed (HTTP 400)."""

    status = 400


class AccessDenied(AuthServiceError):
    """The caller is not allowed to do this: bad token, bad or stale certificate (HTTP 403)."""

    status = 403


class Locked(AccessDenied):
    """A lock is in force on the bot or the bot instance; ``lock`` is that lock (HTTP 403)."""

    def __init__(self, message: str, *, lock: Lock) -> None:
        super().__init__(message)
        self.lock = lock


class GenerationMismatch(Locked):
    """A renewal presented the wrong generation, so ``lock`` was just created (HTTP 403).

    ``stored`` is the instance's generation, ``presented`` the caller's.
    """

    def __init__(self, message: str, *, lock: Lock, stored: int, presented: int) -> None:
        super().__init__(message, lock=lock)
        self.stored = stored
        self.presented = presented


class NotFound(AuthServiceError):
    """The named resource does not exist (HTTP 404)."""

    status = 404


class AlreadyExists(AuthServiceError):
    """The resource to create exists already (HTTP 409)."""

    status = 409


class LimitExceeded(AuthServiceError):
    """The caller is being rate limited (HTTP 429)."""

    status = 429


class ClusterNotInitialized(NotFound):
    """The data directory holds no cluster yet."""


class StorageUnavailable(AuthServiceError):
    """The PostgreSQL state database cannot be reached or failed a statement (HTTP 503)."""

    status = 503


class StorageBusy(AuthServiceError):
    """A transaction asked not to wait would have had to wait for a lock or the network (503).

    The server catches it and runs the transaction in a worker thread, where it may wait.
    """

    status = 503
