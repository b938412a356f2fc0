"""The MCP access proxy's endpoints over real TLS: sessions, the app list, the server cert."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tbot_py.authservice import admin, audit, ca
from tbot_py.authservice.apps import app_from_data
from tbot_py.authservice.roles import ResourceRule, RoleConditions, new_role
from tbot_py.client import wire
from tbot_py.client.http import AuthClient as HTTPAuthClient
from tbot_py.client.tls import mtls_context
from tbot_py.errors import AccessDenied
from tbot_py.identity import keys

from .conftest import AuthClient, Issued

PROXY_ROLE = new_role(
    "mcp-proxy",
    allow=RoleConditions(
        rules=(ResourceRule(resources=("app_session", "host_cert"), verbs=("create",)),)
    ),
)
DEV_APPS = new_role("mcp-dev", allow=RoleConditions.model_validate({"app_labels": {"env": "dev"}}))
NO_SECRETS = new_role(
    "no-secrets", deny=RoleConditions.model_validate({"app_labels": {"team": "secret"}})
)

APPS: list[dict[str, Any]] = [
    {
        "metadata": {"name": "weather", "labels": {"env": "dev"}, "description": "Forecasts"},
        "spec": {"uri": "mcp+stdio://", "mcp": {"command": "python3", "args": ["server.py"]}},
    },
    {
        "metadata": {"name": "inventory", "labels": {"env": "dev"}},
        "spec": {
            "uri": "mcp+http://127.0.0.1:8000/mcp",
            "rewrite": {"headers": ["Authorization: Bearer {{internal.id_token}}"]},
        },
    },
    {
        "metadata": {"name": "billing", "labels": {"env": "prod"}},
        "spec": {"uri": "mcp+https://billing.example.com/mcp"},
    },
    {
        "metadata": {"name": "vault", "labels": {"env": "dev", "team": "secret"}},
        "spec": {"uri": "mcp+stdio://", "mcp": {"command": "vault-mcp"}},
    },
    {"metadata": {"name": "grafana", "labels": {"env": "dev"}}, "spec": {"uri": "http://g:3000"}},
]


# -- set-up --------------------------------------------------------------------------------------


def _setup(client: AuthClient) -> None:
    for role in (PROXY_ROLE, DEV_APPS, NO_SECRETS):
        admin.create_role(client.cluster, role)
    for data in APPS:
        admin.create_resource(client.cluster, app_from_data({"kind": "app", **data}))


def _output(client: AuthClient, bot: Issued, **fields: object) -> Issued:
    """An identity output of ``bot`` (impersonated, as the daemon writes it)."""
    resp, key = client.impersonate(bot, **fields)
    assert resp.status_code == 200, resp.text
    return client.save(key, wire.Certs.from_json(resp.json()))


def _bot(client: AuthClient, name: str, roles: tuple[str, ...], *, hours: int = 1) -> Issued:
    created = admin.add_bot(client.cluster, name, roles=roles, logins=())
    return client.join(created.token.token, expires=datetime.now(UTC) + timedelta(hours=hours))


@pytest.fixture
def proxy_bot(client: AuthClient) -> Issued:
    """Bot "proxy" holding the mcp-proxy role, joined (its own certificate)."""
    _setup(client)
    return _bot(client, "proxy", ("mcp-proxy",))


@pytest.fixture
def proxy(client: AuthClient, proxy_bot: Issued) -> Issued:
    """The proxy's identity output: what the access proxy presents to the auth service."""
    return _output(client, proxy_bot)


@pytest.fixture
def agent_bot(client: AuthClient, proxy_bot: Issued) -> Issued:
    """Bot "agent" with roles mcp-dev and no-secrets, joined for 4h."""
    return _bot(client, "agent", ("mcp-dev", "no-secrets"), hours=4)


