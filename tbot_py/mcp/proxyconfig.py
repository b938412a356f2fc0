"""The access proxy's config file (``tbot-py mcp-proxy start --config FILE``) and its loader.

::

    version: v1
    listen: 127.0.0.1:3080            # HOST:PORT; port 0 = any free port
    public_addr: [mcp.example.com]    # extra names for the server certificate
    auth_server: 127.0.0.1:3025
    ca_pins: []                       # optional: the identity file's host CA must match one
    identity: /opt/machine-id-proxy/identity   # the proxy bot's identity output
    audit_log: /var/log/tbot-py/mcp-audit.log  # JSON lines
    session_recheck: 30s              # how often a live session's access is asked again
    apps:                             # optional; app resources on the auth service work too
      - name: weather
        uri: mcp+stdio://
        labels: {env: dev}
        mcp: {command: python3, args: [server.py]}

Strict like the bot's config: an unknown key, a wrong type or a bad value is one
:class:`~tbot_py.errors.ConfigError` naming the file, the line and the key. An app entry
is checked like an app resource (:mod:`tbot_py.authservice.apps`: name, labels, uri,
``rewrite.headers``, ``mcp``), and must be an MCP app. A header may only use the
templates the proxy fills in (:data:`HEADER_TEMPLATES`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, ValidationError, field_validator, model_validator

from tbot_py.authservice.apps import AppMetadata, AppSpec
from tbot_py.authservice.errors import AuthServiceError
from tbot_py.authservice.mcp_access import MCP_SCHEMES
from tbot_py.authservice.roles import _Strict
from tbot_py.authservice.server import parse_host_port
from tbot_py.client import wire
from tbot_py.config._checks import (
    Address,
    NonEmptyPath,
    PositiveDuration,
    check_ca_pin,
    config_problem,
    read_text_file,
)
from tbot_py.config.loader import _parse_yaml, config_error_from_validation
from tbot_py.errors import ConfigError

VERSION = "v1"
#: The header templates the proxy fills in, both with the JWT the auth service signs.
HEADER_TEMPLATES = ("{{internal.id_token}}", "{{internal.jwt}}")
_TEMPLATE_RE = re.compile(r"\{\{.*?\}\}")
_HOST_RE = re.compile(r"^[A-Za-z0-9:.][A-Za-z0-9.:\-_]*$")
DEFAULT_SESSION_RECHECK = timedelta(seconds=30)
#: Names for the server certificate besides the listen host (the auth service takes 16).
MAX_PUBLIC_ADDRS = wire.MAX_SERVER_CERT_NAMES - 1


def unsupported_template(header: str) -> str | None:
    """The first ``{{...}}`` in ``header`` the proxy cannot fill in, or None."""
    for match in _TEMPLATE_RE.finditer(header):
        if match.group(0).replace(" ", "") not in HEADER_TEMPLATES:
            return match.group(0)[:64]
    return None


def rewrite_headers(headers: Sequence[str], jwt: str) -> dict[str, str]:
    """``Name: value`` headers as a mapping, every template replaced by ``jwt``.

    Raises ValueError (one line, never the JWT) for a template the proxy cannot fill in,
    or when a header needs the JWT and there is none.
    """
    rewritten: dict[str, str] = {}
    for header in headers:
        name, _, value = header.partition(":")
        name = name.strip()
        template = unsupported_template(value)
        if template is not None:
            raise ValueError(
                f"header {name[:64]} uses the unsupported template {template}; "
                "use " + " or ".join(HEADER_TEMPLATES)
            )
        if _TEMPLATE_RE.search(value):
            if not jwt:
                raise ValueError(f"header {name[:64]} needs a JWT and the auth service sent none")
            value = _TEMPLATE_RE.sub(lambda _: jwt, value)
        rewritten[name] = value.strip()
    return rewritten


def _check_listen(value: str) -> str:
    try:
        parse_host_port(value, what="listen address")
    except AuthServiceError as exc:
        raise config_problem(exc.message) from None
    return value


def _check_public_addr(value: str) -> str:
    try:
        host, _ = parse_host_port(value, what="public_addr", port_required=False)
    except AuthServiceError as exc:
        raise config_problem(exc.message) from None
    if not _HOST_RE.match(host):
        raise config_problem(f"invalid public_addr {value[:64]!r}: use a DNS name or an IP address")
    return value


def _check_mcp_uri(value: str) -> str:
    scheme = value.partition("://")[0].lower()
    if scheme not in MCP_SCHEMES:
        raise config_problem(
            "the access proxy serves MCP apps only: use "
            + ", ".join(f"{s}://" for s in MCP_SCHEMES)
        )
    return value


class ProxyApp(AppMetadata, AppSpec):
    """An ``apps`` entry: an app resource's metadata and spec in one mapping, MCP only."""

    @field_validator("uri", mode="after")
    @classmethod
    def _mcp_only(cls, value: str) -> str:
        return _check_mcp_uri(value)

    @field_validator("public_addr", mode="after")
    @classmethod
    def _no_public_addr(cls, value: str) -> str:
        if value:
            raise config_problem("an app here has no public_addr; set it at the top level")
        return value

    @model_validator(mode="after")
    def _proxy_can_serve(self) -> ProxyApp:
        if self.mcp is not None and self.mcp.run_as_host_user:
            raise config_problem(
                "the access proxy runs stdio servers as its own user; remove run_as_host_user",
                ("mcp", "run_as_host_user"),
            )
        for index, header in enumerate(self.rewrite.headers if self.rewrite else ()):
            template = unsupported_template(header)
            if template is not None:
                raise config_problem(
                    f"unsupported header template {template}; use " + " or ".join(HEADER_TEMPLATES),
                    ("rewrite", "headers", index),
                )
        return self

    def to_mcp_app(self) -> wire.MCPApp:
        """The app as the auth service and the upstreams take it (source ``config``)."""
        return wire.MCPApp(
            name=self.name,
            uri=self.uri,
            labels=dict(self.labels),
            description=self.description,
            headers=self.rewrite.headers if self.rewrite else (),
            command=self.mcp.command if self.mcp else "",
            args=self.mcp.args if self.mcp else (),
            source="config",
        )


