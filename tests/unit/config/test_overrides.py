from __future__ import annotations

import textwrap
from datetime import timedelta

import pytest

from tbot_py.config import (
    BotConfig,
    CLIOverrides,
    DirectoryDestination,
    MemoryDestination,
    append_service,
    apply_overrides,
    identity_service_from_flags,
    load_config_text,
)
from tbot_py.errors import ConfigError

PIN_A = "sha256:" + "a" * 64
PIN_B = "sha256:" + "b" * 64


def from_file(text: str) -> BotConfig:
    return load_config_text(textwrap.dedent(text), source="tbot.yaml")


def test_flags_without_a_file_start_from_defaults_and_say_nothing() -> None:
    config = apply_overrides(
        None,
        CLIOverrides(
            proxy_server="proxy.example.com:443",
            token="t0k",
            ca_pins=(PIN_A,),
            storage="memory://",
            credential_ttl="30m",
            renewal_interval="10m",
            oneshot=True,
            debug=True,
        ),
    )
    assert config.version == "v2"
    assert config.proxy_server == "proxy.example.com:443"
    assert config.onboarding.read_token() == "t0k"
    assert config.onboarding.ca_pins == [PIN_A]
    assert config.storage == MemoryDestination()
    assert (config.credential_ttl, config.renewal_interval) == (
        timedelta(minutes=30),
        timedelta(minutes=10),
    )
    assert config.oneshot is True
    assert config.debug is True
    assert config.notices == []


def test_flags_win_over_the_file_and_each_override_is_announced() -> None:
    base = from_file(
        """\
        version: v2
        proxy_server: old.example.com:443
        onboarding:
          token: old-token
          ca_path: /etc/ca.pem
        storage: {type: directory, path: /var/lib/old}
        credential_ttl: 2h
        oneshot: false
        """
    )
    config = apply_overrides(
        base,
        CLIOverrides(
            proxy_server="new.example.com:443",
            token="new-token",
            ca_pins=(PIN_A,),
            storage="/var/lib/new",
            credential_ttl="3h",
            oneshot=True,
        ),
    )
    assert config.proxy_server == "new.example.com:443"
    assert config.onboarding.read_token() == "new-token"
    assert config.onboarding.ca_pins == [PIN_A]
    assert config.onboarding.ca_path is None
    assert config.storage == DirectoryDestination(path="/var/lib/new")
    assert config.credential_ttl == timedelta(hours=3)
    assert config.oneshot is True
    assert config.notices == [
        "flag --proxy-server overrides proxy_server from the config file",
        "flag --token overrides onboarding.token from the config file",
        "flag --ca-pin overrides onboarding.ca_path from the config file",
        "flag --storage overrides storage from the config file",
        "flag --credential-ttl overrides credential_ttl from the config file",
        "flag --oneshot overrides oneshot from the config file",
    ]
    assert base.proxy_server == "old.example.com:443", "the input config is left untouched"


def test_flag_equal_to_the_file_value_is_not_announced() -> None:
    base = from_file("version: v2\ncredential_ttl: 1h\nproxy_server: p.example.com:443\n")
    config = apply_overrides(
        base, CLIOverrides(credential_ttl="60m", proxy_server="p.example.com:443")
    )
    assert config.notices == []


def test_one_onboarding_flag_keeps_the_other_onboarding_fields() -> None:
    base = from_file(
        f"""\
        version: v2
        onboarding:
          token: /run/token
          ca_pins: [{PIN_A}]
        """
    )
    config = apply_overrides(base, CLIOverrides(join_method="token"))
    assert config.onboarding.token_file() == "/run/token"
    assert config.onboarding.ca_pins == [PIN_A]


def test_ca_path_flag_replaces_pins_from_the_file() -> None:
    base = from_file(f"version: v2\nonboarding:\n  ca_pins: [{PIN_A}, {PIN_B}]\n")
    config = apply_overrides(base, CLIOverrides(ca_path="/etc/ca.pem"))
    assert config.onboarding.ca_pins == []
    assert config.onboarding.ca_path == "/etc/ca.pem"
    assert config.notices == ["flag --ca-path overrides onboarding.ca_pins from the config file"]


def test_insecure_flag_clears_pins_and_path() -> None:
    base = from_file(f"version: v2\nonboarding:\n  ca_pins: [{PIN_A}]\n")
    config = apply_overrides(base, CLIOverrides(insecure=True))
    assert config.onboarding.insecure is True
    assert config.onboarding.ca_pins == []
    assert config.notices == ["flag --insecure overrides onboarding.ca_pins from the config file"]


def test_ca_pin_flag_replaces_insecure_from_the_file() -> None:
    base = from_file("version: v2\ninsecure: true\n")
    config = apply_overrides(base, CLIOverrides(ca_pins=(PIN_A,)))
    assert config.onboarding.insecure is False
    assert config.notices == ["flag --ca-pin overrides onboarding.insecure from the config file"]


