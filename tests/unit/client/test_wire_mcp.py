"""The MCP access proxy's JSON shapes: round trips, PEM as text, and shape errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tbot_py.client import wire
from tbot_py.client.wire import WireError

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
EXPIRES = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
WEATHER = wire.MCPApp(
    name="weather",
    uri="mcp+stdio://",
    labels={"env": "dev"},
    description="Forecasts",
    headers=("Authorization: Bearer {{internal.jwt}}",),
    command="python3",
    args=("server.py", "--quiet"),
    source="config",
)
ROLE = {"kind": "role", "version": "v7", "metadata": {"name": "mcp-dev"}, "spec": {}}


def _through_json(doc: object) -> Any:
    """What the other side of the wire sees: the document serialised and parsed back."""
    return json.loads(json.dumps(doc))


@pytest.mark.parametrize(
    "value",
    [
        WEATHER,
        wire.MCPApp(name="inventory", uri="mcp+http://127.0.0.1:8000/mcp", labels={}),
        wire.MCPSessionRequest(client_cert=PEM, app="weather"),
        wire.MCPSessionRequest(client_cert=PEM, app="weather", config_app=WEATHER, jwt=True),
        wire.MCPSessionResponse(
            user="bot-agent", bot="agent", roles=(ROLE,), app=WEATHER, expires=EXPIRES, jwt="a.b.c"
        ),
        wire.MCPSessionResponse(
            user="bot-agent", bot="agent", roles=(), app=WEATHER, expires=EXPIRES
        ),
        wire.MCPAppsRequest(client_cert=PEM),
        wire.MCPAppsRequest(client_cert=PEM, config_apps=(WEATHER,)),
        wire.MCPAppsResponse(user="bot-agent", roles=(ROLE,), apps=(WEATHER,)),
        wire.TLSServerCertRequest(public_key=PEM, dns_names=("mcp.example.com", "127.0.0.1")),
        wire.TLSServerCertRequest(public_key=PEM, dns_names=("::1",), expires=EXPIRES),
        wire.TLSServerCertResponse(cert=PEM, host_ca=PEM + b"host", user_ca=PEM + b"user"),
    ],
    ids=lambda value: type(value).__name__,
)
def test_mcp_shapes_round_trip_through_json(value: Any) -> None:
    assert type(value).from_json(_through_json(value.to_json())) == value


def test_pem_fields_are_text_and_times_rfc3339() -> None:
    doc = wire.MCPSessionRequest(client_cert=PEM, app="weather").to_json()
    assert doc["client_cert"] == PEM.decode()
    answer = wire.MCPSessionResponse(
        user="bot-agent", bot="agent", roles=(), app=WEATHER, expires=EXPIRES
    ).to_json()
    assert answer["expires"] == "2025-01-02T03:04:05Z"
    assert "jwt" not in answer
    assert wire.TLSServerCertResponse(cert=PEM, host_ca=PEM, user_ca=PEM).to_json()["cert"] == (
        PEM.decode()
    )


def test_an_app_without_optional_fields_gets_the_defaults() -> None:
    app = wire.MCPApp.from_json({"name": "w", "uri": "mcp+stdio://"})
    assert app == wire.MCPApp(name="w", uri="mcp+stdio://", labels={})
    assert (app.source, app.headers, app.args) == ("resource", (), ())


def test_the_jwt_is_not_in_the_repr() -> None:
    answer = wire.MCPSessionResponse(
        user="bot-agent", bot="agent", roles=(), app=WEATHER, expires=EXPIRES, jwt="secret.jwt"
    )
    assert "secret.jwt" not in repr(answer)


APP = {"name": "w", "uri": "mcp+stdio://"}


@pytest.mark.parametrize(
    ("cls", "doc", "problem"),
    [
        (wire.MCPApp, [], "expected a JSON object"),
        (wire.MCPApp, {"uri": "mcp+stdio://"}, "name must be a string"),
        (wire.MCPApp, {"name": "", "uri": "mcp+stdio://"}, "an MCP app needs a name and a uri"),
        (wire.MCPApp, {**APP, "labels": {"env": 1}}, "labels must map strings to strings"),
        (wire.MCPApp, {**APP, "labels": ["env"]}, "labels must map strings to strings"),
        (wire.MCPApp, {**APP, "args": "server.py"}, "args must be a list of strings"),
        (wire.MCPApp, {**APP, "headers": [1]}, "headers must be a list of strings"),
        (wire.MCPApp, {**APP, "source": "disk"}, "source must be resource or config"),
        (wire.MCPSessionRequest, {"app": "w"}, "client_cert must be a string"),
        (wire.MCPSessionRequest, {"client_cert": "", "app": "w"}, "client_cert must not be empty"),
        (wire.MCPSessionRequest, {"client_cert": "x", "app": ""}, "app must not be empty"),
        (wire.MCPSessionRequest, {"client_cert": "x", "app": "w", "jwt": "yes"},
         "jwt must be a boolean"),
        (wire.MCPSessionRequest, {"client_cert": "x", "app": "w", "config_app": "w"},
         "expected a JSON object"),
        (wire.MCPSessionResponse,
         {"user": "u", "bot": "b", "roles": ["r"], "app": APP, "expires": "2025-01-02T03:04:05Z"},
         "roles must be a list of JSON objects"),
        (wire.MCPSessionResponse, {"user": "u", "bot": "b", "app": APP, "expires": "tomorrow"},
         "expires is not an RFC 3339 time"),
        (wire.MCPAppsRequest, {"client_cert": "x", "config_apps": {}},
         "config_apps must be a list"),
        (wire.MCPAppsResponse, {"user": "u", "apps": [{"name": "w"}]}, "uri must be a string"),
        (wire.TLSServerCertRequest, {"public_key": "x"}, "dns_names must be a list of 1 to 16"),
        (wire.TLSServerCertRequest, {"public_key": "x", "dns_names": []},
         "dns_names must be a list of 1 to 16"),
        (wire.TLSServerCertRequest, {"public_key": "x", "dns_names": [f"h{i}" for i in range(17)]},
         "dns_names must be a list of 1 to 16"),
        (wire.TLSServerCertRequest, {"public_key": "x", "dns_names": [""]},
         "dns_names must be a list of 1 to 16 non-empty strings"),
        (wire.TLSServerCertRequest, {"dns_names": ["a"]}, "public_key must be a string"),
        (wire.TLSServerCertRequest, {"public_key": "x", "dns_names": ["a"], "expires": 5},
         "expires must be an RFC 3339 string"),
        (wire.TLSServerCertResponse, {"cert": "x", "host_ca": "y"}, "user_ca must be a string"),
    ],
)  # fmt: skip
def test_bad_mcp_documents_raise_a_wire_error_naming_the_field(
    cls: Any, doc: object, problem: str
) -> None:
    with pytest.raises(WireError, match=problem):
        cls.from_json(doc)