class ProxyConfig(_Strict):
    """The whole config file."""

    version: Literal["v1"]
    listen: Annotated[str, AfterValidator(_check_listen)]
    public_addr: tuple[Annotated[str, AfterValidator(_check_public_addr)], ...] = ()
    auth_server: Address
    ca_pins: tuple[Annotated[str, AfterValidator(check_ca_pin)], ...] = ()
    identity: NonEmptyPath
    audit_log: NonEmptyPath
    #: How often a live session's access is asked again: a lock, a removed role or app ends it.
    session_recheck: PositiveDuration = DEFAULT_SESSION_RECHECK
    apps: tuple[ProxyApp, ...] = ()

    @field_validator("public_addr", mode="after")
    @classmethod
    def _not_too_many(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > MAX_PUBLIC_ADDRS:
            raise config_problem(f"at most {MAX_PUBLIC_ADDRS} names, got {len(value)}")
        return value

    @field_validator("apps", mode="after")
    @classmethod
    def _unique_names(cls, apps: tuple[ProxyApp, ...]) -> tuple[ProxyApp, ...]:
        seen: set[str] = set()
        for index, app in enumerate(apps):
            if app.name in seen:
                raise config_problem(f'app "{app.name}" is defined twice', (index, "name"))
            seen.add(app.name)
        return apps

    @property
    def listen_host(self) -> str:
        """The host part of ``listen``."""
        return parse_host_port(self.listen, what="listen address")[0]

    @property
    def listen_port(self) -> int:
        """The port of ``listen``; 0 for any free port."""
        return parse_host_port(self.listen, what="listen address")[1]

    @property
    def public_hosts(self) -> tuple[str, ...]:
        """The hosts of ``public_addr``, without ports."""
        return tuple(
            parse_host_port(addr, what="public_addr", port_required=False)[0]
            for addr in self.public_addr
        )

    def config_app(self, name: str) -> ProxyApp | None:
        """The ``apps`` entry called ``name``, or None."""
        return next((app for app in self.apps if app.name == name), None)


def load_proxy_config(path: str | Path) -> ProxyConfig:
    """Read and validate the proxy's config file. Raises ConfigError naming file and line."""
    source = str(path)
    text, problem = read_text_file(path)
    if text is None:
        raise ConfigError(f"config file {source} {problem}")
    return parse_proxy_config(text, source=source)


def parse_proxy_config(text: str, source: str = "<mcp-proxy config>") -> ProxyConfig:
    """Validate the proxy's config given as text; ``source`` names it in errors."""
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        raise ConfigError(f'the config file is empty; it needs "version: {VERSION}"', source=source)
    data, lines = _parse_yaml(text, source)
    try:
        return ProxyConfig.model_validate(data)
    except ValidationError as exc:
        failure = config_error_from_validation(exc, data, source=source, lines=lines)
    raise failure  # outside ``except``: pydantic's error holds the input
