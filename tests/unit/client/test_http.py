"""AuthClient: requests, response decoding and the mapping of every failure to one safe line.

Every test talks to a real server on 127.0.0.1: a scripted TLS server
(:mod:`.scripted_server`) that answers with the bytes a test chooses, or the real
auth service. The transport itself (framing, keep-alive, limits) is tested in
``test_http_transport.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
from collections.abc import Awaitable
from typing import Any, NamedTuple

import pytest

from tbot_py import __version__
from tbot_py.authservice.server import RunningAuthService
from tbot_py.client import tls, wire
from tbot_py.client.http import AuthClient, normalize_addr
from tbot_py.errors import (
    AccessDenied,
    BadParameter,
    ClientError,
    ConnectionProblem,
    LimitExceeded,
    NotFound,
    ProtocolError,
    ServerError,
    TrustError,
)
from tbot_py.identity import keys

from .scripted_server import (
    Answer,
    Call,
    Request,
    Script,
    ScriptedServer,
    fail,
    respond,
    respond_json,
    self_signed_ca_pem,
    served,
)

SECRET_TOKEN = "join-token-5f3a9c-never-show-me"
KEY = keys.generate_private_key()
PUBLIC_KEYS = wire.PublicKeys(
    tls=keys.public_key_pem(KEY.public_key()), ssh=keys.ssh_public_key_line(KEY.public_key())
)


def _is_url_of(url: str | None, path: str) -> bool:
    """True when ``url`` is ``path`` on a scripted server (its port differs per test)."""
    return (
        url is not None
        and re.fullmatch(r"https://127\.0\.0\.1:[0-9]+", url.removesuffix(path)) is not None
    )


def _register(client: AuthClient) -> Awaitable[wire.Certs]:
    return client.register_using_token(
        wire.RegisterUsingTokenRequest(token=SECRET_TOKEN, keys=PUBLIC_KEYS)
    )


def _answer(status: int, body: object) -> Script:
    return lambda request: respond_json(status, body)


CERTS = wire.Certs(ssh=b"ssh-cert\n", tls=b"tls-pem", tls_ca_certs=(b"ca",), ssh_ca_certs=(b"k",))
CAS = [wire.CertAuthority("host", "example.com", tls_certs=(b"pem",), ssh_public_keys=(b"k",))]
PING = wire.PingResponse(cluster_name="example.com", server_version="1.2.3")


class Case(NamedTuple):
    """One client call: what it sends, what the server answers, what it returns."""

    name: str
    method: str
    path: str
    call: Call
    doc: object
    expected: object


CALLS = [
    Case("ping", "GET", wire.PATH_FIND, lambda c: c.ping(), PING.to_json(), PING),
    Case("register", "POST", wire.PATH_JOIN, _register, CERTS.to_json(), CERTS),
    Case(
        "renew",
        "POST",
        wire.PATH_RENEW,
        lambda c: c.renew_bot(wire.RenewRequest(keys=PUBLIC_KEYS)),
        CERTS.to_json(),
        CERTS,
    ),
    Case(
        "impersonate",
        "POST",
        wire.PATH_CERTS,
        lambda c: c.issue_impersonated(
            wire.ImpersonateRequest(keys=PUBLIC_KEYS, role_requests=("dev",))
        ),
        CERTS.to_json(),
        CERTS,
    ),
    Case(
        "cas",
        "GET",
        wire.PATH_CAS,
        lambda c: c.cert_authorities(),
        wire.cert_authorities_to_json(CAS),
        CAS,
    ),
]
CALL_IDS = [c.name for c in CALLS]


# -- normalize_addr ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("auth.example.com", "auth.example.com:443"),
        ("auth.example.com:3025", "auth.example.com:3025"),
        ("https://auth.example.com", "auth.example.com:443"),
        ("https://auth.example.com:3025/", "auth.example.com:3025"),
        ("  auth.example.com:3025\n", "auth.example.com:3025"),
        ("127.0.0.1:3025", "127.0.0.1:3025"),
        ("[::1]:3025", "[::1]:3025"),
        ("[::1]", "[::1]:443"),
        ("https://[2001:db8::1]/", "[2001:db8::1]:443"),
    ],
)
def test_normalize_addr_gives_host_and_port(given: str, expected: str) -> None:
    assert normalize_addr(given) == expected


def test_client_base_url_is_https_with_the_normalized_address() -> None:
    client = AuthClient("https://auth.example.com/", tls.insecure_context())
    asyncio.run(client.close())
    assert client.addr == "auth.example.com:443"
    assert client.base_url == "https://auth.example.com:443"


# -- requests and decoding --------------------------------------------------------------


@pytest.mark.parametrize("case", CALLS, ids=CALL_IDS)
def test_each_call_uses_its_method_and_path_and_decodes_the_answer(case: Case) -> None:
    result, server = served(_answer(200, case.doc), case.call)
    assert result == case.expected
    [request] = server.requests
    assert request.method == case.method
    assert request.target == case.path
    assert request.headers["host"] == server.addr
    assert request.headers["user-agent"] == f"tbot-py/{__version__}"


def test_register_sends_the_request_as_json() -> None:
    _, server = served(_answer(200, CERTS.to_json()), _register)
    [request] = server.requests
    assert request.headers["content-type"] == "application/json"
    assert int(request.headers["content-length"]) == len(request.body)
    assert json.loads(request.body) == (
        wire.RegisterUsingTokenRequest(token=SECRET_TOKEN, keys=PUBLIC_KEYS).to_json()
    )


def test_export_ca_asks_for_the_type_and_returns_the_raw_body() -> None:
    script = lambda request: respond(200, b"PEM BYTES\n", "text/plain")  # noqa: E731
    result, server = served(script, lambda c: c.export_ca("tls-host"))
    assert result == b"PEM BYTES\n"
    assert [r.target for r in server.requests] == [f"{wire.PATH_EXPORT}?type=tls-host"]


def test_redirects_are_not_followed() -> None:
    def script(request: Request) -> Answer:
        return respond(302, headers={"Location": "/webapi/elsewhere"})

    err, server = served(script, lambda c: c.ping())
    assert type(err) is ProtocolError
    assert err.status == 302
    assert [r.target for r in server.requests] == [wire.PATH_FIND]


# -- HTTP status -> error class ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadParameter),
        (403, AccessDenied),
        (404, NotFound),
        (429, LimitExceeded),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (401, ProtocolError),
        (405, ProtocolError),
        (418, ProtocolError),
        (201, ProtocolError),
    ],
)
def test_status_maps_to_its_error_class_with_url_status_and_server_message(
    status: int, cls: type[ClientError]
) -> None:
    err = fail(_answer(status, wire.error_body("the server says no")), _register)
    assert type(err) is cls
    assert err.status == status
    assert _is_url_of(err.url, wire.PATH_JOIN)
    assert err.message == "the server says no"
    assert str(err) == f"{err.url} HTTP {status}: the server says no"


def test_no_content_answer_is_a_protocol_error_even_with_a_body() -> None:
    # HTTP 204 has no body by definition, so the server's message in it is not read.
    err = fail(_answer(204, wire.error_body("the server says no")), _register)
    assert type(err) is ProtocolError
    assert err.status == 204
    assert err.message == "unexpected answer (application/json)"


def test_server_message_is_squashed_to_one_line() -> None:
    message = "token\n  is   expired\r\n\tor\u2028unknown  "
    err = fail(_answer(403, wire.error_body(message)), _register)
    assert err.message == "token is expired or unknown"
    assert "\n" not in str(err)


def test_long_server_message_is_truncated_with_an_ellipsis() -> None:
    err = fail(_answer(500, wire.error_body("x" * 5000)), lambda c: c.ping())
    assert len(err.message) == 512
    assert err.message == "x" * 511 + "…"


def test_server_message_at_the_limit_is_kept_whole() -> None:
    err = fail(_answer(500, wire.error_body("y" * 512)), lambda c: c.ping())
    assert err.message == "y" * 512


def test_error_without_a_trace_body_names_the_content_type() -> None:
    script = lambda request: respond(502, b"<html>Bad Gateway</html>", "text/html")  # noqa: E731
    err = fail(script, lambda c: c.ping())
    assert type(err) is ServerError
    assert err.message == "unexpected answer (text/html)"


def test_error_body_that_is_json_of_another_shape_is_not_shown() -> None:
    err = fail(_answer(400, {"error": "flat string", "detail": "x"}), lambda c: c.ping())
    assert type(err) is BadParameter
    assert err.message == "unexpected answer (application/json)"


def test_error_never_contains_the_request_body_even_when_the_server_echoes_it() -> None:
    def script(request: Request) -> Answer:
        # A careless server (or a proxy error page) that reflects the request.
        return respond(403, request.body, "text/plain")

    err = fail(script, _register)
    assert type(err) is AccessDenied
    assert SECRET_TOKEN not in str(err)
    assert SECRET_TOKEN not in repr(err)
    assert err.__cause__ is None
    assert err.__context__ is None


def test_error_from_a_trace_body_does_not_contain_the_token() -> None:
    err = fail(_answer(403, wire.error_body("the token is not valid")), _register)
    assert SECRET_TOKEN not in str(err)
    assert str(err).endswith("HTTP 403: the token is not valid")


# -- bodies that do not decode ----------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"<html>hello</html>", b"", b"\xff\xfe\x00garbage", b'{"ssh": '], ids=repr
)
def test_ok_answer_that_is_not_json_is_a_protocol_error(body: bytes) -> None:
    err = fail(lambda request: respond(200, body, content_type=None), _register)
    assert type(err) is ProtocolError
    assert _is_url_of(err.url, wire.PATH_JOIN)
    assert err.status is None
    assert "not JSON" in err.message


@pytest.mark.parametrize("case", CALLS, ids=CALL_IDS)
def test_ok_answer_of_the_wrong_shape_is_a_protocol_error_naming_the_field(case: Case) -> None:
    err = fail(_answer(200, {"cluster_authorities": 1, "ssh": 5}), case.call)
    assert type(err) is ProtocolError
    assert _is_url_of(err.url, case.path)
    field = {"ping": "cluster_name", "cas": "cert_authorities"}.get(case.name, "ssh")
    assert err.message.startswith(f"unexpected response: {field} must be ")


def test_ok_answer_that_is_a_json_list_is_a_protocol_error() -> None:
    err = fail(_answer(200, [CERTS.to_json()]), _register)
    assert type(err) is ProtocolError
    assert err.message == "unexpected response: expected a JSON object"


def test_ok_answer_with_a_broken_content_encoding_is_a_protocol_error() -> None:
    # We never ask for compression, so a compressed answer is not one we can read.
    script = lambda r: respond(200, b"not gzip", headers={"Content-Encoding": "gzip"})  # noqa: E731
    err = fail(script, lambda c: c.ping())
    assert type(err) is ProtocolError
    assert "Content-Encoding 'gzip'" in err.message


# -- transport failures, classified -----------------------------------------------------


def test_timeout_is_a_connection_problem() -> None:
    err = fail(lambda r: Answer(delay=60), _register, timeout=0.2)
    assert type(err) is ConnectionProblem
    assert err.message == "timed out waiting for the auth service"
    assert _is_url_of(err.url, wire.PATH_JOIN)


def test_broken_http_is_a_protocol_error() -> None:
    err = fail(lambda r: Answer(b"ILLEGAL STATUS LINE\r\n\r\n"), lambda c: c.ping())
    assert type(err) is ProtocolError
    assert (
        err.message == "server broke the HTTP protocol: invalid status line 'ILLEGAL STATUS LINE'"
    )


def test_certificate_verification_failure_is_a_trust_error_naming_the_reason() -> None:
    _, other_ca = self_signed_ca_pem("someone-else")

    async def main() -> None:
        async with (
            ScriptedServer(_answer(200, PING.to_json())) as server,
            AuthClient(server.addr, tls.verified_context(other_ca.decode())) as client,
        ):
            await client.ping()

    with pytest.raises(ClientError) as err:
        asyncio.run(main())
    assert type(err.value) is TrustError
    assert err.value.message.startswith(
        "cannot verify the server's TLS certificate (self-signed certificate)"
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _call_real(addr: str, ctx: ssl.SSLContext, call: Call) -> Any:
    async with AuthClient(addr, ctx, timeout=5.0) as client:
        return await call(client)


def test_client_pings_a_real_auth_service_it_trusts(service: RunningAuthService) -> None:
    cadata = b"".join(service.cluster.cas.tls_ca_certs).decode()
    ping = asyncio.run(_call_real(service.addr, tls.verified_context(cadata), lambda c: c.ping()))
    assert ping.cluster_name == service.cluster_name


def test_real_join_refusal_is_access_denied_without_the_token(
    service: RunningAuthService,
) -> None:
    cadata = b"".join(service.cluster.cas.tls_ca_certs).decode()
    with pytest.raises(AccessDenied) as err:
        asyncio.run(_call_real(service.addr, tls.verified_context(cadata), _register))
    assert err.value.status == 403
    assert "token is not valid" in err.value.message
    assert SECRET_TOKEN not in str(err.value)


def test_refused_connection_is_a_connection_problem() -> None:
    addr = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(ClientError) as err:
        asyncio.run(_call_real(addr, tls.insecure_context(), lambda c: c.ping()))
    assert type(err.value) is ConnectionProblem
    assert err.value.url == f"https://{addr}{wire.PATH_FIND}"
    assert err.value.message.startswith("cannot reach the auth service")


def test_server_signed_by_another_ca_is_a_trust_error(service: RunningAuthService) -> None:
    _, other_ca = self_signed_ca_pem("someone-else")
    with pytest.raises(ClientError) as err:
        asyncio.run(
            _call_real(service.addr, tls.verified_context(other_ca.decode()), lambda c: c.ping())
        )
    assert type(err.value) is TrustError
    assert "cannot verify the server's TLS certificate" in err.value.message


def test_server_unknown_to_the_system_store_is_a_trust_error(
    service: RunningAuthService,
) -> None:
    with pytest.raises(ClientError) as err:
        asyncio.run(_call_real(service.addr, tls.verified_context(), lambda c: c.ping()))
    assert type(err.value) is TrustError


def test_plain_tcp_server_answering_garbage_is_a_tls_protocol_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello has arrived
        writer.write(b"SSH-2.0-OpenSSH_9.6 this is not TLS\r\n" * 4)
        await writer.drain()
        writer.close()

    async def main() -> ClientError:
        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            try:
                await _call_real(f"127.0.0.1:{port}", tls.insecure_context(), lambda c: c.ping())
            except ClientError as exc:
                return exc
        raise AssertionError("the call succeeded")

    err = asyncio.run(main())
    assert type(err) is ProtocolError
    assert "TLS handshake failed" in err.message


def test_plain_text_error_of_a_bodyless_request_keeps_the_servers_reason() -> None:
    reason = b"found 2 authorities to export, use format=zip\n"
    script = lambda r: respond(400, reason, "text/plain; charset=utf-8")  # noqa: E731
    err = fail(script, lambda c: c.export_ca("tls-host"))
    assert type(err) is BadParameter
    assert err.message == "found 2 authorities to export, use format=zip"
