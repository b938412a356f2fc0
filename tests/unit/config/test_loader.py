from __future__ import annotations

import os
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from tbot_py.config import (
    BotConfig,
    DirectoryDestination,
    IdentityServiceConfig,
    MemoryDestination,
    load_config_file,
    load_config_text,
)
from tbot_py.errors import ConfigError

SOURCE = "/etc/tbot.yaml"
PIN = "sha256:" + "ab" * 32


def load(text: str) -> BotConfig:
    return load_config_text(textwrap.dedent(text), source=SOURCE)


def error_for(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text)
    return info.value


def test_full_valid_config_loads_every_field() -> None:
    config = load(
        f"""\
        version: v2
        proxy_server: proxy.example.com:443
        onboarding:
          join_method: token
          token: /var/run/tbot/token
          ca_pins:
            - {PIN}
        storage:
          type: directory
          path: /var/lib/tbot-py
        credential_ttl: 2h
        renewal_interval: 30m
        oneshot: true
        debug: true
        services:
          - type: identity
            name: ci
            destination:
              type: directory
              path: /opt/machine-id
            roles: [access, editor]
            allow_reissue: true
            ssh_config: off
            credential_ttl: 1h
            renewal_interval: 10m
          - type: identity
            destination:
              type: memory
        """
    )
    assert config.proxy_server == "proxy.example.com:443"
    assert config.auth_server is None
    assert config.onboarding.join_method == "token"
    assert config.onboarding.token_file() == "/var/run/tbot/token"
    assert config.onboarding.ca_pins == [PIN]
    assert config.storage == DirectoryDestination(path="/var/lib/tbot-py")
    assert config.credential_ttl == timedelta(hours=2)
    assert config.renewal_interval == timedelta(minutes=30)
    assert config.oneshot is True
    assert config.debug is True
    first, second = config.services
    assert isinstance(first, IdentityServiceConfig)
    assert first.name == "ci"
    assert first.destination == DirectoryDestination(path="/opt/machine-id")
    assert first.roles == ["access", "editor"]
    assert first.allow_reissue is True
    assert first.ssh_config == "off"
    assert first.effective_lifetime(config) == (timedelta(hours=1), timedelta(minutes=10))
    assert second.name == "identity-2"
    assert second.destination == MemoryDestination()
    assert second.effective_lifetime(config) == (timedelta(hours=2), timedelta(minutes=30))
    assert config.warnings == []


def test_minimal_config_gets_tbot_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/tbot-state:/other")
    config = load("version: v2\n")
    assert config.proxy_server is None
    assert config.onboarding.join_method == "token"
    assert config.onboarding.token is None
    assert config.onboarding.ca_pins == []
    assert config.onboarding.ca_path is None
    assert config.onboarding.insecure is False
    assert config.storage == DirectoryDestination(path="/var/lib/tbot-state")
    assert config.credential_ttl == timedelta(hours=1)
    assert config.renewal_interval == timedelta(minutes=20)
    assert config.oneshot is False
    assert config.debug is False
    assert config.services == []


def test_default_storage_uses_platform_state_dir_without_state_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import platformdirs

    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    expected = platformdirs.PlatformDirs(
        "tbot-py", appauthor=False, use_site_for_root=True
    ).user_state_dir
    assert load("version: v2\n").storage == DirectoryDestination(path=expected)


def test_keys_left_empty_mean_their_defaults() -> None:
    config = load("version: v2\nproxy_server:\nonboarding:\nservices:\noneshot:\n")
    assert config == load("version: v2\n")


def test_ssh_config_accepts_yaml_booleans_and_strings() -> None:
    config = load(
        """\
        version: v2
        services:
          - {type: identity, ssh_config: on, destination: {type: memory}}
          - {type: identity, ssh_config: "off", destination: {type: memory}}
          - {type: identity, ssh_config: false, destination: {type: memory}}
        """
    )
    assert [s.ssh_config for s in config.services] == ["on", "off", "off"]


