"""The client's HTTP/1.1 transport against a scripted TLS server on 127.0.0.1.

Bodies are fetched with ``export_ca``, which returns the raw body; framing,
keep-alive, the one retry on a connection the server dropped, limits, timeouts
and malformed answers are each driven by what the server writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import warnings
from collections.abc import Awaitable

import pytest

from tbot_py.client import _http1, tls, wire
from tbot_py.client.http import AuthClient
from tbot_py.errors import ConnectionProblem, ProtocolError

from .scripted_server import Answer, Request, ScriptedServer, fail, respond, served

EXPORT = f"{wire.PATH_EXPORT}?type=tls-host"
OK = respond(200, b"PEM", "text/plain")


def _export(client: AuthClient) -> Awaitable[bytes]:
    return client.export_ca("tls-host")


async def _export_times(client: AuthClient, count: int) -> list[bytes]:
    return [await client.export_ca("tls-host") for _ in range(count)]


def _raw(text: str) -> Answer:
    """An answer written byte for byte; ``\\n`` in ``text`` is sent as CRLF."""
    return Answer(text.replace("\n", "\r\n").encode("latin-1"))


# -- framing ----------------------------------------------------------------------------


def test_chunked_body_is_joined_and_extensions_and_trailers_are_skipped() -> None:
    answer = _raw(
        "HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n"
        "4;name=value\nPEM \n0a\nBYTES 6789\n0\nTrailer: x\n\n"
    )
    result, server = served(lambda r: answer, lambda c: _export_times(c, 2))
    assert result == [b"PEM BYTES 6789"] * 2
    assert server.connections == 1  # the chunked body ended where it should


def test_body_ended_by_closing_the_connection_is_read_whole() -> None:
    answer = Answer(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100_000, close=True)
    result, server = served(lambda r: answer, lambda c: _export_times(c, 2))
    assert result == [b"x" * 100_000] * 2
    assert server.connections == 2


def test_informational_answers_before_the_real_one_are_skipped() -> None:
    answer = _raw(
        "HTTP/1.1 103 Early Hints\nLink: </x>\n\nHTTP/1.1 200 OK\nContent-Length: 3\n\nPEM"
    )
    assert served(lambda r: answer, _export)[0] == b"PEM"


def test_request_target_is_percent_encoded_and_escapes_are_kept() -> None:
    _, server = served(lambda r: OK, lambda c: c.export_ca("a b/é%2F"))
    assert [r.target for r in server.requests] == [f"{wire.PATH_EXPORT}?type=a%20b/%C3%A9%2F"]


def test_ipv6_literal_address_is_reached_and_named_in_the_host_header() -> None:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
    result, server = served(lambda r: OK, _export, host="::1")
    assert result == b"PEM"
    assert server.addr.startswith("[::1]:")
    assert server.requests[0].headers["host"] == server.addr


def test_address_without_a_numeric_port_is_a_connection_problem() -> None:
    with pytest.raises(ConnectionProblem, match="not host:port"):
        AuthClient("auth.example.com:https", tls.insecure_context())


# -- keep-alive and the one retry -------------------------------------------------------


def test_sequential_requests_share_one_connection() -> None:
    result, server = served(lambda r: OK, lambda c: _export_times(c, 5))
    assert result == [b"PEM"] * 5
    assert server.connections == 1
    assert [r.connection for r in server.requests] == [1] * 5


def test_concurrent_requests_keep_their_connections_for_the_next_round() -> None:
    async def main() -> tuple[int, int, int]:
        async with (
            ScriptedServer(lambda r: OK) as server,
            AuthClient(server.addr, tls.insecure_context()) as client,
        ):
            rounds = []
            for _ in range(2):
                await asyncio.gather(*(_export(client) for _ in range(_http1.MAX_IDLE)))
                rounds.append(server.connections)
            return rounds[0], rounds[1], len(server.requests)

    first, second, requests = asyncio.run(main())
    assert 1 <= first <= _http1.MAX_IDLE
    assert second == first  # the second round opened no connection
    assert requests == 2 * _http1.MAX_IDLE


@pytest.mark.parametrize(
    "answer",
    [
        respond(200, b"PEM", headers={"Connection": "close"}),
        respond(200, b"PEM", headers={"Connection": "keep-alive, Close"}),
        _raw("HTTP/1.0 200 OK\nContent-Length: 3\n\nPEM"),
    ],
    ids=["connection-close", "close-in-a-list", "http-1.0"],
)
def test_connection_the_server_asks_to_close_is_not_reused(answer: Answer) -> None:
    # The server leaves the connection open: only the client's choice decides.
    result, server = served(lambda r: answer, lambda c: _export_times(c, 2))
    assert result == [b"PEM"] * 2
    assert [r.connection for r in server.requests] == [1, 2]


def test_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def main() -> list[int]:
        async with (
            ScriptedServer(lambda r: Answer(OK.data, close=True)) as server,
            AuthClient(server.addr, tls.insecure_context()) as client,
        ):
            assert await _export(client) == b"PEM"
            await server.wait_until_ended(1)
            await asyncio.sleep(0.05)  # for the client's side to see the end as well
            assert await _export(client) == b"PEM"
        return [r.connection for r in server.requests]

    assert asyncio.run(main()) == [1, 2]


def test_request_dropped_unanswered_on_a_reused_connection_is_sent_once_more() -> None:
    def script(request: Request) -> Answer:
        # The race of a server closing an idle connection just as the request is sent.
        return Answer(close=True) if request.number == 2 else OK

    result, server = served(script, lambda c: _export_times(c, 3))
    assert result == [b"PEM"] * 3
    assert [r.connection for r in server.requests] == [1, 1, 2, 2]


def test_request_dropped_unanswered_on_a_fresh_connection_is_not_retried() -> None:
    err, server = served(lambda r: Answer(close=True), _export)
    assert type(err) is ProtocolError
    assert "closed the connection without sending a complete response" in err.message
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 2",
        b"HTTP/1.1 200 OK\r\nContent-Len",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nPEM",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nPEM\r\n",
    ],
    ids=["status-line", "head", "body", "chunked-body"],
)
def test_answer_cut_short_on_a_reused_connection_is_an_error_and_not_retried(
    partial: bytes,
) -> None:
    def script(request: Request) -> Answer:
        return OK if request.number == 1 else Answer(partial, close=True)

    err, server = served(script, lambda c: _export_times(c, 2))
    assert type(err) is ProtocolError
    assert "closed the connection" in err.message
    assert [r.connection for r in server.requests] == [1, 1]


# -- limits and malformed answers -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("HTTP/1.1 200 " + "x" * 9000 + "\n\n", "longer than 8192 bytes"),
        ("HTTP/1.1 200 OK\nX-Big: " + "x" * 9000 + "\n\n", "longer than 8192 bytes"),
        ("HTTP/1.1 200 OK\n" + "X-Many: 1\n" * 101 + "\n", "more than 100 header lines"),
        ("HTTP/1.1 200 OK\nContent-Length: 16777217\n\n", "larger than 16 MiB"),
        ("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n1000001\n", "larger than 16 MiB"),
    ],
    ids=["status-line", "header-line", "header-count", "content-length", "chunk"],
)
def test_oversized_answer_is_a_protocol_error(text: str, expected: str) -> None:
    err = fail(lambda r: _raw(text), _export)
    assert type(err) is ProtocolError
    assert expected in err.message


def test_body_ended_by_closing_the_connection_is_capped_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_http1, "MAX_BODY", 1024 * 1024)
    answer = Answer(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (1024 * 1024 + 1), close=True)
    err = fail(lambda r: answer, _export)
    assert type(err) is ProtocolError
    assert "larger than 1 MiB" in err.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("HTTP/2 200 OK\n\n", "invalid status line 'HTTP/2 200 OK'"),
        ("HTTP/1.1 20 OK\n\n", "invalid status line"),
        ("HTTP/1.1 200 OK\nno colon here\n\n", "invalid header line 'no colon here'"),
        ("HTTP/1.1 200 OK\nName : value\n\n", "invalid header line"),
        ("HTTP/1.1 200 OK\nA: b\n  folded\n\n", "invalid header line"),
        ("HTTP/1.1 200 OK\nContent-Length: -1\n\n", "invalid Content-Length '-1'"),
        ("HTTP/1.1 200 OK\nContent-Length: 3\nContent-Length: 3\n\nPEM", "invalid Content-Length"),
        (
            "HTTP/1.1 200 OK\nContent-Length: 3\nTransfer-Encoding: chunked\n\n",
            "both Content-Length and Transfer-Encoding",
        ),
        ("HTTP/1.1 200 OK\nTransfer-Encoding: gzip\n\n", "unsupported Transfer-Encoding"),
        ("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\nzz\n", "invalid chunk size line 'zz'"),
        ("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nPEMxx", "not followed by CRLF"),
        ("HTTP/1.1 101 Switching Protocols\nUpgrade: h2c\n\n", "switched protocols"),
        ("HTTP/1.1 103 Early Hints\nLink: </x>\n\n" * 11, "more than 10 1xx answers"),
    ],
    ids=lambda value: value.split("\n")[1][:30] if "\n" in value else None,
)
def test_malformed_answer_is_a_protocol_error_naming_the_problem(text: str, expected: str) -> None:
    err = fail(lambda r: _raw(text), _export)
    assert type(err) is ProtocolError
    assert err.message.startswith("server broke the HTTP protocol: ")
    assert expected in err.message


# -- timeouts ---------------------------------------------------------------------------


def test_server_that_never_finishes_the_tls_handshake_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await reader.read()  # until the client gives up, or the test ends
        writer.transport.abort()

    async def main() -> BaseException:
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with (
            server,
            AuthClient(f"127.0.0.1:{port}", tls.insecure_context(), timeout=0.2) as c,
        ):
            with pytest.raises(ConnectionProblem) as err:
                await c.ping()
        return err.value

    err = asyncio.run(main())
    assert err.message == "timed out waiting for the auth service"


def test_server_that_stops_in_the_middle_of_a_body_times_out() -> None:
    answer = Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nPEM")  # and nothing more
    err = fail(lambda r: answer, _export, timeout=0.2)
    assert type(err) is ConnectionProblem
    assert err.message == "timed out waiting for the auth service"


# -- closing ----------------------------------------------------------------------------


def test_close_ends_every_pooled_connection_without_resource_warnings() -> None:
    async def main() -> ScriptedServer:
        async with ScriptedServer(lambda r: OK) as server:
            client = AuthClient(server.addr, tls.insecure_context())
            await asyncio.gather(*(_export(client) for _ in range(3)))
            await client.close()
            await server.wait_until_ended(server.connections)
            with pytest.raises(RuntimeError, match="closed"):
                await _export(client)
        return server

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server = asyncio.run(main())
        gc.collect()
    assert server.connections >= 1
    assert server.ended == server.connections
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
