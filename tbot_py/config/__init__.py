"""The v2 config: schema, YAML loading with located errors, CLI overrides, URIs and rendering.

Everything here is pure (no network); only the loader and ``Onboarding.read_token`` read files.
"""

from __future__ import annotations

from tbot_py.config._checks import ConfigWarning
from tbot_py.config.duration import InvalidDurationError, format_duration, parse_duration
from tbot_py.config.loader import load_config_file, load_config_text
from tbot_py.config.overrides import (
    CLIOverrides,
    append_service,
    apply_overrides,
    identity_service_from_flags,
)
from tbot_py.config.render import render_config_yaml
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
    default_storage,
)
from tbot_py.config.uri import destination_from_uri, destination_to_uri

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
    "load_config_file",
    "load_config_text",
    "parse_duration",
    "render_config_yaml",
]
