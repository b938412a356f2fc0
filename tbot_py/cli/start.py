"""``tbot-py start`` and ``tbot-py configure``: build a config from a file and flags, then run it.

Flag names and environment variables follow tbot (tbot.md §6): ``--proxy-server``
(``TELEPORT_PROXY``), ``--token`` (``TELEPORT_BOT_TOKEN``), ``-c`` (``TBOT_CONFIG_PATH``).
Flags override the file, and each override is logged, never silent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tbot_py.cli.main import setup_logging
from tbot_py.config import (
    BotConfig,
    CLIOverrides,
    append_service,
    apply_overrides,
    identity_service_from_flags,
    ssh_host_service_from_flags,
)
from tbot_py.errors import ConfigError

log = logging.getLogger("tbot_py.cli")
F = TypeVar("F", bound=Callable[..., Any])


def _config_options(func: F) -> F:
    """The flags every ``start``/``configure`` form accepts."""
    options = [
        click.option(
            "-c",
            "--config",
            "config_path",
            envvar="TBOT_CONFIG_PATH",
            type=click.Path(dir_okay=False),
            help="Config file (env TBOT_CONFIG_PATH).",
        ),
        click.option(
            "-a",
            "--auth-server",
            envvar="TELEPORT_AUTH_SERVER",
            help="Auth service address host:port (env TELEPORT_AUTH_SERVER).",
        ),
        click.option(
            "--proxy-server",
            envvar="TELEPORT_PROXY",
            help="Proxy or auth service address host:port (env TELEPORT_PROXY).",
        ),
        click.option(
            "--token",
            envvar="TELEPORT_BOT_TOKEN",
            show_envvar=False,
            help="Join token, or an absolute path to a file holding it "
            "(env TELEPORT_BOT_TOKEN; prefer a file or the env over argv). With an OIDC "
            "join method: the name of the token resource (not a secret).",
        ),
        click.option(
            "--join-method", help="Join method: token, kubernetes, github, gitlab or generic_oidc."
        ),
        click.option(
            "--ca-pin",
            "ca_pins",
            multiple=True,
            help="CA pin sha256:<hex> for the first contact; repeatable.",
        ),
        click.option("--ca-path", help="CA certificate PEM for the first contact."),
        click.option(
            "--insecure/--no-insecure",
            default=None,
            help="Do not verify the server on first contact (unsafe).",
        ),
        click.option(
            "--storage",
            "--data-dir",
            "storage",
            help="Bot storage: a directory path, file:///path or memory://.",
        ),
        click.option(
            "--certificate-ttl",
            "--credential-ttl",
            "credential_ttl",
            help="Credential lifetime, e.g. 1h.",
        ),
        click.option("--renewal-interval", help="Renewal interval, e.g. 20m."),
        click.option(
            "--oneshot/--no-oneshot", default=None, help="Write every output once and exit."
        ),
        click.option("-d", "--debug/--no-debug", default=None, help="Verbose logging."),
        click.option(
            "--log-format",
            type=click.Choice(["text", "json"]),
            default="text",
            help="Log lines as text (default) or one JSON object per line.",
        ),
        click.option(
            "--diag-addr",
            help="Serve /livez, /readyz, /wait and /metrics here, e.g. 127.0.0.1:3001.",
        ),
        click.option(
            "--watch-config",
            is_flag=True,
            default=False,
            help="Reload when the config file's content changes (as on SIGHUP).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _setup_logging(params: dict[str, Any]) -> None:
    setup_logging(debug=bool(params.get("debug")), log_format=params.get("log_format") or "text")


def _identity_options(func: F) -> F:
    """The flags of the ``identity`` output."""
    options = [
        click.option(
            "--destination",
            required=True,
            help="Where to write: a directory path, file:///path or memory://.",
        ),
        click.option(
            "--roles", default="", help="Comma-separated roles (default: all the bot holds)."
        ),
        click.option(
            "--allow-reissue/--no-allow-reissue",
            default=False,
            help="Let tsh reissue the credentials (for apps and databases).",
        ),
        click.option(
            "--ssh-config",
            type=click.Choice(["on", "off"]),
            default="on",
            help="Write ssh_config and known_hosts.",
        ),
        click.option("--name", help="Service name (default identity-N)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _ssh_host_options(func: F) -> F:
    """The flags of the ``ssh_host`` output."""
    options = [
        click.option(
            "--destination",
            required=True,
            help="Where to write: a directory path, file:///path or memory://.",
        ),
        click.option(
            "--principals",
            required=True,
            help="Comma-separated host names and addresses the certificate is valid for.",
        ),
        click.option("--name", help="Service name (default ssh_host-N)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _build_config(params: dict[str, Any], *, load_file: bool) -> BotConfig:
    """The config file (if any) with the flags applied, validated."""
    base = None
    path = params.get("config_path")
    if load_file and path:
        from tbot_py.config.loader import load_config_file  # YAML only when there is a file

        base = load_config_file(path)
    overrides = CLIOverrides(
        proxy_server=params.get("proxy_server"),
        auth_server=params.get("auth_server"),
        token=params.get("token"),
        join_method=params.get("join_method"),
        ca_pins=tuple(params.get("ca_pins") or ()),
        ca_path=params.get("ca_path"),
        insecure=params.get("insecure"),
        storage=params.get("storage"),
        credential_ttl=params.get("credential_ttl"),
        renewal_interval=params.get("renewal_interval"),
        oneshot=params.get("oneshot"),
        debug=params.get("debug"),
        diag_addr=params.get("diag_addr"),
    )
    return apply_overrides(base, overrides)


def _with_identity_service(config: BotConfig, params: dict[str, Any]) -> BotConfig:
    roles = [r.strip() for r in str(params.get("roles") or "").split(",") if r.strip()]
    service = identity_service_from_flags(
        params["destination"],
        roles=roles,
        allow_reissue=bool(params.get("allow_reissue")),
        ssh_config=params.get("ssh_config") or "on",
        name=params.get("name"),
    )
    return append_service(config, service)


def _with_ssh_host_service(config: BotConfig, params: dict[str, Any]) -> BotConfig:
    principals = [p.strip() for p in str(params.get("principals") or "").split(",") if p.strip()]
    service = ssh_host_service_from_flags(
        params["destination"], principals=principals, name=params.get("name")
    )
    return append_service(config, service)


def own_executable() -> str:
    """How ssh_config's ProxyCommand should call us: this script's absolute path if we can tell."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "tbot-py" and os.path.exists(argv0):
        return os.path.abspath(argv0)
    return shutil.which("tbot-py") or "tbot-py"