def test_proxy_flag_replaces_auth_server_from_the_file() -> None:
    base = from_file("version: v2\nauth_server: auth.example.com:3025\n")
    config = apply_overrides(base, CLIOverrides(proxy_server="proxy.example.com:443"))
    assert (config.proxy_server, config.auth_server) == ("proxy.example.com:443", None)
    assert config.notices == ["flag --proxy-server overrides auth_server from the config file"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (CLIOverrides(ca_pins=("sha256:nothex",)), '--ca-pin: invalid CA pin "sha256:nothex"'),
        (
            CLIOverrides(ca_pins=(PIN_A,), ca_path="/ca"),
            "--ca-path: --ca-pin and --ca-path are mutually exclusive",
        ),
        (
            CLIOverrides(ca_pins=(PIN_A,), insecure=True),
            "--insecure: --ca-pin and --insecure are mutually exclusive",
        ),
        (
            CLIOverrides(ca_path="/ca", insecure=True),
            "--insecure: --ca-path and --insecure are mutually exclusive",
        ),
        (
            CLIOverrides(proxy_server="a:1", auth_server="b:2"),
            "--auth-server: --proxy-server and --auth-server are mutually exclusive",
        ),
        (CLIOverrides(proxy_server="nohost"), '--proxy-server: invalid address "nohost"'),
        (CLIOverrides(credential_ttl="1 hour"), '--credential-ttl: invalid duration "1 hour"'),
        (
            CLIOverrides(renewal_interval="0s"),
            '--renewal-interval: duration must be greater than zero, got "0s"',
        ),
        (
            CLIOverrides(join_method="azure"),
            '--join-method: join method "azure" is not supported yet',
        ),
        (CLIOverrides(token=""), "--token: must not be empty"),
        (CLIOverrides(storage="s3://x"), '--storage: unrecognized destination scheme "s3"'),
    ],
)
def test_bad_flags_are_errors_naming_the_flag(flags: CLIOverrides, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(None, flags)
    assert str(info.value).startswith(expected)


def test_storage_flag_clashing_with_a_file_service_is_an_error() -> None:
    base = from_file(
        "version: v2\nservices:\n"
        "  - type: identity\n    destination: {type: directory, path: /out}\n"
    )
    with pytest.raises(ConfigError) as info:
        apply_overrides(base, CLIOverrides(storage="/out"))
    assert str(info.value) == (
        "services[0].destination.path: directory /out is already used by the storage directory"
    )


def test_file_warnings_keep_their_lines_after_overrides() -> None:
    base = from_file("version: v2\ncredential_ttl: 5m\n")
    config = apply_overrides(base, CLIOverrides(debug=True))
    assert config.warnings == base.warnings
    assert config.warnings[0].startswith("tbot.yaml:2: credential_ttl:")


def test_identity_service_from_flags_builds_a_service() -> None:
    service = identity_service_from_flags(
        "/opt/out", roles=("a", "b"), allow_reissue=True, ssh_config="off", name="ci"
    )
    assert service.destination == DirectoryDestination(path="/opt/out")
    assert (service.roles, service.allow_reissue, service.ssh_config, service.name) == (
        ["a", "b"],
        True,
        "off",
        "ci",
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"name": "Bad Name"}, '--name: invalid service name "Bad Name"'),
        ({"name": "heartbeat"}, '--name: service name "heartbeat" is reserved'),
        ({"ssh_config": "maybe"}, '--ssh-config: expected "on" or "off", got "maybe"'),
    ],
)
def test_identity_service_flag_errors_name_the_flag(kwargs: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        identity_service_from_flags("memory://", **kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(expected)


def test_append_service_adds_after_the_file_services_and_names_it() -> None:
    base = from_file(
        "version: v2\nservices:\n  - type: identity\n    destination: {type: directory, path: /a}\n"
    )
    config = append_service(base, identity_service_from_flags("/b"))
    assert [s.name for s in config.services] == ["identity-1", "identity-2"]
    assert len(base.services) == 1


@pytest.mark.parametrize(
    ("uri", "name", "expected"),
    [
        ("/a", None, "--destination: directory /a is already used by services[0]"),
        (
            "/state",
            None,
            "--destination: directory /state is already used by the storage directory",
        ),
        (
            "/b",
            "first",
            '--name: service name "first" is already used by services[0]',
        ),
    ],
)
def test_append_service_checks_clashes_with_the_file(
    uri: str, name: str | None, expected: str
) -> None:
    base = from_file(
        """\
        version: v2
        storage: {type: directory, path: /state}
        services:
          - type: identity
            name: first
            destination: {type: directory, path: /a}
        """
    )
    with pytest.raises(ConfigError) as info:
        append_service(base, identity_service_from_flags(uri, name=name))
    assert str(info.value) == expected