@pytest.fixture
def agent(client: AuthClient, agent_bot: Issued) -> Issued:
    """The identity output an MCP client of bot "agent" presents to the proxy."""
    return _output(client, agent_bot)


def _post(client: AuthClient, caller: Issued, path: str, body: dict[str, Any]) -> httpx.Response:
    return client.request("POST", path, identity=caller, json=body)


def _session(
    client: AuthClient, proxy: Issued, agent: Issued | bytes, app: str, **fields: Any
) -> httpx.Response:
    pem = agent if isinstance(agent, bytes) else agent.certs.tls
    req = wire.MCPSessionRequest(client_cert=pem, app=app, **fields)
    return _post(client, proxy, wire.PATH_MCP_SESSION, req.to_json())


def _refusal(resp: httpx.Response) -> tuple[int, str | None]:
    return resp.status_code, wire.error_message(resp.json())


def _events(client: AuthClient, event: str) -> list[dict[str, Any]]:
    lines = audit.audit_log_path(client.cluster.data_dir).read_text().splitlines()
    return [doc for doc in map(json.loads, lines) if doc["event"] == event]


# -- sessions ------------------------------------------------------------------------------------


def test_a_session_is_allowed_when_a_role_matches_the_app_labels(
    client: AuthClient, proxy: Issued, agent: Issued
) -> None:
    resp = _session(client, proxy, agent, "weather")
    assert resp.status_code == 200, resp.text
    answer = wire.MCPSessionResponse.from_json(resp.json())
    assert (answer.user, answer.bot, answer.jwt) == ("bot-agent", "agent", "")
    assert [role["metadata"]["name"] for role in answer.roles] == ["mcp-dev", "no-secrets"]
    assert answer.app == wire.MCPApp(
        name="weather",
        uri="mcp+stdio://",
        labels={"env": "dev"},
        description="Forecasts",
        command="python3",
        args=("server.py",),
        source="resource",
    )
    assert answer.expires == agent.cert.not_valid_after_utc
    (event,) = _events(client, "proxy.mcp.session")
    assert event["success"] is True
    assert event["actor"]["bot"] == "proxy"
    assert event["resource"] == "app/weather"
    assert event["details"]["user"] == "bot-agent"
    assert event["details"]["app"] == "weather"
    assert event["details"]["allowed"] is True


def test_a_resource_app_keeps_its_rewrite_headers(
    client: AuthClient, proxy: Issued, agent: Issued
) -> None:
    resp = _session(client, proxy, agent, "inventory")
    assert resp.status_code == 200, resp.text
    app = wire.MCPSessionResponse.from_json(resp.json()).app
    assert app.headers == ("Authorization: Bearer {{internal.id_token}}",)
    assert (app.uri, app.command) == ("mcp+http://127.0.0.1:8000/mcp", "")


@pytest.mark.parametrize(
    ("app", "refusal"),
    [
        ("billing",
         (403, 'bot "agent" may not access app "billing": no role allows app "billing"')),
        ("vault",
         (403, 'bot "agent" may not access app "vault": denied by role "no-secrets": '
               "app_labels team=secret")),
        ("ghost", (404, 'app "ghost" not found; create it with tbot-py auth create -f app.yaml')),
        ("grafana",
         (400, 'app "grafana" is not an MCP app: its uri does not start with '
               "mcp+stdio://, mcp+http://, mcp+https://")),
    ],
)  # fmt: skip
def test_a_session_is_refused_for_an_unallowed_missing_or_non_mcp_app(
    client: AuthClient, proxy: Issued, agent: Issued, app: str, refusal: tuple[int, str]
) -> None:
    assert _refusal(_session(client, proxy, agent, app)) == refusal
    (event,) = _events(client, "proxy.mcp.session")
    assert (event["success"], event["code"], event["message"]) == (False, *refusal)
    assert event["details"]["app"] == app
    assert event["details"]["allowed"] is False


