"""The connector-to-proxy protocol: a hello line, then MCP's stdio framing over mTLS.

``tbot-py mcp connect`` opens a TLS connection to the access proxy with ALPN
:data:`ALPN`, presenting the bot's certificate from its identity file, and checks the
proxy's certificate against the cluster CAs in that file. Then:

1. The client sends one hello line: ``{"app": "NAME"}`` to open a session with an
   app, or ``{"list": true}`` to ask which apps it may reach.
2. The proxy answers one line. For a session: ``{"ok": true, "app": NAME, "expires":
   RFC 3339}`` (when the proxy will end the session: the client certificate's NotAfter
   or sooner), or ``{"error": "one line"}`` and it closes. For a list: ``{"ok": true,
   "user": USER, "apps": [...]}`` (each app ``{name, description, uri, labels, tools:
   {allow: [...], deny: [...]}}``) or the error line, and it closes.
3. After a session's ok line, both sides exchange newline-delimited JSON-RPC 2.0
   messages (or batches), exactly as MCP's stdio transport frames them: one JSON value
   per line, UTF-8, no embedded newlines.

Every line is at most :data:`MAX_LINE_BYTES`. This module holds only the framing and
the hello and its answer, shared by both ends; it does no I/O beyond reading and
writing lines on streams it is given.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: The ALPN protocol both ends require.
ALPN = "tbot-py-mcp/1"
#: The longest line either end accepts (a ``tools/list`` answer can be large).
MAX_LINE_BYTES = 16 * 1024 * 1024
#: The longest hello line the proxy accepts.
MAX_HELLO_BYTES = 4096
#: How long the proxy waits for the hello, and the client for its answer.
HELLO_TIMEOUT_S = 10.0


class TunnelError(Exception):
    """The peer broke the protocol; the message is one line that never echoes a secret."""


@dataclass(frozen=True)
class Hello:
    """What the client asks for: a session with ``app``, or (``list``) the app list."""

    app: str = ""
    list: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"list": True} if self.list else {"app": self.app}

    @classmethod
    def from_json(cls, doc: object) -> Hello:
        if not isinstance(doc, dict):
            raise TunnelError("the hello must be a JSON object")
        if doc.get("list") is True and "app" not in doc:
            return cls(list=True)
        app = doc.get("app")
        if not isinstance(app, str) or not app or len(app) > 253:
            raise TunnelError('the hello must be {"app": NAME} or {"list": true}')
        return cls(app=app)


@dataclass(frozen=True)
class SessionAnswer:
    """The proxy's answer to a session hello: ok with the app and the session's end."""

    app: str
    expires: datetime

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "app": self.app, "expires": _format_time(self.expires)}


def error_answer(message: str) -> dict[str, Any]:
    """The proxy's refusal of a hello: one line, no newline inside."""
    return {"error": " ".join(message.split())}


def parse_answer(doc: object) -> dict[str, Any]:
    """An answer line's object once it says ok; TunnelError with the proxy's reason otherwise."""
    if not isinstance(doc, dict):
        raise TunnelError("the access proxy answered with something other than a JSON object")
    if doc.get("ok") is True:
        return doc
    error = doc.get("error")
    if isinstance(error, str) and error:
        raise TunnelError(" ".join(error.split())[:1000])
    raise TunnelError("the access proxy answered neither ok nor an error")


def parse_session_answer(doc: object) -> SessionAnswer:
    """:class:`SessionAnswer` from an answer line (TunnelError for a refusal or junk)."""
    obj = parse_answer(doc)
    app, expires = obj.get("app"), obj.get("expires")
    if not isinstance(app, str) or not isinstance(expires, str):
        raise TunnelError("the access proxy's session answer lacks app or expires")
    try:
        when = datetime.fromisoformat(expires.replace("Z", "+00:00"))
    except ValueError:
        raise TunnelError("the access proxy's session answer has an invalid expires") from None
    if when.tzinfo is None:
        raise TunnelError("the access proxy's session answer has an expires without a zone")
    return SessionAnswer(app=app, expires=when)


def encode_line(value: Mapping[str, Any] | list[Any]) -> bytes:
    """``value`` as one compact UTF-8 JSON line ending in ``\\n``."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> Any:
    """The JSON value of one line (without or with its newline); TunnelError if not JSON."""
    try:
        return json.loads(line)
    except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
        raise TunnelError("a line is not valid UTF-8 JSON") from None


async def read_line(reader: asyncio.StreamReader, limit: int = MAX_LINE_BYTES) -> bytes | None:
    """The next non-empty line (with its newline), or None at end of stream.

    A line longer than ``limit`` is a TunnelError; the reader must have been created
    with a ``limit`` at least as large (see :func:`stream_limit`). A last line without
    a newline is returned as it is.
    """
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None
            line = exc.partial
        except asyncio.LimitOverrunError:
            raise TunnelError(f"a line is longer than {limit} bytes") from None
        if len(line) > limit:
            raise TunnelError(f"a line is longer than {limit} bytes")
        if line.strip():
            return line


def stream_limit() -> int:
    """The ``limit`` to open streams with so :func:`read_line` sees every allowed line."""
    return MAX_LINE_BYTES + 1


def _format_time(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")
