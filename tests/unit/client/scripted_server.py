"""A scripted HTTPS server on 127.0.0.1 for the client's tests.

It answers each request with the exact bytes a test returns, so status handling,
framing, keep-alive and broken servers are all tested against a real TLS socket.
It records every request and counts the connections it accepted and saw end.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from tbot_py.client import tls
from tbot_py.client.http import AuthClient
from tbot_py.errors import ClientError
from tbot_py.identity import keys


@dataclass(frozen=True)
class Request:
    """A request as the server received it; header names are lower case."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int  # 1 for the first connection the server accepted, 2 for the next...
    number: int  # 1 for the first request the server received, 2 for the next...


@dataclass(frozen=True)
class Answer:
    """What the server does with one request."""

    data: bytes = b""  # written as they are
    close: bool = False  # then close the connection (at once when ``data`` is empty)
    delay: float = 0.0  # seconds to wait before writing


Script = Callable[[Request], Answer]
Call = Callable[[AuthClient], Awaitable[Any]]


def respond(
    status: int = 200,
    body: bytes = b"",
    content_type: str | None = "application/json",
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """A well-formed HTTP/1.1 answer with a Content-Length."""
    lines = [f"HTTP/1.1 {status} Whatever", f"Content-Length: {len(body)}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return Answer(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def respond_json(status: int, doc: object) -> Answer:
    return respond(status, json.dumps(doc).encode())


def self_signed_ca_pem(org: str) -> tuple[keys.PrivateKey, bytes]:
    """A fresh self-signed CA certificate (valid for localhost) and its key."""
    key = keys.generate_private_key()
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM)


@functools.cache
def server_context() -> ssl.SSLContext:
    """One self-signed server identity for every scripted server of the test run."""
    key, cert_pem = self_signed_ca_pem("scripted")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_client_identity(ctx, cert_pem, keys.private_key_pem(key))
    return ctx


@dataclass
class ScriptedServer:
    """Answers each request with ``script(request)``; use as ``async with``."""

    script: Script
    host: str = "127.0.0.1"
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    ended: int = 0  # connections the client closed or broke
    addr: str = ""  # host:port once started
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._handle, self.host, 0, ssl=server_context())
        port = self._server.sockets[0].getsockname()[1]
        self.addr = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def wait_until_ended(self, count: int) -> None:
        """Until ``count`` connections have ended (the client closed them), for at most 5 s."""
        async with asyncio.timeout(5):
            while self.ended < count:
                await asyncio.sleep(0.01)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        number = self.connections
        try:
            while (request := await self._read_request(reader, number)) is not None:
                self.requests.append(request)
                answer = self.script(request)
                await asyncio.sleep(answer.delay)
                writer.write(answer.data)
                await writer.drain()
                if answer.close:
                    break
        except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
            # The client went away, or the test is over (__aexit__ cancels a handler that
            # still waits). Ending normally keeps asyncio from logging the cancellation.
            pass
        finally:
            self.ended += 1
            writer.transport.abort()

    async def _read_request(self, reader: asyncio.StreamReader, connection: int) -> Request | None:
        """The next request, or None when the client ended the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        request_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
        method, target, _ = request_line.split(" ")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return Request(method, target, headers, body, connection, len(self.requests) + 1)


def served(
    script: Script, call: Call, *, timeout: float = 5.0, host: str = "127.0.0.1"
) -> tuple[Any, ScriptedServer]:
    """``call``'s result (or the ClientError it raised) on a client of a fresh server."""

    async def main() -> tuple[Any, ScriptedServer]:
        async with (
            ScriptedServer(script, host) as server,
            AuthClient(server.addr, tls.insecure_context(), timeout=timeout) as client,
        ):
            try:
                return await call(client), server
            except ClientError as exc:
                return exc, server

    return asyncio.run(main())


def fail(script: Script, call: Call, *, timeout: float = 5.0) -> ClientError:
    """The ClientError ``call`` raises on a client of a fresh server."""
    err, _ = served(script, call, timeout=timeout)
    assert isinstance(err, ClientError), f"the call succeeded with {err!r}"
    return err