# Test-only fault injection: kill the process between the server's renewal answer and
# the write, to prove a crash there cannot lock the bot out. Never set in production.
_FAULT_KILL_AFTER_RENEW = "TBOT_PY_TEST_KILL_AFTER_RENEW_RESPONSE"


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run_config(
    config: BotConfig,
    reload: Callable[[], BotConfig] | None = None,
    log_format: str = "text",
    watch_config: str | None = None,
) -> None:
    """Log what the config says about itself, then run it once or in the background."""
    if config.debug:
        setup_logging(debug=True, log_format=log_format)
    for notice in config.notices:
        log.info("%s", notice)
    for warning in config.warnings:
        log.warning("%s", warning)
    config.require_address()
    if not config.services:
        raise ConfigError(
            "no services configured: add one under services: or use "
            "`tbot-py start identity --destination DIR`"
        )
    fault = _kill_self if os.environ.get(_FAULT_KILL_AFTER_RENEW) == "1" else None
    if not config.oneshot:
        _run_daemon(config, reload, fault, watch_config)
        return
    from tbot_py.bot.oneshot import run_oneshot

    result = asyncio.run(
        run_oneshot(config, executable=own_executable(), after_renew_response=fault)
    )
    for output in result.outputs:
        log.info("%s: %d files in %s", output.service, len(output.files), output.destination)


def _run_daemon(
    config: BotConfig,
    reload: Callable[[], BotConfig] | None,
    fault: Callable[[], None] | None,
    watch_config: str | None,
) -> None:
    from tbot_py.bot.daemon import Daemon
    from tbot_py.bot.oneshot import utc_now
    from tbot_py.diagnostics.health import HealthRegistry
    from tbot_py.diagnostics.http import DiagnosticsServer
    from tbot_py.diagnostics.metrics import Metrics
    from tbot_py.diagnostics.sdnotify import Notifier

    metrics = Metrics()
    health = HealthRegistry(utc_now, observer=metrics)
    server = None
    if config.diag_addr:
        server = DiagnosticsServer(config.diag_addr, health, metrics)
        log.info("diagnostics on http://%s (/livez /readyz /wait /metrics)", server.start())
    daemon = Daemon(
        config,
        executable=own_executable(),
        reload=reload,
        notifier=Notifier(os.environ),
        health=health,
        after_renew_response=fault,
        watch_config=watch_config if reload is not None else None,
    )
    try:
        asyncio.run(daemon.run())
    finally:
        if server is not None:
            server.stop()


