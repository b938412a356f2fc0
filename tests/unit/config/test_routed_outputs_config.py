"""The ``application`` and ``database`` services in the v2 schema, and their CLI flags."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from tbot_py.cli.main import cli
from tbot_py.config import BotConfig, load_config_text
from tbot_py.config.render import render_config_yaml
from tbot_py.config.schema import ApplicationServiceConfig, DatabaseServiceConfig
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


def test_application_and_database_load_with_defaults() -> None:
    config = load(
        """\
        - type: application
          destination: {type: directory, path: /opt/app}
          app_name: grafana
        - type: database
          destination: {type: memory}
          service: pg
        """
    )
    app, db = config.services
    assert isinstance(app, ApplicationServiceConfig)
    assert isinstance(db, DatabaseServiceConfig)
    assert (app.name, app.app_name, app.specific_tls_extensions) == (
        "application-1",
        "grafana",
        False,
    )
    assert (db.name, db.service, db.database, db.username, db.format) == (
        "database-1",
        "pg",
        "",
        "",
        "",
    )


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (
            "- {type: application, destination: {type: memory}}",
            ':4: services[0]: missing required key "app_name"',
        ),
        (
            "- {type: application, destination: {type: memory}, app_name: ' '}",
            ":4: services[0].app_name: must not be empty",
        ),
        (
            "- {type: database, destination: {type: memory}}",
            ':4: services[0]: missing required key "service"',
        ),
        (
            "- {type: database, destination: {type: memory}, service: pg, format: mysql}",
            ':4: services[0].format: expected "", "tls", "mongo" or "cockroach", got "mysql"',
        ),
        (
            "- {type: database, destination: {type: memory}, service: pg, app_name: x}",
            ':4: services[0]: unknown key "app_name"',
        ),
    ],
)
def test_bad_routed_services_get_one_located_error(service: str, expected: str) -> None:
    message = error_for(service)
    assert message.startswith(SOURCE), message
    assert expected in message, message
    assert len(message.splitlines()) == 1, message


def test_routed_services_render_and_load_back_the_same() -> None:
    config = load(
        """\
        - type: application
          destination: {type: memory}
          app_name: grafana
          specific_tls_extensions: true
        - type: database
          destination: {type: memory}
          service: pg
          database: orders
          username: alice
          format: tls
        """
    )
    again = load_config_text(render_config_yaml(config), source=SOURCE)
    assert again == config


BASE_FLAGS = ["--auth-server", "127.0.0.1:3025", "--token", "t0ken", "--destination", "/opt/out"]


def test_configure_application_and_database_take_tbots_flags() -> None:
    runner = CliRunner()
    app = runner.invoke(
        cli,
        ["configure", "application", *BASE_FLAGS, "--app", "grafana", "--specific-tls-extensions"],
    )
    assert app.exit_code == 0, app.output
    assert "app_name: grafana" in app.output
    assert "specific_tls_extensions: true" in app.output
    db = runner.invoke(
        cli,
        [
            "configure",
            "database",
            *BASE_FLAGS,
            "--service",
            "pg",
            "--database",
            "orders",
            "--username",
            "alice",
            "--format",
            "mongo",
        ],
    )
    assert db.exit_code == 0, db.output
    for line in ("service: pg", "database: orders", "username: alice", "format: mongo"):
        assert line in db.output


COCKROACH = ["--service", "pg", "--format", "cockroach"]


def test_configure_database_takes_the_cockroach_format() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tbot_py", "configure", "database", *BASE_FLAGS, *COCKROACH],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "format: cockroach" in result.stdout
    config = load_config_text(result.stdout, source=SOURCE)
    service = config.services[0]
    assert isinstance(service, DatabaseServiceConfig)
    assert service.format == "cockroach"