def test_outputs_are_appended_to_services_and_named_per_type() -> None:
    config = load(
        """\
        version: v2
        services:
          - {type: identity, destination: {type: directory, path: /a}}
        outputs:
          - {type: identity, destination: {type: directory, path: /b}}
          - {type: identity, name: custom, destination: {type: directory, path: /c}}
        """
    )
    assert [s.name for s in config.services] == ["identity-1", "identity-2", "custom"]
    assert config.outputs == []


def test_certificate_ttl_is_a_deprecated_alias_of_credential_ttl() -> None:
    config = load("version: v2\ncertificate_ttl: 45m\n")
    assert config.credential_ttl == timedelta(minutes=45)
    assert config.warnings == [
        f"{SOURCE}:2: certificate_ttl: certificate_ttl is deprecated, use credential_ttl"
    ]


def test_credential_ttl_wins_over_certificate_ttl() -> None:
    config = load("version: v2\ncredential_ttl: 2h\ncertificate_ttl: 45m\n")
    assert config.credential_ttl == timedelta(hours=2)


def test_top_level_insecure_means_onboarding_insecure() -> None:
    config = load("version: v2\ninsecure: true\n")
    assert config.onboarding.insecure is True


def test_suboptimal_lifetimes_are_warnings_with_lines_not_errors() -> None:
    config = load(
        """\
        version: v2
        credential_ttl: 10m
        renewal_interval: 20m
        services:
          - type: identity
            destination: {type: memory}
            credential_ttl: 48h
            renewal_interval: 1h
        """
    )
    assert config.warnings == [
        f"{SOURCE}:2: credential_ttl: credential_ttl 10m is shorter than renewal_interval 20m: "
        "credentials will expire before they are renewed",
        f"{SOURCE}:7: services[0].credential_ttl: credential_ttl 48h is longer than 24h; "
        "the server will likely issue shorter credentials",
    ]


def test_short_ttl_is_fine_in_oneshot_mode() -> None:
    config = load("version: v2\noneshot: true\ncredential_ttl: 10m\nrenewal_interval: 20m\n")
    assert config.warnings == []


def test_require_address_names_both_keys_when_neither_is_set() -> None:
    with pytest.raises(ConfigError) as info:
        load("version: v2\n").require_address()
    assert str(info.value) == "either proxy_server or auth_server must be set"
    assert load("version: v2\nauth_server: auth:3025\n").require_address() == "auth:3025"


# --- errors: each names the file, the line and the key ------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "version: v2\nservices:\n  - type: identity\n   destination: x\n",
            f"{SOURCE}:4: invalid YAML: expected <block end>, but found '<block mapping start>' "
            "(check the indentation)",
            id="bad-indentation",
        ),
        pytest.param(
            "version: v2\nonboarding:\n\ttoken: x\n",
            f"{SOURCE}:3: invalid YAML: found character '\\t' that cannot start any token "
            "(YAML does not allow tabs for indentation)",
            id="tab",
        ),
        pytest.param(
            "version: v2\nproxy_server\nfoo: 1\n",
            f"{SOURCE}:2: invalid YAML: could not find expected ':' after a key",
            id="missing-colon",
        ),
        pytest.param(
            "version: v2\nproxy_server: [a\n",
            f"{SOURCE}:3: invalid YAML: expected ',' or ']', but got '<stream end>'",
            id="unclosed-list",
        ),
        pytest.param(
            "version: v2\nversion: v2\n", f'{SOURCE}:2: duplicate key "version"', id="dup-key"
        ),
    ],
)
def test_malformed_yaml_is_reported_at_its_line(text: str, expected: str) -> None:
    assert str(error_for(text)) == expected