def test_a_config_app_is_used_instead_of_the_resource_and_its_labels_decide(
    client: AuthClient, proxy: Issued, agent: Issued
) -> None:
    # The resource "weather" is env=dev; the proxy's own definition says prod.
    prod = wire.MCPApp(name="weather", uri="mcp+stdio://", labels={"env": "prod"}, command="x")
    assert _session(client, proxy, agent, "weather", config_app=prod).status_code == 403
    local = wire.MCPApp(
        name="local", uri="mcp+http://127.0.0.1:9/mcp", labels={"env": "dev"}, source="resource"
    )
    resp = _session(client, proxy, agent, "local", config_app=local)
    assert resp.status_code == 200, resp.text
    app = wire.MCPSessionResponse.from_json(resp.json()).app
    assert (app.name, app.uri, app.source) == ("local", "mcp+http://127.0.0.1:9/mcp", "config")


@pytest.mark.parametrize(
    ("config_app", "message"),
    [
        (wire.MCPApp(name="web", uri="http://127.0.0.1:3000", labels={"env": "dev"}),
         'config app "web" is not an MCP app: its uri must start with '
         "mcp+stdio://, mcp+http://, mcp+https://"),
        (wire.MCPApp(name="other", uri="mcp+stdio://", labels={"env": "dev"}),
         'config_app is "other" but the session is for "web"'),
    ],
)  # fmt: skip
def test_a_bad_config_app_is_refused(
    client: AuthClient, proxy: Issued, agent: Issued, config_app: wire.MCPApp, message: str
) -> None:
    resp = _session(client, proxy, agent, "web", config_app=config_app)
    assert _refusal(resp) == (400, message)


def _foreign_identity(now: datetime, *, cas: ca.ClusterCAs | None = None, **times: Any) -> bytes:
    """An output certificate of bot "agent" from ``cas`` (another cluster by default)."""
    cas = cas or ca.create_cluster_cas("elsewhere", now)
    certs = ca.issue_impersonated_identity(
        cas,
        ca.BotProfile(name="agent", roles=("mcp-dev",)),
        instance_id="5b1e9a3c-0000-4000-8000-000000000000",
        roles=("mcp-dev",),
        public_key=keys.generate_private_key().public_key(),
        expires=times.get("expires", now + timedelta(hours=1)),
        reissuable=False,
        route_to_cluster="",
        now=times.get("issued", now),
    )
    return certs.tls


def test_a_client_certificate_from_another_ca_expired_or_not_a_bots_is_refused(
    client: AuthClient, proxy: Issued, agent: Issued
) -> None:
    now = datetime.now(UTC)
    cas = client.cluster.cas
    other_ca = _foreign_identity(now)
    expired = _foreign_identity(
        now, cas=cas, issued=now - timedelta(hours=2), expires=now - timedelta(hours=1)
    )
    admin_cert = ca.issue_admin_identity(
        cas, "alice", keys.generate_private_key().public_key(), now=now
    ).tls
    for pem, message in (
        (other_ca, "MCP client: client certificate was not issued by this cluster"),
        (expired, "MCP client: client certificate has expired or is not yet valid"),
        (admin_cert, "MCP client: client certificate is not a bot identity"),
    ):
        assert _refusal(_session(client, proxy, pem, "weather")) == (403, message)
    garbage = _session(client, proxy, b"-----BEGIN CERTIFICATE-----\nAAAA\n", "weather")
    assert _refusal(garbage) == (400, "client_cert is not a PEM certificate")


def test_a_client_certificate_routed_to_another_app_is_refused(
    client: AuthClient, proxy: Issued, agent_bot: Issued
) -> None:
    routed = _output(client, agent_bot, route_to_app="inventory")
    assert _refusal(_session(client, proxy, routed, "weather")) == (
        403,
        'MCP client: the certificate is routed to app "inventory", not "weather"',
    )
    assert _session(client, proxy, routed, "inventory").status_code == 200


