"""Daemon settings in the config: diag_addr and per-service post-renew hooks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

from tbot_py.config import (
    BotConfig,
    CLIOverrides,
    HookConfig,
    IdentityServiceConfig,
    apply_overrides,
    load_config_text,
    render_config_yaml,
)
from tbot_py.errors import ConfigError
from tbot_py.services.hooks import Hook

SOURCE = "/etc/tbot.yaml"
HINT = (
    'command must be an argv list such as ["systemctl", "reload", "nginx"]; '
    'use ["sh", "-c", "..."] for a shell'
)


def load(text: str) -> BotConfig:
    return load_config_text(textwrap.dedent(text), source=SOURCE)


def error_for(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    return str(info.value)


def with_hooks(hooks_yaml: str) -> str:
    """A config whose one service has ``hooks_yaml`` (indented 6) under ``hooks:`` on line 6."""
    head = """\
        version: v2
        proxy_server: proxy.example.com:443
        services:
          - type: identity
            destination: {type: memory}
            hooks:
    """
    return textwrap.dedent(head) + textwrap.indent(textwrap.dedent(hooks_yaml), " " * 6)


# -- diag_addr --------------------------------------------------------------------------------


def test_diag_addr_parses_and_defaults_to_off() -> None:
    config = load("version: v2\ndiag_addr: 127.0.0.1:3001\n")
    assert config.diag_addr == "127.0.0.1:3001"
    assert load("version: v2\n").diag_addr is None
    assert load("version: v2\ndiag_addr: '[::1]:3001'\n").diag_addr == "[::1]:3001"


@pytest.mark.parametrize("value", ["localhost", "127.0.0.1:0", "127.0.0.1:99999", "http://x:1"])
def test_invalid_diag_addr_is_an_error_at_its_line(value: str) -> None:
    err = error_for(f"version: v2\nproxy_server: p.example.com:443\ndiag_addr: {value}\n")
    assert err == (
        f'{SOURCE}:3: diag_addr: invalid address "{value}": '
        "expected host:port, e.g. proxy.example.com:443"
    )


def test_diag_addr_flag_sets_it_without_a_file() -> None:
    config = apply_overrides(None, CLIOverrides(diag_addr="127.0.0.1:3001"))
    assert config.diag_addr == "127.0.0.1:3001"
    assert config.notices == []


def test_diag_addr_flag_overriding_the_file_is_announced() -> None:
    base = load("version: v2\ndiag_addr: 127.0.0.1:3001\n")
    config = apply_overrides(base, CLIOverrides(diag_addr="0.0.0.0:4000"))
    assert config.diag_addr == "0.0.0.0:4000"
    assert config.notices == ["flag --diag-addr overrides diag_addr from the config file"]
    same = apply_overrides(base, CLIOverrides(diag_addr="127.0.0.1:3001"))
    assert same.notices == []


def test_invalid_diag_addr_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(None, CLIOverrides(diag_addr="nope"))
    assert str(info.value) == (
        '--diag-addr: invalid address "nope": expected host:port, e.g. proxy.example.com:443'
    )


# -- hooks ------------------------------------------------------------------------------------


def test_hooks_parse_with_default_and_explicit_timeouts() -> None:
    config = load(
        with_hooks(
            """\
            - command: ["systemctl", "reload", "nginx"]
            - command:
                - sh
                - -c
                - cp "$TBOT_PY_DESTINATION_DIR/tlscert" /etc/app/
              timeout: 2m
            """
        )
    )
    (service,) = config.services
    assert service.hooks == [
        HookConfig(command=["systemctl", "reload", "nginx"], timeout=timedelta(seconds=30)),
        HookConfig(
            command=["sh", "-c", 'cp "$TBOT_PY_DESTINATION_DIR/tlscert" /etc/app/'],
            timeout=timedelta(minutes=2),
        ),
    ]
    assert service.hook_list() == (
        Hook(command=("systemctl", "reload", "nginx"), timeout=timedelta(seconds=30)),
        Hook(
            command=("sh", "-c", 'cp "$TBOT_PY_DESTINATION_DIR/tlscert" /etc/app/'),
            timeout=timedelta(minutes=2),
        ),
    )


def test_services_have_no_hooks_by_default() -> None:
    config = load("version: v2\nservices:\n  - type: identity\n    destination: {type: memory}\n")
    assert config.services[0].hooks == []
    assert config.services[0].hook_list() == ()


def test_hooks_on_legacy_outputs_are_kept() -> None:
    config = load(
        """\
        version: v2
        outputs:
          - type: identity
            destination: {type: memory}
            hooks: [{command: ["true"]}]
        """
    )
    assert config.services[0].hook_list() == (Hook(command=("true",)),)


@pytest.mark.parametrize(
    ("hooks_yaml", "expected"),
    [
        pytest.param(
            "- command: systemctl reload nginx\n",
            f"{SOURCE}:7: services[0].hooks[0].command: {HINT}",
            id="string-command",
        ),
        pytest.param(
            "- command: []\n",
            f"{SOURCE}:7: services[0].hooks[0].command: must not be empty: {HINT}",
            id="empty-list",
        ),
        pytest.param(
            "- command:\n",
            f"{SOURCE}:7: services[0].hooks[0].command: {HINT} (got an empty value)",
            id="null-command",
        ),
        pytest.param(
            "- command: {program: nginx}\n",
            f"{SOURCE}:7: services[0].hooks[0].command: {HINT} (got a mapping)",
            id="mapping-command",
        ),
        pytest.param(
            '- command: ["", "reload"]\n',
            f"{SOURCE}:7: services[0].hooks[0].command[0]: "
            "the program (first item) must not be empty",
            id="empty-program",
        ),
        pytest.param(
            "- command:\n    - kill\n    - -HUP\n    - 1234\n",
            f"{SOURCE}:10: services[0].hooks[0].command[2]: expected a string, got an integer",
            id="non-string-item",
        ),
        pytest.param(
            "- command: [reload]\n  timeout: 0s\n",
            f"{SOURCE}:8: services[0].hooks[0].timeout: "
            'duration must be greater than zero, got "0s"',
            id="zero-timeout",
        ),
        pytest.param(
            "- command: [reload]\n  timeout: 11m\n",
            f"{SOURCE}:8: services[0].hooks[0].timeout: "
            'hook timeout must be at most 10m, got "11m"',
            id="long-timeout",
        ),
        pytest.param(
            "- command: [reload]\n  timeout: 30\n",
            f"{SOURCE}:8: services[0].hooks[0].timeout: "
            "expected a duration such as 20m or 1h, got an integer",
            id="unitless-timeout",
        ),
        pytest.param(
            "- command: [reload]\n  timout: 5s\n",
            f'{SOURCE}:8: services[0].hooks[0]: unknown key "timout"; did you mean "timeout"?',
            id="unknown-key-suggested",
        ),
        pytest.param(
            "- command: [reload]\n- command: [ok]\n  shell: true\n",
            f'{SOURCE}:9: services[0].hooks[1]: unknown key "shell"',
            id="unknown-key",
        ),
        pytest.param(
            "- command: [true]\n",
            f"{SOURCE}:7: services[0].hooks[0].command[0]: expected a string, got a boolean",
            id="yaml-boolean-item",
        ),
        pytest.param(
            "- timeout: 5s\n",
            f'{SOURCE}:7: services[0].hooks[0]: missing required key "command"',
            id="missing-command",
        ),
        pytest.param(
            "- systemctl reload nginx\n",
            f"{SOURCE}:7: services[0].hooks[0]: expected a mapping, got a string",
            id="hook-is-a-string",
        ),
    ],
)
def test_hook_errors_name_the_exact_line(hooks_yaml: str, expected: str) -> None:
    assert error_for(with_hooks(hooks_yaml)) == expected


def test_hooks_must_be_a_list() -> None:
    text = with_hooks("").rstrip("\n") + " systemctl reload nginx\n"
    assert error_for(text) == f"{SOURCE}:6: services[0].hooks: expected a list, got a string"


def test_hook_config_converts_to_hook_values() -> None:
    service = IdentityServiceConfig.model_validate(
        {
            "destination": {"type": "memory"},
            "hooks": [{"command": ["true"], "timeout": "1s"}],
        }
    )
    assert service.hook_list() == (Hook(command=("true",), timeout=timedelta(seconds=1)),)


def test_importing_the_config_does_not_load_asyncio() -> None:
    probe = "import sys, tbot_py.config; print('asyncio' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# -- rendering --------------------------------------------------------------------------------


def test_rendered_config_with_hooks_and_diag_addr_loads_back_equal() -> None:
    config = load(
        """\
        version: v2
        proxy_server: proxy.example.com:443
        diag_addr: 127.0.0.1:3001
        services:
          - type: identity
            destination: {type: directory, path: /opt/out}
            hooks:
              - command: ["systemctl", "reload", "nginx"]
              - command: ["sh", "-c", "echo 'renewed: yes' >> /var/log/x"]
                timeout: 1m30s
          - type: identity
            destination: {type: memory}
        """
    )
    text = render_config_yaml(config)
    assert load_config_text(text) == config
    assert "diag_addr: 127.0.0.1:3001\n" in text
    assert (
        textwrap.indent(
            textwrap.dedent(
                """\
                hooks:
                  - command:
                      - systemctl
                      - reload
                      - nginx
                  - command:
                      - sh
                      - -c
                      - 'echo ''renewed: yes'' >> /var/log/x'
                    timeout: 1m30s
                """
            ),
            "    ",
        )
        in text
    )


def test_rendered_config_without_hooks_or_diag_addr_mentions_neither() -> None:
    text = render_config_yaml(load("version: v2\nproxy_server: proxy.example.com:443\n"))
    assert "hooks" not in text
    assert "diag_addr" not in text
