"""Value checks and error plumbing shared by the config models, the loader and the overrides.

A check that fails raises a pydantic ``tbot_config`` error whose context lists
``(location relative to the value, message)`` problems; the loader turns those into one
``ConfigError`` that points at the most specific key. Messages never contain secrets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator
from pydantic_core import PydanticCustomError

from tbot_py.config.duration import InvalidDurationError, format_duration, parse_duration
from tbot_py.errors import ConfigError

Loc = tuple[str | int, ...]

CONFIG_ERROR_TYPE = "tbot_config"
MAX_RENEWABLE_CREDENTIAL_TTL = timedelta(hours=24)
DEFAULT_HOOK_TIMEOUT = timedelta(seconds=30)
MAX_HOOK_TIMEOUT = timedelta(minutes=10)
HOOK_COMMAND_HINT = (
    'command must be an argv list such as ["systemctl", "reload", "nginx"]; '
    'use ["sh", "-c", "..."] for a shell'
)

#: Methods that join with an ID token from the platform (a JWT) and a token resource's name.
OIDC_JOIN_METHODS = ("kubernetes", "github", "gitlab", "generic_oidc")
SUPPORTED_JOIN_METHODS = ("token", *OIDC_JOIN_METHODS)
DEFAULT_ID_TOKEN_TIMEOUT = timedelta(seconds=10)
MAX_ID_TOKEN_TIMEOUT = timedelta(minutes=5)
OIDC_COMMAND_HINT = (
    'command must be an argv list such as ["/usr/local/bin/get-id-token", "--audience", "x"]; '
    'use ["sh", "-c", "..."] for a shell'
)
KNOWN_JOIN_METHODS = frozenset(
    {
        "azure",
        "azure_devops",
        "bitbucket",
        "bound_keypair",
        "circleci",
        "env0",
        "gcp",
        "generic_oidc",
        "github",
        "gitlab",
        "iam",
        "kubernetes",
        "oracle",
        "spacelift",
        "terraform_cloud",
        "token",
        "tpm",
    }
)
RESERVED_SERVICE_NAMES = frozenset(
    {"ca-rotation", "crl-cache", "heartbeat", "identity", "spiffe-trust-bundle-cache"}
)
_SERVICE_NAME = re.compile(r"^[a-z0-9_\-+]+$")
_CA_PIN = re.compile(r"^sha256:[0-9a-f]{64}$")
_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-_]*):([0-9]{1,5})$")


def config_problems(problems: list[tuple[Loc, str]]) -> PydanticCustomError:
    """A validation error carrying one or more (location relative to the value, message)."""
    return PydanticCustomError(
        CONFIG_ERROR_TYPE, "{message}", {"message": problems[0][1], "problems": problems}
    )


def config_problem(message: str, key: Loc = ()) -> PydanticCustomError:
    """A validation error located at ``key`` below the value being validated."""
    return config_problems([(key, message)])


def format_yaml_path(loc: Loc) -> str:
    """Render ``("services", 0, "destination")`` as ``services[0].destination``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def describe_type(value: object) -> str:
    """Name the YAML type of ``value`` for an error message (never the value itself)."""
    if value is None:
        return "an empty value"
    for kind, text in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a mapping"),
        (date, "a date"),
        (bytes, "binary data"),
    ):
        if isinstance(value, kind):
            return text
    return f"a {type(value).__name__}"


def read_text_file(path: str | Path) -> tuple[str, None] | tuple[None, str]:
    """``(text, None)``, or ``(None, problem)`` with a problem such as "does not exist"."""
    try:
        return Path(path).read_text(encoding="utf-8"), None
    except FileNotFoundError:
        return None, "does not exist"
    except PermissionError:
        return None, "cannot be read: permission denied"
    except IsADirectoryError:
        return None, "cannot be read: it is a directory"
    except UnicodeDecodeError:
        return None, "cannot be read: it is not UTF-8 text"
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror or type(exc).__name__}"


def normalise_path(path: str) -> str:
    """Absolute, normalised form of a directory path, for comparisons (no filesystem access)."""
    return os.path.normpath(os.path.abspath(path))


@dataclass(frozen=True)
class ConfigWarning:
    """A non-fatal problem found while validating, rendered like a ``ConfigError``."""

    message: str
    loc: Loc = ()
    source: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        return str(
            ConfigError(
                self.message,
                source=self.source,
                line=self.line,
                yaml_path=format_yaml_path(self.loc) or None,
            )
        )


def _to_positive_duration(value: object) -> object:
    if isinstance(value, str):
        try:
            value = parse_duration(value)
        except InvalidDurationError as exc:
            raise config_problem(str(exc)) from None
    elif not isinstance(value, timedelta):
        raise config_problem(f"expected a duration such as 20m or 1h, got {describe_type(value)}")
    if value <= timedelta(0):
        raise config_problem(f'duration must be greater than zero, got "{format_duration(value)}"')
    return value


def check_address(value: str) -> str:
    """Validate a ``host:port`` address; returns it unchanged."""
    match = _ADDRESS.match(value)
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        raise config_problem(
            f'invalid address "{value}": expected host:port, e.g. proxy.example.com:443'
        )
    return value