def test_a_locked_client_bot_is_refused(client: AuthClient, proxy: Issued, agent: Issued) -> None:
    admin.add_lock(client.cluster, bot="agent", message="compromised")
    status, message = _refusal(_session(client, proxy, agent, "weather"))
    assert status == 403
    assert message is not None and "compromised" in message


def test_a_role_the_client_bot_no_longer_holds_does_not_count(
    client: AuthClient, proxy: Issued, agent: Issued
) -> None:
    assert _session(client, proxy, agent, "weather").status_code == 200
    admin.update_bot_roles(client.cluster, "agent", remove=("mcp-dev",))
    # The certificate still names mcp-dev, but the bot does not hold it any more.
    assert agent.identity.groups == ("mcp-dev", "no-secrets")
    assert _refusal(_session(client, proxy, agent, "weather")) == (
        403,
        'bot "agent" may not access app "weather": no role allows app "weather"',
    )


def test_a_caller_without_the_app_session_rule_is_refused(
    client: AuthClient, agent: Issued
) -> None:
    # The agent's own output has no app_session rule: it can not act as a proxy.
    resp = _session(client, agent, agent, "weather")
    assert _refusal(resp) == (403, 'bot "agent" may not create app sessions')
    (event,) = _events(client, "proxy.mcp.session")
    assert (event["success"], event["actor"]["bot"]) == (False, "agent")


def test_a_locked_or_routed_proxy_identity_is_refused(
    client: AuthClient, proxy_bot: Issued, proxy: Issued, agent: Issued
) -> None:
    admin.update_bot_roles(client.cluster, "proxy", add=("mcp-dev",))
    routed = _output(client, proxy_bot, route_to_app="weather")
    assert _refusal(_session(client, routed, agent, "weather")) == (
        403,
        "a certificate routed to an app or a database can not be used here",
    )
    # The bot's own certificate is a bot identity too.
    assert _session(client, proxy_bot, agent, "weather").status_code == 200
    admin.add_lock(client.cluster, bot="proxy", message="proxy host reinstalled")
    assert _session(client, proxy, agent, "weather").status_code == 403