def test_keys_that_yaml_reads_as_non_strings_are_rejected_at_their_line() -> None:
    err = error_for("version: v2\nonboarding:\n  on: x\n")
    assert (
        str(err) == f'{SOURCE}:3: onboarding: key "on" is read as a boolean, not a string; quote it'
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", f'{SOURCE}: the config file is empty; it needs at least "version: v2"'),
        (
            "# only a comment\n",
            f'{SOURCE}: the config file is empty; it needs at least "version: v2"',
        ),
        ("- a\n", f"{SOURCE}:1: expected a mapping of config keys at the top level, got a list"),
        (
            "v2\n",
            f"{SOURCE}:1: expected a mapping of config keys at the top level, got a single value",
        ),
    ],
)
def test_empty_or_non_mapping_file_is_rejected(text: str, expected: str) -> None:
    assert str(error_for(text)) == expected


def test_missing_version_says_only_v2_is_supported() -> None:
    err = error_for("proxy_server: a.example.com:443\n")
    assert str(err) == (
        f'{SOURCE}:1: missing key "version": only v2 configs are supported, '
        'add "version: v2" at the top of the file'
    )


def test_other_version_is_rejected() -> None:
    err = error_for("proxy_server: a.example.com:443\nversion: v1\n")
    assert str(err) == (
        f'{SOURCE}:2: version: unsupported config version "v1": '
        "only v2 configs are supported (use version: v2)"
    )


def test_wrong_type_names_expected_and_actual_types() -> None:
    err = error_for(
        """\
        version: v2
        services:
          - type: identity
            destination:
              type: directory
              path: 12
        """
    )
    assert (
        str(err) == f"{SOURCE}:6: services[0].destination.path: expected a string, got an integer"
    )
    assert (err.source, err.line, err.yaml_path) == (SOURCE, 6, "services[0].destination.path")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("oneshot: yes please", "oneshot: expected true or false, got a string"),
        ("debug: 1", "debug: expected true or false, got an integer"),
        ("proxy_server: [a]", "proxy_server: expected a string, got a list"),
        ("onboarding: token", "onboarding: expected a mapping, got a string"),
        ("services: {}", "services: expected a list, got a mapping"),
        (
            "storage: {type: directory, path: }",
            "storage.path: expected a string, got an empty value",
        ),
        (
            "credential_ttl: 60",
            "credential_ttl: expected a duration such as 20m or 1h, got an integer",
        ),
    ],
)
def test_type_errors_are_short_and_located(line: str, expected: str) -> None:
    assert str(error_for(f"version: v2\n{line}\n")) == f"{SOURCE}:2: {expected}"


def test_unknown_top_level_key_is_an_error_at_its_line() -> None:
    err = error_for("version: v2\nproxy_server: a.example.com:443\nfoo: 1\n")
    assert str(err) == f'{SOURCE}:3: unknown key "foo"'


def test_unknown_key_suggests_the_close_match() -> None:
    err = error_for("version: v2\nproxy_sever: a.example.com:443\n")
    assert str(err) == f'{SOURCE}:2: unknown key "proxy_sever"; did you mean "proxy_server"?'


def test_misspelt_required_key_in_a_service_reports_the_typo_only() -> None:
    err = error_for(
        """\
        version: v2
        services:
          - type: identity
            destnation:
              type: memory
        """
    )
    assert str(err) == (
        f'{SOURCE}:4: services[0]: unknown key "destnation"; did you mean "destination"?'
    )


def test_unknown_key_inside_a_destination_is_an_error() -> None:
    err = error_for(
        """\
        version: v2
        services:
          - type: identity
            destination:
              type: directory
              path: /out
              symlink: secure
        """
    )
    assert (
        str(err)
        == f'{SOURCE}:7: services[0].destination: unknown key "symlink"; did you mean "symlinks"?'
    )


