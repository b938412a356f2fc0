"""Every error tbot-py reports to a user, in one shallow tree.

Each error renders as one line that says what went wrong, where, and (when we
know) what to do. The CLI prints ``str(error)`` and exits non-zero; nothing
here may ever carry a secret (join tokens, private keys) in its message.
"""

from __future__ import annotations


class Error(Exception):
    """Base class for errors that are shown to the user as one line."""


class ConfigError(Error):
    """The configuration (file, flags or environment) is invalid."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        yaml_path: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.yaml_path = yaml_path
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = self.source if self.line is None else f"{self.source}:{self.line}"
        prefix = ": ".join(p for p in (where, self.yaml_path) if p)
        return f"{prefix}: {self.message}" if prefix else self.message


class DestinationError(Error):
    """A destination cannot be prepared, written or read."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.message = message
        self.path = path
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class StorageLockedError(DestinationError):
    """Another process holds the exclusive lock on the storage directory."""


class AclError(DestinationError):
    """POSIX ACLs cannot be tested, set or read on a destination (``setfacl``'s reason inside)."""


class IdentityError(Error):
    """Stored or received credentials are missing, malformed or inconsistent."""


class ClientError(Error):
    """Talking to the auth service failed.

    ``url`` is the endpoint we called and ``status`` the HTTP status, if any.
    ``message`` is safe to show: it comes from the server's error body or from
    our own description of the transport failure, never from request data.
    """

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        self.message = message
        self.url = url
        self.status = status
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [self.url] if self.url else []
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        where = " ".join(parts)
        return f"{where}: {self.message}" if where else self.message


class ConnectionProblem(ClientError):
    """The auth service could not be reached (DNS, refused, timeout, TLS reset)."""


class TrustError(ClientError):
    """The server could not be authenticated: CA pin mismatch or failed certificate check."""


class ProtocolError(ClientError):
    """The server answered with something that is not a valid response."""


class BadParameter(ClientError):
    """The server rejected the request as malformed (HTTP 400)."""


class AccessDenied(ClientError):
    """The server refused the caller (HTTP 403): bad token, expired or locked identity."""


class NotFound(ClientError):
    """The server has no such resource (HTTP 404)."""


class LimitExceeded(ClientError):
    """The server is rate limiting us (HTTP 429)."""


class ServerError(ClientError):
    """The server failed (HTTP 5xx)."""