def test_the_session_jwt_verifies_against_the_served_jwks(
    client: AuthClient, proxy: Issued, agent_bot: Issued
) -> None:
    short = _output(client, agent_bot, expires=datetime.now(UTC) + timedelta(minutes=10))
    resp = _session(client, proxy, short, "inventory", jwt=True)
    assert resp.status_code == 200, resp.text
    answer = wire.MCPSessionResponse.from_json(resp.json())
    jwks = jwt.PyJWKSet.from_dict(client.request("GET", wire.PATH_JWKS).json())
    header = jwt.get_unverified_header(answer.jwt)
    ping = wire.PingResponse.from_json(client.request("GET", wire.PATH_FIND).json())
    claims = jwt.decode(
        answer.jwt,
        key=jwks[header["kid"]],
        algorithms=["ES256"],
        audience="mcp+http://127.0.0.1:8000/mcp",
        issuer=f"https://{ping.proxy_public_addr}",
    )
    not_after = short.cert.not_valid_after_utc
    assert claims["exp"] == int(not_after.timestamp())
    assert answer.expires == not_after
    assert claims["sub"] == claims["username"] == "bot-agent"
    assert claims["bot"] == "agent"
    assert claims["roles"] == ["mcp-dev", "no-secrets"]
    assert claims["nbf"] == claims["iat"] - 60 and claims["iat"] <= claims["exp"]
    assert len(claims["jti"]) == 32
    # A longer client certificate: the JWT lives one hour and the session ends with it.
    long = _output(client, agent_bot, expires=datetime.now(UTC) + timedelta(hours=3))
    answer = wire.MCPSessionResponse.from_json(
        _session(client, proxy, long, "inventory", jwt=True).json()
    )
    claims = jwt.decode(answer.jwt, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600
    assert answer.expires == datetime.fromtimestamp(claims["exp"], UTC)
    assert answer.expires < long.cert.not_valid_after_utc
    assert answer.jwt not in audit.audit_log_path(client.cluster.data_dir).read_text()


# -- the app list ----------------------------------------------------------------------------------


def _apps(
    client: AuthClient, proxy: Issued, agent: Issued, *config_apps: wire.MCPApp
) -> wire.MCPAppsResponse:
    req = wire.MCPAppsRequest(client_cert=agent.certs.tls, config_apps=config_apps)
    resp = _post(client, proxy, wire.PATH_MCP_APPS, req.to_json())
    assert resp.status_code == 200, resp.text
    return wire.MCPAppsResponse.from_json(resp.json())


def test_the_app_list_holds_only_the_allowed_mcp_apps(
    client: AuthClient, proxy: Issued, agent: Issued
) -> None:
    answer = _apps(client, proxy, agent)
    assert answer.user == "bot-agent"
    assert [role["metadata"]["name"] for role in answer.roles] == ["mcp-dev", "no-secrets"]
    # billing is prod, vault is denied, grafana is not an MCP app.
    assert [app.name for app in answer.apps] == ["inventory", "weather"]
    assert {app.source for app in answer.apps} == {"resource"}
    (event,) = _events(client, "proxy.mcp.apps")
    assert (event["success"], event["details"]["user"]) == (True, "bot-agent")


def test_a_config_app_hides_the_resource_of_the_same_name(
    client: AuthClient, proxy: Issued, agent: Issued
) -> None:
    answer = _apps(
        client,
        proxy,
        agent,
        # billing is prod as a resource; the proxy's definition is dev, and it wins.
        wire.MCPApp(name="billing", uri="mcp+stdio://", labels={"env": "dev"}, command="b"),
        # weather is dev as a resource; the proxy's definition is prod: not listed.
        wire.MCPApp(name="weather", uri="mcp+stdio://", labels={"env": "prod"}, command="w"),
        wire.MCPApp(name="alpha", uri="mcp+http://127.0.0.1:1/mcp", labels={"env": "dev"}),
    )
    assert [(app.name, app.source) for app in answer.apps] == [
        ("alpha", "config"),
        ("billing", "config"),
        ("inventory", "resource"),
    ]


def test_a_client_routed_to_an_app_lists_only_that_app(
    client: AuthClient, proxy: Issued, agent_bot: Issued
) -> None:
    routed = _output(client, agent_bot, route_to_app="weather")
    assert [app.name for app in _apps(client, proxy, routed).apps] == ["weather"]


def test_the_app_list_needs_the_app_session_rule(client: AuthClient, agent: Issued) -> None:
    req = wire.MCPAppsRequest(client_cert=agent.certs.tls)
    resp = _post(client, agent, wire.PATH_MCP_APPS, req.to_json())
    assert _refusal(resp) == (403, 'bot "agent" may not create app sessions')


# -- the proxy's TLS server certificate ----------------------------------------------------------


def _tls_cert(client: AuthClient, caller: Issued, **fields: Any) -> httpx.Response:
    key = keys.generate_private_key()
    fields.setdefault("dns_names", ("mcp.example.com", "127.0.0.1", "::1"))
    req = wire.TLSServerCertRequest(public_key=keys.public_key_pem(key.public_key()), **fields)
    return _post(client, caller, wire.PATH_TLS_SERVER_CERT, req.to_json())


def test_the_proxy_gets_a_host_ca_server_certificate_for_its_names(
    client: AuthClient, proxy: Issued
) -> None:
    resp = _tls_cert(client, proxy, expires=datetime.now(UTC) + timedelta(hours=48))
    assert resp.status_code == 200, resp.text
    answer = wire.TLSServerCertResponse.from_json(resp.json())
    cas = client.cluster.cas
    assert (answer.host_ca, answer.user_ca) == (cas.host.cert_pem, cas.user.cert_pem)
    cert = x509.load_pem_x509_certificate(answer.cert)
    cert.verify_directly_issued_by(cas.host.cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["mcp.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    # Asked for 48h: capped by the proxy's own certificate (and 24h).
    assert cert.not_valid_after_utc <= proxy.cert.not_valid_after_utc
    assert cert.not_valid_after_utc > datetime.now(UTC) + timedelta(minutes=30)
    (event,) = _events(client, "proxy.tls_cert")
    assert event["success"] is True
    assert event["details"]["dns_names"] == "mcp.example.com,127.0.0.1,::1"


def test_without_an_expiry_the_server_certificate_lasts_as_long_as_the_caller(
    client: AuthClient, proxy_bot: Issued
) -> None:
    short = _output(client, proxy_bot, expires=datetime.now(UTC) + timedelta(minutes=20))
    resp = _tls_cert(client, short)
    assert resp.status_code == 200, resp.text
    cert = x509.load_pem_x509_certificate(wire.TLSServerCertResponse.from_json(resp.json()).cert)
    assert cert.not_valid_after_utc == short.cert.not_valid_after_utc


def test_the_server_certificate_needs_the_host_cert_rule(client: AuthClient, agent: Issued) -> None:
    assert _refusal(_tls_cert(client, agent)) == (
        403,
        'bot "agent" may not create host certificates',
    )
    (event,) = _events(client, "proxy.tls_cert")
    assert (event["success"], event["resource"]) == (False, "host_cert")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"dns_names": ["bad name"]}, "'bad name' is neither a DNS name nor an IP address"),
        ({"dns_names": []}, "dns_names must be a list of 1 to 16 non-empty strings"),
        ({"dns_names": [f"h{i}" for i in range(17)]}, "dns_names must be a list of 1 to 16"),
        ({"public_key": "nonsense"}, "public_key is not a PEM ECDSA public key"),
    ],
)
def test_bad_server_certificate_requests_get_one_clear_error(
    client: AuthClient, proxy: Issued, body: dict[str, Any], message: str
) -> None:
    key = keys.public_key_pem(keys.generate_private_key().public_key()).decode()
    doc = {"public_key": key, "dns_names": ["mcp.example.com"], **body}
    status, got = _refusal(_post(client, proxy, wire.PATH_TLS_SERVER_CERT, doc))
    assert status == 400
    assert got is not None and message in got