@click.group(invoke_without_command=True)
@_config_options
@click.pass_context
def start(ctx: click.Context, /, **params: Any) -> None:
    """Start the bot from a config file: tbot-py start -c FILE [--oneshot]."""
    if ctx.invoked_subcommand is not None:
        return
    _setup_logging(params)
    if not params.get("config_path"):
        raise ConfigError(
            "no config file: pass -c FILE (or set TBOT_CONFIG_PATH), or use "
            "`tbot-py start identity --destination DIR ...`"
        )
    run_config(
        _build_config(params, load_file=True),
        reload=lambda: _build_config(params, load_file=True),
        log_format=params["log_format"],
        watch_config=params["config_path"] if params.get("watch_config") else None,
    )


#: Adds the output that a `start <type>`/`configure <type>` sub-command's flags describe.
WithService = Callable[[BotConfig, dict[str, Any]], BotConfig]


def _start_with(params: dict[str, Any], with_service: WithService) -> None:
    """`start <type>`: the config from -c (if any) and the flags, plus the flags' output."""
    _setup_logging(params)

    def build() -> BotConfig:
        return with_service(_build_config(params, load_file=True), params)

    reload = build if params.get("config_path") else None
    watch = params["config_path"] if params.get("watch_config") and reload else None
    run_config(build(), reload=reload, log_format=params["log_format"], watch_config=watch)


def _configure_with(params: dict[str, Any], with_service: WithService) -> None:
    """`configure <type>`: print (or write) the YAML the same flags describe."""
    _setup_logging(params)
    if params.get("config_path"):
        log.warning(
            "configure builds the config from flags only; ignoring -c %s", params["config_path"]
        )
    _print_config(with_service(_build_config(params, load_file=False), params), params)


_OUTPUT_OPTION = click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Write the config to this file (mode 0600) instead of stdout.",
)


@click.group()
def configure() -> None:
    """Print the config file equivalent to `start <type>` flags."""


def _print_config(config: BotConfig, params: dict[str, Any]) -> None:
    """Render ``config`` as YAML to stdout or to ``--output``."""
    from tbot_py.config.render import render_config_yaml

    text = render_config_yaml(config)
    output = params.get("output")
    if not output:
        click.echo(text, nl=False)
        return
    from tbot_py.destinations.fs import write_file_atomic

    path = Path(output).resolve()
    write_file_atomic(path, text.encode())
    log.info("wrote %s", path)


def _add_output(
    name: str,
    options: Callable[[Callable[..., Any]], Callable[..., Any]],
    with_service: WithService,
    *,
    start_help: str,
    configure_help: str,
    aliases: tuple[str, ...] = (),
) -> None:
    """Register ``start NAME`` and ``configure NAME`` (and ``aliases``) for one output type.

    Both take the common options and the output's own ``options``; ``configure`` also
    takes ``-o``. ``with_service`` adds the output those flags describe.
    """

    def run(**params: Any) -> None:
        _start_with(params, with_service)

    def show(**params: Any) -> None:
        _configure_with(params, with_service)

    start_command = click.command(name, help=start_help)(_config_options(options(run)))
    configure_command = click.command(name, help=configure_help)(
        _config_options(options(_OUTPUT_OPTION(show)))
    )
    for alias in (name, *aliases):
        start.add_command(start_command, alias)
        configure.add_command(configure_command, alias)


_add_output(
    "identity",
    _identity_options,
    _with_identity_service,
    start_help="Start with an identity output (for ssh, tsh and curl); aliases: ssh, id.",
    configure_help="Print the YAML for an identity output; aliases: ssh, id.",
    aliases=("ssh", "id"),
)
_add_output(
    "ssh-host",
    _ssh_host_options,
    _with_ssh_host_service,
    start_help="Start with an ssh_host output: a host key and certificate for an OpenSSH server.",
    configure_help="Print the YAML for an ssh_host output.",
)


# --- workload-identity-x509 / workload-identity-jwt ---------------------------------------------


