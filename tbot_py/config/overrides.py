"""Command-line flags applied over a config file (tbot's "mutators"), tbot.md §1.5.

Flags win, but never silently: each flag that replaces a value from the file leaves an INFO
notice on the new config (``BotConfig.notices``). Unlike tbot, one onboarding flag does not wipe
the whole ``onboarding`` block; fields merge one by one, except that the trust options exclude
each other (``--ca-pin`` drops ca_path, ``--ca-path`` drops ca_pins, ``--insecure`` drops both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from tbot_py.config._checks import (
    ConfigWarning,
    Loc,
    check_address,
    check_ca_pin,
    format_yaml_path,
)
from tbot_py.config.duration import InvalidDurationError, format_duration, parse_duration
from tbot_py.config.loader import config_error_from_validation, validate_config_data
from tbot_py.config.render import config_to_data, service_to_data
from tbot_py.config.schema import (
    SERVICE_MODELS,
    BotConfig,
    IdentityServiceConfig,
    ServiceConfig,
    SSHHostServiceConfig,
)
from tbot_py.config.uri import destination_from_uri
from tbot_py.errors import ConfigError

__all__ = ["CLIOverrides", "append_service", "apply_overrides", "identity_service_from_flags"]

_SERVICE_FLAGS: dict[str, str] = {
    "name": "--name",
    "destination": "--destination",
    "roles": "--roles",
    "allow_reissue": "--allow-reissue",
    "ssh_config": "--ssh-config",
    "principals": "--principals",
    "selector": "--name-selector/--label-selector",
    "include_federated_trust_bundles": "--include-federated-trust-bundles",
    "audiences": "--audience",
    "app_name": "--app",
    "specific_tls_extensions": "--specific-tls-extensions",
    "service": "--service",
    "database": "--database",
    "username": "--username",
    "format": "--format",
}


@dataclass(frozen=True)
class CLIOverrides:
    """Values of the config flags given on the command line; ``None`` means "not given"."""

    proxy_server: str | None = None
    auth_server: str | None = None
    token: str | None = field(default=None, repr=False)  # a secret: keep it out of reprs
    join_method: str | None = None
    ca_pins: tuple[str, ...] = ()
    ca_path: str | None = None
    insecure: bool | None = None
    storage: str | None = None  # a destination URI
    credential_ttl: str | None = None  # Go durations, parsed here
    renewal_interval: str | None = None
    oneshot: bool | None = None
    debug: bool | None = None
    diag_addr: str | None = None  # host:port of the diagnostics server


def apply_overrides(config: BotConfig | None, flags: CLIOverrides) -> BotConfig:
    """A new validated config: ``config`` (or the defaults, if None) with ``flags`` applied.

    The result's ``notices`` say which flags replaced values from the config file. Errors are
    ConfigErrors whose ``yaml_path`` is the offending flag, e.g. ``--ca-pin``.
    """
    _check_exclusive(flags)
    edit = _Edit(config)
    _apply_address(edit, flags)
    _apply_onboarding(edit, flags)
    if flags.storage is not None:
        storage = destination_from_uri(flags.storage, flag="--storage")
        edit.set(("storage",), storage.model_dump(), "--storage")
    if flags.credential_ttl is not None:
        ttl = _duration(flags.credential_ttl, "--credential-ttl")
        edit.set(("credential_ttl",), ttl, "--credential-ttl")
    if flags.renewal_interval is not None:
        interval = _duration(flags.renewal_interval, "--renewal-interval")
        edit.set(("renewal_interval",), interval, "--renewal-interval")
    if flags.oneshot is not None:
        edit.set(("oneshot",), flags.oneshot, "--oneshot")
    if flags.debug is not None:
        edit.set(("debug",), flags.debug, "--debug")
    if flags.diag_addr is not None:
        address = _flag_check(check_address, flags.diag_addr, "--diag-addr")
        edit.set(("diag_addr",), address, "--diag-addr")
    return edit.validate()


def _apply_address(edit: _Edit, flags: CLIOverrides) -> None:
    if flags.proxy_server is not None:
        address = _flag_check(check_address, flags.proxy_server, "--proxy-server")
        edit.set(("proxy_server",), address, "--proxy-server")
        edit.drop(("auth_server",), "--proxy-server")
    if flags.auth_server is not None:
        address = _flag_check(check_address, flags.auth_server, "--auth-server")
        edit.set(("auth_server",), address, "--auth-server")
        edit.drop(("proxy_server",), "--auth-server")


def _apply_onboarding(edit: _Edit, flags: CLIOverrides) -> None:
    if flags.token is not None:
        edit.set(("onboarding", "token"), flags.token, "--token")
    if flags.join_method is not None:
        edit.set(("onboarding", "join_method"), flags.join_method, "--join-method")
    if flags.ca_pins:
        pins = [_flag_check(check_ca_pin, pin, "--ca-pin") for pin in flags.ca_pins]
        edit.set(("onboarding", "ca_pins"), pins, "--ca-pin")
        edit.drop(("onboarding", "ca_path"), "--ca-pin")
        edit.drop(("onboarding", "insecure"), "--ca-pin")
    if flags.ca_path is not None:
        edit.set(("onboarding", "ca_path"), flags.ca_path, "--ca-path")
        edit.drop(("onboarding", "ca_pins"), "--ca-path")
        edit.drop(("onboarding", "insecure"), "--ca-path")
    if flags.insecure is not None:
        edit.set(("onboarding", "insecure"), flags.insecure, "--insecure")
        if flags.insecure:
            edit.drop(("onboarding", "ca_pins"), "--insecure")
            edit.drop(("onboarding", "ca_path"), "--insecure")


def service_from_flags(
    service_type: str,
    destination_uri: str,
    fields: Mapping[str, Any],
    *,
    name: str | None = None,
) -> ServiceConfig:
    """A ``service_type`` service from ``start <type>``/``configure <type>`` flags.

    ``fields`` are the service's own keys; a value that fails validation is reported
    against the flag that set it (``_SERVICE_FLAGS``).
    """
    data: dict[str, Any] = {
        "type": service_type,
        "destination": destination_from_uri(destination_uri).model_dump(),
        **fields,
    }
    if name is not None:
        data["name"] = name
    try:
        # SERVICE_MODELS maps each type to its own member of the ServiceConfig union.
        return cast("ServiceConfig", SERVICE_MODELS[service_type].model_validate(data))
    except ValidationError as exc:
        flags: dict[Loc, str] = {(key,): flag for key, flag in _SERVICE_FLAGS.items()}
        failure = config_error_from_validation(exc, data, flags=flags)
    raise failure


def identity_service_from_flags(
    destination_uri: str,
    *,
    roles: Iterable[str] = (),
    allow_reissue: bool = False,
    ssh_config: str = "on",
    name: str | None = None,
) -> IdentityServiceConfig:
    """An ``identity`` service from ``start identity``/``configure identity`` flags."""
    fields = {"roles": list(roles), "allow_reissue": allow_reissue, "ssh_config": ssh_config}
    service = service_from_flags("identity", destination_uri, fields, name=name)
    assert isinstance(service, IdentityServiceConfig)
    return service


def ssh_host_service_from_flags(
    destination_uri: str, *, principals: Iterable[str], name: str | None = None
) -> SSHHostServiceConfig:
    """An ``ssh_host`` service from ``start ssh-host``/``configure ssh-host`` flags."""
    fields = {"principals": list(principals)}
    service = service_from_flags("ssh_host", destination_uri, fields, name=name)
    assert isinstance(service, SSHHostServiceConfig)
    return service


def append_service(config: BotConfig, service: ServiceConfig) -> BotConfig:
    """A new config with ``service`` added after the configured ones, validated again.

    This is what ``start identity --destination`` does. Name and directory clashes with the
    file's services are reported against the service's flags (``--name``, ``--destination``).
    Call ``apply_overrides`` first: it tells file values from defaults only on a loaded config.
    """
    edit = _Edit(config)
    services = edit.data["services"]
    index = len(services)
    services.append(service_to_data(service))
    edit.flags[("services", index)] = "--destination"
    for key, flag in _SERVICE_FLAGS.items():
        edit.flags[("services", index, key)] = flag
    return edit.validate()


class _Edit:
    """The plain data of a config being changed by flags, and what each change replaced."""

    def __init__(self, config: BotConfig | None) -> None:
        self.base = config
        self.data: dict[str, Any] = config_to_data(config) if config else {"version": "v2"}
        self.data.setdefault("services", [])
        self.from_file = _keys_from_file(config)
        self.flags: dict[Loc, str] = {}
        self.notices: list[str] = list(config.notices) if config else []

    def set(self, loc: tuple[str, ...], value: Any, flag: str) -> None:
        parent = self._parent(loc)
        if loc in self.from_file and parent.get(loc[-1]) != value:
            self._notice(flag, loc)
        parent[loc[-1]] = value
        self.flags[loc] = flag

    def drop(self, loc: tuple[str, ...], flag: str) -> None:
        parent = self._parent(loc)
        if loc[-1] in parent:
            if loc in self.from_file and parent[loc[-1]] not in (None, False, []):
                self._notice(flag, loc)
            del parent[loc[-1]]

    def validate(self) -> BotConfig:
        config = validate_config_data(self.data, flags=self.flags)
        config._notices = self.notices
        config._warnings = _keep_located(config._warnings, self.base)
        return config

    def _parent(self, loc: tuple[str, ...]) -> dict[str, Any]:
        node = self.data
        for part in loc[:-1]:
            node = node.setdefault(part, {})
        return node

    def _notice(self, flag: str, loc: Loc) -> None:
        notice = f"flag {flag} overrides {format_yaml_path(loc)} from the config file"
        if notice not in self.notices:
            self.notices.append(notice)


def _keys_from_file(config: BotConfig | None) -> set[Loc]:
    if config is None:
        return set()
    keys: set[Loc] = {(name,) for name in config.model_fields_set}
    keys |= {("onboarding", name) for name in config.onboarding.model_fields_set}
    return keys


def _keep_located(warnings: list[ConfigWarning], base: BotConfig | None) -> list[ConfigWarning]:
    """Re-use the base config's warnings where unchanged: they know their file and line."""
    located = {(w.message, w.loc): w for w in (base._warnings if base else [])}
    return [located.get((w.message, w.loc), w) for w in warnings]


def _check_exclusive(flags: CLIOverrides) -> None:
    pairs: list[tuple[bool, str, str]] = [
        (
            flags.proxy_server is not None and flags.auth_server is not None,
            "--proxy-server",
            "--auth-server",
        ),
        (bool(flags.ca_pins) and flags.ca_path is not None, "--ca-pin", "--ca-path"),
        (bool(flags.ca_pins) and bool(flags.insecure), "--ca-pin", "--insecure"),
        (flags.ca_path is not None and bool(flags.insecure), "--ca-path", "--insecure"),
    ]
    for clash, first, second in pairs:
        if clash:
            raise ConfigError(f"{first} and {second} are mutually exclusive", yaml_path=second)


def _flag_check(check: Callable[[str], str], value: str, flag: str) -> str:
    try:
        return check(value)
    except PydanticCustomError as exc:
        raise ConfigError(exc.message(), yaml_path=flag) from None


def _duration(value: str, flag: str) -> str:
    try:
        parsed = parse_duration(value)
    except InvalidDurationError as exc:
        raise ConfigError(str(exc), yaml_path=flag) from None
    return format_duration(parsed)
