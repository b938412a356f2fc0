"""The v2 config: schema, YAML loading with located errors, CLI overrides, URIs and rendering.

Everything here is pure (no network); only the loader and ``Onboarding.read_token`` read files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tbot_py.config._checks import ConfigWarning
from tbot_py.config.duration import InvalidDurationError, format_duration, parse_duration
from tbot_py.config.overrides import (
    CLIOverrides,
    append_service,
    apply_overrides,
    identity_service_from_flags,
    ssh_host_service_from_flags,
)
from tbot_py.config.schema import (
    DEFAULT_CREDENTIAL_TTL,
    DEFAULT_RENEWAL_INTERVAL,
    BotConfig,
    Destination,
    DirectoryDestination,
    HookConfig,
    IdentityServiceConfig,
    MemoryDestination,
    Onboarding,
    ServiceConfig,
    SSHHostServiceConfig,
    default_storage,
)
from tbot_py.config.uri import destination_from_uri, destination_to_uri

if TYPE_CHECKING:
    from tbot_py.config.loader import load_config_file, load_config_text
    from tbot_py.config.render import render_config_yaml

# The YAML loader and renderer import PyYAML; a one-shot run from flags alone needs neither.
_LAZY = {
    "load_config_file": "tbot_py.config.loader",
    "load_config_text": "tbot_py.config.loader",
    "render_config_yaml": "tbot_py.config.render",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_CREDENTIAL_TTL",
    "DEFAULT_RENEWAL_INTERVAL",
    "BotConfig",
    "CLIOverrides",
    "ConfigWarning",
    "Destination",
    "DirectoryDestination",
    "HookConfig",
    "IdentityServiceConfig",
    "SSHHostServiceConfig",
    "InvalidDurationError",
    "MemoryDestination",
    "Onboarding",
    "ServiceConfig",
    "append_service",
    "apply_overrides",
    "default_storage",
    "destination_from_uri",
    "destination_to_uri",
    "format_duration",
    "identity_service_from_flags",
    "ssh_host_service_from_flags",
    "load_config_file",
    "load_config_text",
    "parse_duration",
    "render_config_yaml",
]