def test_symlinks_acls_and_readers_of_a_directory_destination_load() -> None:
    config = load(
        """\
        version: v2
        services:
          - type: identity
            destination:
              type: directory
              path: /out
              symlinks: secure
              acls: required
              readers: [{user: jenkins}, {group: 4242}]
        """
    )
    service = config.services[0]
    assert isinstance(service, IdentityServiceConfig)
    destination = service.destination
    assert isinstance(destination, DirectoryDestination)
    assert (destination.symlinks, destination.acls) == ("secure", "required")
    assert [(r.kind, r.id) for r in destination.readers] == [("user", "jenkins"), ("group", "4242")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("symlinks: sometimes", "symlinks"),
        ("acls: maybe", "acls"),
        ("readers: [{user: a, group: b}]", "readers[0]: give exactly one of user or group"),
        ("readers: [{}]", "readers[0]: give exactly one of user or group"),
        ("readers: [{user: -1}]", "readers[0].user: must be a name or a non-negative id"),
    ],
)
def test_bad_symlinks_acls_or_readers_point_at_the_line(line: str, message: str) -> None:
    err = error_for(
        "version: v2\nservices:\n  - type: identity\n    destination:\n"
        f"      type: directory\n      path: /out\n      {line}\n"
    )
    assert str(err).startswith(f"{SOURCE}:7: services[0].destination.")
    assert message in str(err)


def test_unknown_service_type_lists_supported_types() -> None:
    err = error_for("version: v2\nservices:\n  - type: foo\n    destination: {type: memory}\n")
    assert str(err) == (
        f'{SOURCE}:3: services[0].type: unknown service type "foo" (supported: identity, ssh_host, '
        "workload-identity-x509, workload-identity-jwt, application, database)"
    )


def test_known_but_unsupported_service_type_says_not_supported_yet() -> None:
    err = error_for("version: v2\nservices:\n  - destination: {type: memory}\n    type: vnet\n")
    assert str(err) == (
        f'{SOURCE}:4: services[0].type: service type "vnet" is not supported yet '
        "(supported: identity, ssh_host, workload-identity-x509, workload-identity-jwt, "
        "application, database)"
    )


def test_service_without_type_is_an_error() -> None:
    err = error_for("version: v2\nservices:\n  - destination: {type: memory}\n")
    assert str(err) == (
        f'{SOURCE}:3: services[0]: missing required key "type" (one of: identity, ssh_host, '
        "workload-identity-x509, workload-identity-jwt, application, database)"
    )


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        (
            "{type: kubernetes_secret, name: x}",
            'destination type "kubernetes_secret" is not supported yet',
        ),
        ("{type: s3}", 'unknown destination type "s3"'),
    ],
)
def test_unsupported_destination_types_are_rejected(destination: str, expected: str) -> None:
    err = error_for(f"version: v2\nservices:\n  - type: identity\n    destination: {destination}\n")
    assert str(err) == (
        f"{SOURCE}:4: services[0].destination.type: {expected} (supported: directory, memory)"
    )


def test_missing_destination_path_is_reported_at_the_destination() -> None:
    err = error_for(
        """\
        version: v2
        services:
          - type: identity
            destination:
              type: directory
        """
    )
    assert str(err) == f'{SOURCE}:4: services[0].destination: missing required key "path"'


def test_empty_destination_path_is_an_error() -> None:
    err = error_for("version: v2\nstorage:\n  type: directory\n  path: ''\n")
    assert str(err) == f"{SOURCE}:4: storage.path: must not be empty"


def test_missing_destination_is_an_error() -> None:
    err = error_for("version: v2\nservices:\n  - type: identity\n    roles: []\n")
    assert str(err) == f'{SOURCE}:3: services[0]: missing required key "destination"'


def test_both_proxy_and_auth_server_is_an_error() -> None:
    err = error_for(
        "version: v2\nproxy_server: p.example.com:443\nauth_server: a.example.com:3025\n"
    )
    assert (
        str(err) == f"{SOURCE}:3: auth_server: proxy_server and auth_server are mutually exclusive"
    )


