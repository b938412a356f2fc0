"""The ``workload-identity-x509`` and ``workload-identity-jwt`` services in the v2 schema."""

from __future__ import annotations

import textwrap

import pytest

from tbot_py.bot.oneshot import build_services, wire_selector
from tbot_py.config import BotConfig, load_config_text
from tbot_py.config.render import render_config_yaml
from tbot_py.config.schema import (
    WorkloadIdentityJWTServiceConfig,
    WorkloadIdentityX509ServiceConfig,
)
from tbot_py.errors import ConfigError
from tbot_py.services.workload_identity import (
    WorkloadIdentityJWTService,
    WorkloadIdentityX509Service,
)

SOURCE = "/etc/tbot.yaml"
HEAD = """\
version: v2
auth_server: auth.example.com:3025
services:
"""
X509 = "{type: workload-identity-x509, destination: {type: memory}"
JWT = "{type: workload-identity-jwt, destination: {type: memory}"


def load(services: str) -> BotConfig:
    return load_config_text(HEAD + textwrap.dedent(services), source=SOURCE)


def error_for(services: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(services)
    return str(info.value)


def test_both_types_load_with_default_names_and_build_their_services() -> None:
    config = load(
        """\
        - type: workload-identity-x509
          destination: {type: directory, path: /opt/svid}
          selector: {name: payments}
        - type: workload-identity-jwt
          destination: {type: directory, path: /opt/jwt}
          selector: {labels: {team: [payments], env: [prod]}}
          audiences: [mcp-gateway, vault]
          credential_ttl: 10m
          renewal_interval: 5m
        """
    )
    x509, jwt = config.services
    assert isinstance(x509, WorkloadIdentityX509ServiceConfig)
    assert isinstance(jwt, WorkloadIdentityJWTServiceConfig)
    assert x509.name == "workload-identity-x509-1"
    assert jwt.name == "workload-identity-jwt-1"
    assert x509.include_federated_trust_bundles is False
    assert jwt.audiences == ["mcp-gateway", "vault"]
    assert wire_selector(x509.selector).name == "payments"
    assert wire_selector(jwt.selector).labels == {"team": "payments", "env": "prod"}
    x509_out, jwt_out = build_services(config, "auth.example.com:3025")
    assert isinstance(x509_out, WorkloadIdentityX509Service)
    assert isinstance(jwt_out, WorkloadIdentityJWTService)
    assert jwt_out.settings.audiences == ("mcp-gateway", "vault")
    assert jwt_out.settings.ttl.total_seconds() == 600


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (f"- {X509}}}", ':4: services[0]: missing required key "selector"'),
        (
            f"- {X509}, selector: {{}}}}",
            ":4: services[0].selector: set exactly one of name and labels",
        ),
        (
            f"- {X509}, selector: {{name: a, labels: {{k: [v]}}}}}}",
            ":4: services[0].selector: set exactly one of name and labels",
        ),
        (
            f"- {X509}, selector: {{labels: {{k: []}}}}}}",
            ":4: services[0].selector.labels.k: must list at least one value",
        ),
        (
            f"- {X509}, selector: {{labels: {{k: v}}}}}}",
            ":4: services[0].selector.labels.k: expected a list",
        ),
        (
            f"- {X509}, selector: {{labels: {{k: [a, b]}}}}}}",
            ":4: services[0].selector.labels.k: more than one value per label is not supported",
        ),
        (
            f"- {X509}, selector: {{name: a}}, include_federated_trust_bundles: true}}",
            ":4: services[0].include_federated_trust_bundles: "
            "include_federated_trust_bundles is not supported yet",
        ),
        (
            f"- {X509}, selector: {{name: a}}, include_federated_trust_bundles: 'yes'}}",
            ":4: services[0].include_federated_trust_bundles: expected true or false",
        ),
        (
            f"- {X509}, selector: {{name: a}}, audiences: [x]}}",
            ':4: services[0]: unknown key "audiences"',
        ),
        (f"- {JWT}, selector: {{name: a}}}}", ':4: services[0]: missing required key "audiences"'),
        (
            f"- {JWT}, selector: {{name: a}}, audiences: []}}",
            ":4: services[0].audiences: must list at least one audience",
        ),
        (
            f"- {JWT}, selector: {{name: a}}, audiences: [x, '']}}",
            ":4: services[0].audiences[1]: must not be empty",
        ),
        (
            f"- {JWT}, selector: {{name: a}}, audiences: [x], credential_ttl: 1h}}",
            ":4: services[0].credential_ttl: credential_ttl and renewal_interval must both be set",
        ),
        (
            "- {type: workload-identity-jwt, selector: {name: a}, audiences: [x]}",
            ':4: services[0]: missing required key "destination"',
        ),
    ],
)
def test_bad_workload_identity_services_get_one_located_error(service: str, expected: str) -> None:
    message = error_for(service)
    assert message.startswith(SOURCE), message
    assert expected in message, message
    assert len(message.splitlines()) == 1, message


def test_workload_identity_services_render_and_load_back_the_same() -> None:
    config = load(
        """\
        - type: workload-identity-x509
          name: svid
          destination: {type: directory, path: /opt/svid}
          selector: {labels: {team: [payments]}}
        - type: workload-identity-jwt
          destination: {type: directory, path: /opt/jwt}
          selector: {name: payments}
          audiences: [a]
        """
    )
    text = render_config_yaml(config)
    assert "labels: {}" not in text and "name: ''" not in text
    again = load_config_text(text, source=SOURCE)
    assert again == config
