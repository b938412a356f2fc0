"""The JSON shapes shared by client and server: round trips and shape errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tbot_py.client import wire
from tbot_py.client.wire import WireError

KEYS = wire.PublicKeys(tls=b"-----BEGIN PUBLIC KEY-----\nabc\n", ssh=b"ecdsa-sha2-nistp256 AAAA\n")
EXPIRES = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _through_json(doc: object) -> object:
    """What the other side of the wire sees: the document serialised and parsed back."""
    return json.loads(json.dumps(doc))


# -- base64 and time --------------------------------------------------------------------


def test_b64_round_trips_arbitrary_bytes_with_padding() -> None:
    data = bytes(range(256))
    encoded = wire.b64encode(data)
    assert encoded.endswith("=")
    assert wire.b64decode(encoded, "field") == data


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "must be a base64 string"),
        (42, "must be a base64 string"),
        ("not base64!", "is not valid base64"),
        ("YWJj\n", "is not valid base64"),
        ("YWJjZA", "is not valid base64"),  # missing padding
    ],
)
def test_b64decode_rejects_non_base64_naming_the_field(value: object, problem: str) -> None:
    with pytest.raises(WireError) as err:
        wire.b64decode(value, "tls_ca_certs[3]")
    assert str(err.value) == f"tls_ca_certs[3] {problem}"


def test_format_time_converts_to_utc_with_z_suffix() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert wire.format_time(datetime(2025, 1, 2, 5, 4, 5, tzinfo=plus_two)) == (
        "2025-01-02T03:04:05Z"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-01-02T03:04:05Z", EXPIRES),
        ("2025-01-02T05:04:05+02:00", EXPIRES),
        # Go writes up to nanoseconds; Python keeps microseconds.
        ("2025-01-02T03:04:05.123456789Z", EXPIRES.replace(microsecond=123456)),
    ],
)
def test_parse_time_accepts_go_rfc3339_and_returns_utc(text: str, expected: datetime) -> None:
    parsed = wire.parse_time(text, "expires")
    assert parsed == expected
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (1735787045, "must be an RFC 3339 string"),
        (None, "must be an RFC 3339 string"),
        ("yesterday", "is not an RFC 3339 time"),
        ("2025-13-02T03:04:05Z", "is not an RFC 3339 time"),
        ("2025-01-02T03:04:05", "has no time zone"),
    ],
)
def test_parse_time_rejects_non_times_naming_the_field(value: object, problem: str) -> None:
    with pytest.raises(WireError) as err:
        wire.parse_time(value, "expires")
    assert str(err.value) == f"expires {problem}"


# -- Certs ------------------------------------------------------------------------------


def test_certs_round_trip_every_field() -> None:
    certs = wire.Certs(
        ssh=b"ssh-cert\n",
        tls=b"tls-pem",
        tls_ca_certs=(b"ca1", b"ca2"),
        ssh_ca_certs=(b"line1\n",),
    )
    assert wire.Certs.from_json(_through_json(certs.to_json())) == certs


def test_certs_accept_missing_or_null_ca_lists() -> None:
    doc = {"ssh": wire.b64encode(b"s"), "tls": wire.b64encode(b"t"), "tls_ca_certs": None}
    assert wire.Certs.from_json(doc) == wire.Certs(ssh=b"s", tls=b"t")


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ([], "expected a JSON object"),
        ({"tls": "dA=="}, "ssh must be a base64 string"),
        ({"ssh": "cw==", "tls": ""}, "response has no ssh or tls certificate"),
        ({"ssh": "cw==", "tls": "dA==", "tls_ca_certs": "Y2E="}, "tls_ca_certs must be a list"),
        ({"ssh": "cw==", "tls": "dA==", "ssh_ca_certs": ["!!"]}, "ssh_ca_certs[0] is not valid"),
    ],
)
def test_certs_of_the_wrong_shape_raise_wire_error(doc: object, problem: str) -> None:
    with pytest.raises(WireError, match=r"^" + problem.replace("[", r"\[").replace("]", r"\]")):
        wire.Certs.from_json(doc)


# -- requests ---------------------------------------------------------------------------


def test_register_request_round_trips_and_uses_teleports_keys() -> None:
    request = wire.RegisterUsingTokenRequest(token="tok", keys=KEYS, expires=EXPIRES)
    doc = request.to_json()
    assert doc["token"] == "tok"
    assert doc["role"] == "Bot"
    assert doc["hostID"] == ""
    assert doc["expires"] == "2025-01-02T03:04:05Z"
    assert doc["public_tls_key"] == wire.b64encode(KEYS.tls)
    assert doc["public_ssh_key"] == wire.b64encode(KEYS.ssh)
    assert wire.RegisterUsingTokenRequest.from_json(_through_json(doc)) == request


def test_register_request_without_expiry_omits_it() -> None:
    request = wire.RegisterUsingTokenRequest(token="tok", keys=KEYS)
    doc = request.to_json()
    assert "expires" not in doc
    assert wire.RegisterUsingTokenRequest.from_json(doc) == request
    assert wire.RegisterUsingTokenRequest.from_json({**doc, "expires": ""}).expires is None


def test_register_request_with_a_non_string_token_raises_wire_error() -> None:
    doc = wire.RegisterUsingTokenRequest(token="tok", keys=KEYS).to_json()
    with pytest.raises(WireError, match="token must be a string"):
        wire.RegisterUsingTokenRequest.from_json({**doc, "token": 5})
    del doc["token"]
    with pytest.raises(WireError, match="token must be a string"):
        wire.RegisterUsingTokenRequest.from_json(doc)


def test_register_request_with_a_bad_expiry_raises_wire_error() -> None:
    doc = wire.RegisterUsingTokenRequest(token="tok", keys=KEYS).to_json()
    with pytest.raises(WireError, match="expires is not an RFC 3339 time"):
        wire.RegisterUsingTokenRequest.from_json({**doc, "expires": "soon"})


def test_renew_request_round_trips_with_and_without_expiry() -> None:
    for request in (wire.RenewRequest(keys=KEYS, expires=EXPIRES), wire.RenewRequest(keys=KEYS)):
        assert wire.RenewRequest.from_json(_through_json(request.to_json())) == request


def test_renew_request_with_a_key_that_is_not_base64_raises_wire_error() -> None:
    doc = wire.RenewRequest(keys=KEYS).to_json()
    doc["public_ssh_key"] = "%%%"
    with pytest.raises(WireError, match="public_ssh_key is not valid base64"):
        wire.RenewRequest.from_json(doc)


def test_impersonate_request_round_trips_every_field() -> None:
    request = wire.ImpersonateRequest(
        keys=KEYS,
        expires=EXPIRES,
        role_requests=("access", "dev"),
        reissuable=True,
        route_to_cluster="leaf.example.com",
    )
    assert wire.ImpersonateRequest.from_json(_through_json(request.to_json())) == request


def test_impersonate_request_defaults_survive_missing_fields() -> None:
    doc = KEYS.to_json()
    assert wire.ImpersonateRequest.from_json(doc) == wire.ImpersonateRequest(keys=KEYS)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("role_requests", "access", "role_requests must be a list of strings"),
        ("role_requests", ["access", 1], "role_requests must be a list of strings"),
        ("reissuable", "true", "reissuable must be a boolean"),
        ("route_to_cluster", 7, "route_to_cluster must be a string"),
    ],
)
def test_impersonate_request_of_the_wrong_shape_raises_wire_error(
    field: str, value: object, problem: str
) -> None:
    doc = {**wire.ImpersonateRequest(keys=KEYS).to_json(), field: value}
    with pytest.raises(WireError, match=problem):
        wire.ImpersonateRequest.from_json(doc)


# -- CAs --------------------------------------------------------------------------------


def test_cert_authorities_round_trip() -> None:
    cas = [
        wire.CertAuthority(
            "host", "example.com", tls_certs=(b"pem1", b"pem2"), ssh_public_keys=(b"k1", b"k2")
        ),
        wire.CertAuthority("db", "example.com", tls_certs=(b"pem3",)),
    ]
    doc = _through_json(wire.cert_authorities_to_json(cas))
    assert wire.cert_authorities_from_json(doc) == cas


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({}, "cert_authorities must be a list"),
        ({"cert_authorities": {"type": "host"}}, "cert_authorities must be a list"),
        ({"cert_authorities": ["host"]}, "expected a JSON object"),
        ({"cert_authorities": [{"cluster_name": "c"}]}, "type must be a string"),
        (
            {"cert_authorities": [{"type": "host", "cluster_name": "c", "tls_certs": [1]}]},
            "tls_certs must be a list of strings",
        ),
    ],
)
def test_cert_authorities_of_the_wrong_shape_raise_wire_error(doc: object, problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        wire.cert_authorities_from_json(doc)


# -- ping -------------------------------------------------------------------------------


def test_ping_response_round_trips() -> None:
    ping = wire.PingResponse(
        cluster_name="example.com",
        server_version="17.0.0",
        proxy_public_addr="proxy.example.com:443",
        tls_routing_enabled=True,
        min_client_version="16.0.0",
    )
    assert wire.PingResponse.from_json(_through_json(ping.to_json())) == ping


def test_ping_response_accepts_an_integer_signature_suite() -> None:
    doc = wire.PingResponse(cluster_name="c", server_version="1").to_json()
    doc["auth"] = {"signature_algorithm_suite": 2}
    ping = wire.PingResponse.from_json(doc)
    assert isinstance(ping.signature_algorithm_suite, str)
    assert ping.signature_algorithm_suite != "legacy"


@pytest.mark.parametrize("suite", [0, "", None])
def test_ping_response_treats_an_unset_suite_as_legacy(suite: object) -> None:
    doc = wire.PingResponse(cluster_name="c", server_version="1").to_json()
    doc["auth"] = {"signature_algorithm_suite": suite}
    assert wire.PingResponse.from_json(doc).signature_algorithm_suite == "legacy"


def test_ping_response_tolerates_missing_or_odd_optional_sections() -> None:
    ping = wire.PingResponse.from_json(
        {"cluster_name": "c", "proxy": "not an object", "auth": ["nor", "this"]}
    )
    assert ping == wire.PingResponse(
        cluster_name="c",
        server_version="",
        proxy_public_addr="",
        tls_routing_enabled=False,
        signature_algorithm_suite="legacy",
    )


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ("find", "expected a JSON object"),
        ({"server_version": "1"}, "cluster_name must be a string"),
        ({"cluster_name": 5}, "cluster_name must be a string"),
        ({"cluster_name": "c", "server_version": 17}, "server_version must be a string"),
    ],
)
def test_ping_response_of_the_wrong_shape_raises_wire_error(doc: object, problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        wire.PingResponse.from_json(doc)


# -- errors -----------------------------------------------------------------------------


def test_error_message_reads_teleports_trace_error_body() -> None:
    assert wire.error_message(_through_json(wire.error_body("bad token"))) == "bad token"


@pytest.mark.parametrize(
    "doc",
    [None, "bad token", {"error": "bad token"}, {"error": {"message": 3}}, {"message": "x"}],
)
def test_error_message_is_none_for_other_documents(doc: object) -> None:
    assert wire.error_message(doc) is None