# -- the client --------------------------------------------------------------------------------


def test_the_client_methods_return_typed_answers_and_raise_access_denied(
    client: AuthClient, proxy: Issued, agent: Issued
) -> None:
    ctx = mtls_context(proxy.certs.tls, keys.private_key_pem(proxy.key), proxy.certs.tls_ca_certs)

    async def calls() -> tuple[wire.MCPSessionResponse, wire.MCPAppsResponse, str]:
        async with HTTPAuthClient(client.service.addr, ctx) as auth:
            session = await auth.mcp_session(
                wire.MCPSessionRequest(client_cert=agent.certs.tls, app="weather")
            )
            apps = await auth.mcp_apps(wire.MCPAppsRequest(client_cert=agent.certs.tls))
            key = keys.generate_private_key().public_key()
            await auth.issue_tls_server_cert(
                wire.TLSServerCertRequest(
                    public_key=keys.public_key_pem(key), dns_names=("localhost",)
                )
            )
            with pytest.raises(AccessDenied) as denied:
                await auth.mcp_session(
                    wire.MCPSessionRequest(client_cert=agent.certs.tls, app="billing")
                )
            return session, apps, str(denied.value)

    session, apps, denial = asyncio.run(calls())
    assert (session.user, session.app.name) == ("bot-agent", "weather")
    assert [app.name for app in apps.apps] == ["inventory", "weather"]
    assert 'may not access app "billing"' in denial