def _workload_identity_options(*, jwt: bool) -> Callable[[F], F]:
    """tbot's flags of the workload identity outputs (start_workload_identity_{x509,jwt}.go)."""

    def decorate(func: F) -> F:
        options = [
            click.option(
                "--destination",
                required=True,
                help="Where to write: a directory path, file:///path or memory://.",
            ),
            click.option("--name-selector", help="The name of the workload identity to issue."),
            click.option(
                "--label-selector",
                help="Labels selecting the workload identity to issue: k1=v1,k2=v2.",
            ),
        ]
        if jwt:
            options.append(
                click.option(
                    "--audience",
                    "audiences",
                    multiple=True,
                    required=True,
                    help="An audience of the JWT; repeatable, at least one.",
                )
            )
        else:
            options.append(
                click.option(
                    "--include-federated-trust-bundles",
                    is_flag=True,
                    default=False,
                    help="Include federated trust bundles (not supported yet).",
                )
            )
        options.append(click.option("--name", help="Service name (default <type>-N)."))
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _selector_from_flags(params: dict[str, Any]) -> dict[str, Any]:
    name = params.get("name_selector") or ""
    spec = params.get("label_selector") or ""
    if name and spec:
        raise ConfigError("--name-selector and --label-selector are mutually exclusive")
    if name:
        return {"name": name}
    if not spec:
        raise ConfigError("--name-selector or --label-selector must be specified")
    labels: dict[str, list[str]] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--label-selector: expected k1=v1,k2=v2, got {item.strip()!r}")
        labels[key.strip()] = [value.strip()]
    return {"labels": labels}


def _with_workload_identity(kind: str) -> WithService:
    """The ``WithService`` of the ``kind`` workload identity sub-commands."""
    return lambda config, params: _with_workload_identity_service(config, params, kind)


def _with_workload_identity_service(
    config: BotConfig, params: dict[str, Any], kind: str
) -> BotConfig:
    from tbot_py.config.overrides import service_from_flags

    fields: dict[str, Any] = {"selector": _selector_from_flags(params)}
    if kind == "workload-identity-jwt":
        fields["audiences"] = list(params.get("audiences") or ())
    else:
        fields["include_federated_trust_bundles"] = bool(
            params.get("include_federated_trust_bundles")
        )
    service = service_from_flags(kind, params["destination"], fields, name=params.get("name"))
    return append_service(config, service)


_add_output(
    "workload-identity-x509",
    _workload_identity_options(jwt=False),
    _with_workload_identity("workload-identity-x509"),
    start_help="Start with a workload-identity-x509 output: an X.509 SVID, its key and the bundle.",
    configure_help="Print the YAML for a workload-identity-x509 output.",
)
_add_output(
    "workload-identity-jwt",
    _workload_identity_options(jwt=True),
    _with_workload_identity("workload-identity-jwt"),
    start_help="Start with a workload-identity-jwt output: a JWT-SVID for the audiences.",
    configure_help="Print the YAML for a workload-identity-jwt output.",
)


# --- application / database ---------------------------------------------------------------------


def _routed_options(kind: str) -> Callable[[F], F]:
    """tbot's flags of the application / database outputs (start_application.go etc.)."""

    def decorate(func: F) -> F:
        options = [
            click.option(
                "--destination",
                required=True,
                help="Where to write: a directory path, file:///path or memory://.",
            ),
        ]
        if kind == "application":
            options += [
                click.option("--app", required=True, help="The name of the app to route to."),
                click.option(
                    "--specific-tls-extensions",
                    is_flag=True,
                    default=False,
                    help="Also write tls.crt, tls.key and tls.cas.",
                ),
            ]
        else:
            options += [
                click.option("--service", required=True, help="The database service to route to."),
                click.option("--database", default="", help="The database name on the service."),
                click.option("--username", default="", help="The database user."),
                click.option(
                    "--format",
                    "db_format",
                    default="",
                    help='Extra artifacts: "" (none), tls, mongo or cockroach (a subdirectory).',
                ),
            ]
        options.append(click.option("--name", help="Service name (default <type>-N)."))
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _with_routed(kind: str) -> WithService:
    """The ``WithService`` of the ``application`` / ``database`` sub-commands."""
    return lambda config, params: _with_routed_service(config, params, kind)


def _with_routed_service(config: BotConfig, params: dict[str, Any], kind: str) -> BotConfig:
    from tbot_py.config.overrides import service_from_flags

    fields: dict[str, Any]
    if kind == "application":
        fields = {
            "app_name": params["app"],
            "specific_tls_extensions": bool(params.get("specific_tls_extensions")),
        }
    else:
        fields = {
            "service": params["service"],
            "database": params.get("database") or "",
            "username": params.get("username") or "",
            "format": params.get("db_format") or "",
        }
    service = service_from_flags(kind, params["destination"], fields, name=params.get("name"))
    return append_service(config, service)


_add_output(
    "application",
    _routed_options("application"),
    _with_routed("application"),
    start_help="Start with an application output: a TLS certificate routed to one app.",
    configure_help="Print the YAML for an application output.",
)
_add_output(
    "database",
    _routed_options("database"),
    _with_routed("database"),
    start_help="Start with a database output: a TLS certificate routed to one database service.",
    configure_help="Print the YAML for a database output.",
)
