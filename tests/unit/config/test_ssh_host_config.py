"""The ``ssh_host`` service in the v2 schema: loading, validation errors and rendering."""

from __future__ import annotations

import textwrap

import pytest

from tbot_py.config import BotConfig, IdentityServiceConfig, SSHHostServiceConfig, load_config_text
from tbot_py.config.render import render_config_yaml
from tbot_py.errors import ConfigError

SOURCE = "/etc/tbot.yaml"
HEAD = """\
version: v2
auth_server: auth.example.com:3025
services:
"""


def load(services: str) -> BotConfig:
    return load_config_text(HEAD + textwrap.dedent(services), source=SOURCE)


def error_for(services: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(services)
    return str(info.value)


def test_ssh_host_loads_next_to_identity_with_default_names() -> None:
    config = load(
        """\
        - type: ssh_host
          destination: {type: directory, path: /opt/sshd}
          principals: [node1.example.com, 10.0.0.5]
        - type: identity
          destination: {type: memory}
        """
    )
    host, identity = config.services
    assert isinstance(host, SSHHostServiceConfig)
    assert isinstance(identity, IdentityServiceConfig)
    assert host.name == "ssh_host-1"
    assert host.principals == ["node1.example.com", "10.0.0.5"]
    assert host.ca_type == "user"


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (
            "- {type: ssh_host, destination: {type: memory}}",
            ':4: services[0]: missing required key "principals"',
        ),
        (
            "- {type: ssh_host, destination: {type: memory}, principals: []}",
            ":4: services[0].principals: must list at least one principal",
        ),
        (
            "- {type: ssh_host, destination: {type: memory}, principals: [a, '']}",
            ":4: services[0].principals[1]: must not be empty",
        ),
        (
            "- {type: ssh_host, destination: {type: memory}, principals: [a, 3]}",
            ":4: services[0].principals[1]: expected a string, got an integer",
        ),
        (
            "- {type: ssh_host, destination: {type: memory}, principals: a}",
            ":4: services[0].principals: expected a list",
        ),
        (
            "- {type: ssh_host, destination: {type: memory}, principals: [a], ca_type: openssh}",
            ':4: services[0].ca_type: ca_type "openssh" is not supported yet',
        ),
        (
            "- {type: ssh_host, principals: [a]}",
            ':4: services[0]: missing required key "destination"',
        ),
        (
            "- {type: ssh_host, destination: {type: memory}, principals: [a], roles: [x]}",
            ':4: services[0]: unknown key "roles"',
        ),
    ],
)
def test_bad_ssh_host_services_get_one_located_error(service: str, expected: str) -> None:
    message = error_for(service)
    assert message.startswith(SOURCE), message
    assert expected in message, message
    assert len(message.splitlines()) == 1, message


def test_unknown_types_keep_their_errors() -> None:
    message = error_for("- {type: foo}")
    assert 'unknown service type "foo" (supported: identity, ssh_host, ' in message
    message = error_for("- {type: vnet}")
    assert 'service type "vnet" is not supported yet' in message


def test_ssh_host_renders_and_loads_back_the_same() -> None:
    config = load(
        """\
        - type: ssh_host
          name: sshd
          destination: {type: directory, path: /opt/sshd}
          principals: [node1.example.com]
        """
    )
    again = load_config_text(render_config_yaml(config), source=SOURCE)
    assert again == config