def check_ca_pin(value: str) -> str:
    """Validate a ``sha256:<64 lowercase hex>`` CA pin; returns it unchanged."""
    if not _CA_PIN.match(value):
        raise config_problem(
            f'invalid CA pin "{value}": expected "sha256:" followed by 64 lowercase hex digits'
        )
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise config_problem("must not be empty")
    return value


def _fspath(value: object) -> object:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _check_at_most(limit: timedelta, what: str) -> Callable[[timedelta], timedelta]:
    def check(value: timedelta) -> timedelta:
        if value > limit:
            raise config_problem(
                f'{what} must be at most {format_duration(limit)}, got "{format_duration(value)}"'
            )
        return value

    return check


def _argv_check(hint: str) -> Callable[[object], object]:
    """A check that a command is a non-empty argv list; a string gets ``hint``, no shell parsing."""

    def check(value: object) -> object:
        if isinstance(value, str):
            raise config_problem(hint)
        if not isinstance(value, list):
            raise config_problem(f"{hint} (got {describe_type(value)})")
        if not value:
            raise config_problem(f"must not be empty: {hint}")
        if isinstance(value[0], str) and not value[0].strip():
            raise config_problem("the program (first item) must not be empty", (0,))
        return value

    return check


check_hook_command = _argv_check(HOOK_COMMAND_HINT)
check_id_token_command = _argv_check(OIDC_COMMAND_HINT)


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise config_problem(f'must be an absolute path, got "{value}"')
    return value


def _env_var_name(value: str) -> str:
    if not _ENV_VAR_NAME.match(value):
        raise config_problem(
            f'invalid environment variable name "{value}": '
            'use letters, digits and "_", not starting with a digit'
        )
    return value


PositiveDuration = Annotated[timedelta, BeforeValidator(_to_positive_duration)]
HookTimeout = Annotated[
    timedelta,
    BeforeValidator(_to_positive_duration),
    AfterValidator(_check_at_most(MAX_HOOK_TIMEOUT, "hook timeout")),
]
IdTokenTimeout = Annotated[
    timedelta,
    BeforeValidator(_to_positive_duration),
    AfterValidator(_check_at_most(MAX_ID_TOKEN_TIMEOUT, "timeout")),
]
AbsolutePath = Annotated[str, BeforeValidator(_fspath), AfterValidator(_absolute_path)]
EnvVarName = Annotated[str, AfterValidator(_env_var_name)]
Address = Annotated[str, AfterValidator(check_address)]
NonEmptyPath = Annotated[str, BeforeValidator(_fspath), AfterValidator(_non_empty)]


def check_join_method(value: object) -> object:
    """Reject join methods tbot-py does not implement, telling tbot's known ones from typos."""
    if isinstance(value, str) and value not in SUPPORTED_JOIN_METHODS:
        supported = ", ".join(SUPPORTED_JOIN_METHODS)
        if value in KNOWN_JOIN_METHODS:
            raise config_problem(
                f'join method "{value}" is not supported yet (supported: {supported})'
            )
        raise config_problem(f'unknown join method "{value}" (supported: {supported})')
    return value


def trust_conflicts(
    *, insecure: bool, ca_pins: bool, ca_path: bool, prefix: Loc = ()
) -> list[tuple[Loc, str]]:
    """Problems with the first-contact trust options (tbot's mutual exclusion rules)."""
    problems: list[tuple[Loc, str]] = []
    if insecure and ca_pins:
        problems.append(((*prefix, "ca_pins"), "ca_pins and insecure are mutually exclusive"))
    if insecure and ca_path:
        problems.append(((*prefix, "ca_path"), "ca_path and insecure are mutually exclusive"))
    if ca_pins and ca_path:
        problems.append(((*prefix, "ca_path"), "ca_pins and ca_path are mutually exclusive"))
    return problems


def check_service_name(value: str) -> str:
    """Validate an explicit service name: tbot's character set, not a reserved name."""
    if not _SERVICE_NAME.match(value):
        raise config_problem(
            f'invalid service name "{value}": use only lowercase letters, digits, "_", "-" and "+"'
        )
    if value in RESERVED_SERVICE_NAMES:
        reserved = ", ".join(sorted(RESERVED_SERVICE_NAMES))
        raise config_problem(f'service name "{value}" is reserved (reserved: {reserved})')
    return value


def default_service_name(service_type: str, index: int) -> str:
    """tbot's generated name: the type with invalid characters replaced, then ``-<n>``."""
    return re.sub(r"[^a-z0-9_\-+]", "-", service_type) + f"-{index}"


def lifetime_warnings(
    ttl: timedelta, interval: timedelta, loc: Loc, oneshot: bool
) -> list[ConfigWarning]:
    """Suboptimal lifetimes: tbot only warns about these, so do we."""
    warnings = []
    if ttl < interval and not oneshot:
        warnings.append(
            ConfigWarning(
                f"credential_ttl {format_duration(ttl)} is shorter than renewal_interval "
                f"{format_duration(interval)}: credentials will expire before they are renewed",
                (*loc, "credential_ttl"),
            )
        )
    if ttl > MAX_RENEWABLE_CREDENTIAL_TTL:
        warnings.append(
            ConfigWarning(
                f"credential_ttl {format_duration(ttl)} is longer than 24h; "
                "the server will likely issue shorter credentials",
                (*loc, "credential_ttl"),
            )
        )
    return warnings