@pytest.mark.parametrize(
    "address", ["proxy.example.com", "https://proxy.example.com:443", "p:0", "p:99999"]
)
def test_address_must_be_host_and_port(address: str) -> None:
    err = error_for(f"version: v2\nproxy_server: '{address}'\n")
    assert err.line == 2
    assert (
        err.message
        == f'invalid address "{address}": expected host:port, e.g. proxy.example.com:443'
    )


@pytest.mark.parametrize(
    ("onboarding", "line", "expected"),
    [
        (
            f"insecure: true\n  ca_pins: [{PIN}]",
            4,
            "onboarding.ca_pins: ca_pins and insecure are mutually exclusive",
        ),
        (
            "insecure: true\n  ca_path: /ca.pem",
            4,
            "onboarding.ca_path: ca_path and insecure are mutually exclusive",
        ),
        (
            f"ca_pins: [{PIN}]\n  ca_path: /ca.pem",
            4,
            "onboarding.ca_path: ca_pins and ca_path are mutually exclusive",
        ),
    ],
)
def test_trust_options_exclude_each_other(onboarding: str, line: int, expected: str) -> None:
    err = error_for(f"version: v2\nonboarding:\n  {onboarding}\n")
    assert str(err) == f"{SOURCE}:{line}: {expected}"


def test_top_level_insecure_conflicts_with_ca_pins() -> None:
    err = error_for(f"version: v2\ninsecure: true\nonboarding:\n  ca_pins:\n    - {PIN}\n")
    assert (
        str(err) == f"{SOURCE}:4: onboarding.ca_pins: ca_pins and insecure are mutually exclusive"
    )


@pytest.mark.parametrize(
    "pin", ["sha256:abc", "sha256:" + "AB" * 32, "sha1:" + "ab" * 32, "ab" * 32]
)
def test_bad_ca_pin_format_is_reported_at_the_item(pin: str) -> None:
    err = error_for(f"version: v2\nonboarding:\n  ca_pins:\n    - {PIN}\n    - '{pin}'\n")
    assert err.line == 5
    assert err.yaml_path == "onboarding.ca_pins[1]"
    assert (
        err.message
        == f'invalid CA pin "{pin}": expected "sha256:" followed by 64 lowercase hex digits'
    )


SUPPORTED = "token, kubernetes, github, gitlab, generic_oidc"


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("azure", f'join method "azure" is not supported yet (supported: {SUPPORTED})'),
        (
            "bound_keypair",
            f'join method "bound_keypair" is not supported yet (supported: {SUPPORTED})',
        ),
        ("ec2", f'unknown join method "ec2" (supported: {SUPPORTED})'),
    ],
)
def test_unimplemented_join_methods_are_rejected(method: str, expected: str) -> None:
    err = error_for(f"version: v2\nonboarding:\n  join_method: {method}\n")
    assert str(err) == f"{SOURCE}:3: onboarding.join_method: {expected}"


def test_half_a_service_lifetime_is_an_error() -> None:
    err = error_for(
        """\
        version: v2
        services:
          - type: identity
            destination: {type: memory}
            renewal_interval: 5m
        """
    )
    assert str(err) == (
        f"{SOURCE}:5: services[0].renewal_interval: "
        "credential_ttl and renewal_interval must both be set if either is"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20x", 'invalid duration "20x" (use Go syntax such as 30s, 20m, 1h)'),
        ("0s", 'duration must be greater than zero, got "0s"'),
        ("-5m", 'invalid duration "-5m": must not be negative'),
    ],
)
def test_bad_durations_are_rejected(value: str, expected: str) -> None:
    err = error_for(f"version: v2\nrenewal_interval: {value}\n")
    assert str(err) == f"{SOURCE}:2: renewal_interval: {expected}"


def test_duplicate_service_names_are_an_error_at_the_second_name() -> None:
    err = error_for(
        """\
        version: v2
        services:
          - type: identity
            name: ci
            destination: {type: memory}
          - type: identity
            name: ci
            destination: {type: memory}
        """
    )
    assert (
        str(err)
        == f'{SOURCE}:7: services[1].name: service name "ci" is already used by services[0]'
    )


