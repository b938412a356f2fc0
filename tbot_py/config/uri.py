"""Destination URIs given on the command line (``--destination``, ``--storage``), tbot.md §3.4."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from tbot_py.config.schema import DirectoryDestination, MemoryDestination
from tbot_py.errors import ConfigError

__all__ = ["destination_from_uri", "destination_to_uri"]

_SUPPORTED = "file:///path, a plain path, or memory://"


def destination_from_uri(
    uri: str, *, flag: str = "--destination"
) -> DirectoryDestination | MemoryDestination:
    """Turn ``file:///abs``, ``/abs``, ``relative/dir`` or ``memory://`` into a destination.

    Relative paths are made absolute against the working directory. ``flag`` names the
    option in errors (``--destination`` or ``--storage``).
    """
    if not uri.strip():
        raise ConfigError(f"expected a directory or a URI such as {_SUPPORTED}", yaml_path=flag)
    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme == "":
        return DirectoryDestination(path=os.path.abspath(uri))
    if scheme == "file":
        if parts.netloc:
            raise ConfigError(
                f'file URIs must not name a host, got "{parts.netloc}" '
                "(use file:///absolute/path or file:relative/path)",
                yaml_path=flag,
            )
        if parts.query or parts.fragment or not parts.path:
            raise ConfigError(f'invalid file URI "{uri}"', yaml_path=flag)
        return DirectoryDestination(path=os.path.abspath(unquote(parts.path)))
    if scheme == "memory":
        if parts.netloc or parts.path or parts.query or parts.fragment:
            raise ConfigError(
                f'memory URIs take no host or path, got "{uri}" (use memory://)', yaml_path=flag
            )
        return MemoryDestination()
    if scheme == "kubernetes-secret":
        raise ConfigError(
            f'destination scheme "{scheme}" is not supported yet (supported: {_SUPPORTED})',
            yaml_path=flag,
        )
    raise ConfigError(
        f'unrecognized destination scheme "{scheme}" (supported: {_SUPPORTED})', yaml_path=flag
    )


def destination_to_uri(destination: DirectoryDestination | MemoryDestination) -> str:
    """The URI form of a destination, for messages and logs."""
    if isinstance(destination, MemoryDestination):
        return "memory://"
    return destination.path