def test_explicit_name_clashing_with_a_generated_name_is_an_error() -> None:
    err = error_for(
        """\
        version: v2
        services:
          - type: identity
            destination: {type: memory}
          - type: identity
            name: identity-1
            destination: {type: memory}
        """
    )
    assert err.line == 6
    assert err.message == 'service name "identity-1" is already used by services[0]'


@pytest.mark.parametrize("name", ["identity", "heartbeat", "ca-rotation"])
def test_reserved_service_names_are_rejected(name: str) -> None:
    err = error_for(
        "version: v2\nservices:\n  - type: identity\n"
        f"    name: {name}\n    destination: {{type: memory}}\n"
    )
    assert err.line == 4
    assert err.yaml_path == "services[0].name"
    assert f'service name "{name}" is reserved' in err.message


def test_invalid_service_name_characters_are_rejected() -> None:
    err = error_for(
        "version: v2\nservices:\n  - type: identity\n"
        "    name: My Output\n    destination: {type: memory}\n"
    )
    assert str(err) == (
        f'{SOURCE}:4: services[0].name: invalid service name "My Output": '
        'use only lowercase letters, digits, "_", "-" and "+"'
    )


def test_two_services_writing_to_the_same_directory_is_an_error() -> None:
    err = error_for(
        """\
        version: v2
        services:
          - type: identity
            destination: {type: directory, path: /opt/out}
          - type: identity
            destination:
              type: directory
              path: /opt/./out/
        """
    )
    assert str(err) == (
        f"{SOURCE}:8: services[1].destination.path: "
        "directory /opt/out is already used by services[0]"
    )


def test_service_writing_to_the_storage_directory_is_an_error(tmp_path: Path) -> None:
    cwd = os.getcwd()
    err = error_for(
        f"""\
        version: v2
        storage: {{type: directory, path: {cwd}}}
        services:
          - type: identity
            destination: {{type: directory, path: .}}
        """
    )
    assert str(err) == (
        f"{SOURCE}:5: services[0].destination.path: directory {cwd} is already used by "
        "the storage directory"
    )


def test_several_errors_report_the_first_in_file_order_and_count_the_rest() -> None:
    err = error_for(
        """\
        version: v2
        debug: 1
        oneshot: nope
        services:
          - type: identity
            destination: {type: directory, path: 5}
        credential_ttl: 20x
        """
    )
    assert (
        str(err) == f"{SOURCE}:2: debug: expected true or false, got an integer (and 3 more errors)"
    )


def test_errors_in_an_alias_point_at_the_anchored_text() -> None:
    err = error_for(
        """\
        version: v2
        services:
          - &out
            type: identity
            destination:
              type: directory
              path: /opt/out
          - *out
        """
    )
    assert str(err) == (
        f"{SOURCE}:7: services[1].destination.path: "
        "directory /opt/out is already used by services[0]"
    )


# --- files ---------------------------------------------------------------------------------


def test_load_config_file_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "tbot.yaml"
    path.write_text("version: v2\nfoo: bar\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == f'{path}:2: unknown key "foo"'


def test_load_config_file_reads_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "tbot.yaml"
    path.write_text("version: v2\nproxy_server: p.example.com:443\n")
    assert load_config_file(str(path)).proxy_server == "p.example.com:443"


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"^config file {path} does not exist$"):
        load_config_file(path)


def test_directory_as_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read: it is a directory"):
        load_config_file(tmp_path)


def test_unreadable_config_file_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tbot.yaml"
    path.write_text("version: v2\n")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file; simulate what everyone else gets
        monkeypatch.setattr(Path, "read_text", _raise_permission_error)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == f"config file {path} cannot be read: permission denied"


def _raise_permission_error(*_args: object, **_kwargs: object) -> str:
    raise PermissionError(13, "Permission denied")
