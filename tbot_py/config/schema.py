"""The v2 config schema: pydantic models, defaults and the validation rules of tbot.md §1.

Models are strict: unknown keys are errors everywhere, and YAML values are never coerced
(``"yes"`` is not a boolean, ``60`` is not a duration). Rules that span several fields report
every problem with its location (see ``_checks``), so the loader can point at the most specific
key. Warnings (never fatal) are kept on the config for the caller to log.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    model_validator,
)

from tbot_py.config._checks import (
    DEFAULT_HOOK_TIMEOUT,
    DEFAULT_ID_TOKEN_TIMEOUT,
    OIDC_JOIN_METHODS,
    AbsolutePath,
    Address,
    ConfigWarning,
    EnvVarName,
    HookTimeout,
    IdTokenTimeout,
    Loc,
    NonEmptyPath,
    PositiveDuration,
    check_ca_pin,
    check_hook_command,
    check_id_token_command,
    check_join_method,
    check_service_name,
    config_problem,
    config_problems,
    default_service_name,
    describe_type,
    format_yaml_path,
    lifetime_warnings,
    normalise_path,
    read_text_file,
    trust_conflicts,
)
from tbot_py.errors import ConfigError

if TYPE_CHECKING:
    from tbot_py.services.hooks import Hook

DEFAULT_CREDENTIAL_TTL = timedelta(hours=1)
DEFAULT_RENEWAL_INTERVAL = timedelta(minutes=20)
SUPPORTED_DESTINATION_TYPES = ("directory", "memory")
KNOWN_DESTINATION_TYPES = frozenset({*SUPPORTED_DESTINATION_TYPES, "kubernetes_secret"})
# Service types tbot knows; only those in SERVICE_MODELS (below) are implemented here.
KNOWN_SERVICE_TYPES = frozenset(
    {
        "application",
        "application-proxy",
        "application-tunnel",
        "bot-api",
        "database",
        "database-tunnel",
        "delegation",
        "identity",
        "identity-api",
        "identity/key-agent",
        "kubernetes",
        "kubernetes/argo-cd",
        "kubernetes/v2",
        "piv-agent",
        "spiffe-svid",
        "spiffe-workload-api",
        "ssh-multiplexer",
        "ssh_host",
        "vnet",
        "workload-identity-api",
        "workload-identity-aws-roles-anywhere",
        "workload-identity-jwt",
        "workload-identity-x509",
    }
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # A key left empty in YAML (``services:``) is null; like Go, treat it as not set.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].is_required()
        }


# --- onboarding -----------------------------------------------------------------------------


def _check_token(value: SecretStr) -> SecretStr:
    if not value.get_secret_value().strip():
        raise config_problem("must not be empty (remove the key if there is no token)")
    return value


JoinMethod = Literal["token", "kubernetes", "github", "gitlab", "generic_oidc"]
#: The ``onboarding`` sections that configure where one OIDC join method reads its ID token.
ID_TOKEN_SECTIONS = ("kubernetes", "gitlab", "generic_oidc")
DEFAULT_GITLAB_JWT_VAR = "TBOT_GITLAB_JWT"


class KubernetesOnboarding(_Model):
    """``onboarding.kubernetes``: the projected service account token file."""

    #: Unset: ``$KUBERNETES_TOKEN_PATH``, else the kubelet's default path (at read time).
    token_path: AbsolutePath | None = None


class GitLabOnboarding(_Model):
    """``onboarding.gitlab``: the CI variable that holds the job's ID token."""

    token_env_var_name: EnvVarName = DEFAULT_GITLAB_JWT_VAR


class GenericOIDCOnboarding(_Model):
    """``onboarding.generic_oidc``: an ID token from an environment variable, file or command."""

    env: EnvVarName | None = None
    path: AbsolutePath | None = None
    #: Run without a shell; its standard output is the ID token.
    command: Annotated[list[str], BeforeValidator(check_id_token_command)] | None = None
    timeout: IdTokenTimeout = DEFAULT_ID_TOKEN_TIMEOUT

    @model_validator(mode="after")
    def _exactly_one_source(self) -> GenericOIDCOnboarding:
        sources = [name for name in ("env", "path", "command") if getattr(self, name) is not None]
        if len(sources) != 1:
            got = f" (got {' and '.join(sources)})" if sources else ""
            raise config_problem(
                "set exactly one of env, path and command, e.g. {env: TBOT_ID_TOKEN}" + got
            )
        return self


class Onboarding(_Model):
    """How the bot joins the cluster the first time (``onboarding:``)."""

    join_method: Annotated[JoinMethod, BeforeValidator(check_join_method)] = "token"
    # token: the token value or an absolute path to a file that holds it; read lazily by
    # read_token(). OIDC methods: the name of the token resource (not a secret).
    token: Annotated[SecretStr, AfterValidator(_check_token)] | None = None
    ca_pins: list[Annotated[str, AfterValidator(check_ca_pin)]] = Field(default_factory=list)
    ca_path: NonEmptyPath | None = None
    insecure: bool = False
    kubernetes: KubernetesOnboarding | None = None
    gitlab: GitLabOnboarding | None = None
    generic_oidc: GenericOIDCOnboarding | None = None

    @model_validator(mode="after")
    def _check_trust_options(self) -> Onboarding:
        problems = trust_conflicts(
            insecure=self.insecure, ca_pins=bool(self.ca_pins), ca_path=self.ca_path is not None
        )
        if problems:
            raise config_problems(problems)
        return self

    @model_validator(mode="after")
    def _check_join_method_options(self) -> Onboarding:
        method = self.join_method
        problems: list[tuple[Loc, str]] = [
            ((name,), f"is set but join_method is {method} (remove it, or set join_method: {name})")
            for name in ID_TOKEN_SECTIONS
            if name != method and getattr(self, name) is not None
        ]
        if self.is_delegated():
            if self.token is None:
                problems.append(
                    (
                        ("token",),
                        f"join method {method} needs the name of a token resource here "
                        "(created with tbot-py auth create -f token.yaml)",
                    )
                )
            elif "/" in self.token.get_secret_value():
                problems.append(
                    (
                        ("token",),
                        f"for join method {method} this is the name of a token resource, "
                        "not a file path (the name is not a secret: write it here)",
                    )
                )
        if problems:
            raise config_problems(problems)
        return self

    def is_delegated(self) -> bool:
        """True for the OIDC join methods: they re-join with a fresh ID token, never renew."""
        return self.join_method in OIDC_JOIN_METHODS

    def token_file(self) -> str | None:
        """The path of the token file, if ``token`` refers to one (safe to log)."""
        if self.token is None:
            return None
        value = self.token.get_secret_value()
        return value if value.startswith("/") else None

    def read_token(self) -> str | None:
        """The join token: the configured value, or the stripped contents of the token file.

        Read at join time only, so a temporary token file may be deleted after the first join.
        Errors name the file, never the token.
        """
        if self.token is None:
            return None
        path = self.token_file()
        if path is None:
            value = self.token.get_secret_value()
            # Only absolute paths are token files (tbot's rule); a relative path that names
            # a file is almost certainly a mistake that would send the path as the token.
            if "/" in value and os.path.isfile(value):
                raise ConfigError(
                    f"{value!r} looks like a relative path to a token file; "
                    "token files must be given as absolute paths",
                    yaml_path="onboarding.token",
                )
            return value
        text, problem = read_text_file(path)
        token = (text or "").strip()
        if problem is None and not token:
            problem = "is empty"
        if problem is not None:
            raise ConfigError(f"token file {path} {problem}", yaml_path="onboarding.token")
        return token


# --- destinations ---------------------------------------------------------------------------


class ReaderConfig(_Model):
    """One ``readers:`` entry: a user or a group (a name, or a numeric id that need not exist)."""

    user: str | int | None = None
    group: str | int | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ReaderConfig:
        if (self.user is None) == (self.group is None):
            raise config_problem("give exactly one of user or group, e.g. {user: jenkins}")
        for key, value in (("user", self.user), ("group", self.group)):
            if isinstance(value, int) and value < 0:
                raise config_problem("must be a name or a non-negative id", (key,))
            if isinstance(value, str) and not value.strip():
                raise config_problem("must not be empty", (key,))
        return self

    @property
    def kind(self) -> Literal["user", "group"]:
        """``user`` or ``group``."""
        return "user" if self.user is not None else "group"

    @property
    def id(self) -> str:
        """The name or numeric id, as a string."""
        return str(self.user if self.user is not None else self.group)


class DirectoryDestination(_Model):
    """Files in a directory on the local filesystem."""

    type: Literal["directory"] = "directory"
    path: NonEmptyPath
    #: Never follow symlinks in the path or at artifact names (``secure``, ``try-secure``).
    symlinks: Literal["secure", "try-secure", "insecure"] = "try-secure"
    #: POSIX ACLs for ``readers``: ``try`` warns where unsupported, ``required`` fails.
    acls: Literal["off", "try", "required"] = "try"
    readers: list[ReaderConfig] = Field(default_factory=list)

    def absolute_path(self) -> str:
        """``path`` made absolute against the working directory and normalised."""
        return normalise_path(self.path)


class MemoryDestination(_Model):
    """An in-process store, lost on exit."""

    type: Literal["memory"] = "memory"


def _check_destination(value: object) -> object:
    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, dict):
        raise config_problem(
            "expected a destination mapping such as {type: directory, path: /some/dir}, "
            f"got {describe_type(value)}"
        )
    supported = ", ".join(SUPPORTED_DESTINATION_TYPES)
    kind = value.get("type")
    if "type" not in value:
        problem = f'missing required key "type" (one of: {supported})'
        raise config_problem(problem)
    if not isinstance(kind, str):
        raise config_problem(f"expected a string, got {describe_type(kind)}", ("type",))
    if kind in KNOWN_DESTINATION_TYPES and kind not in SUPPORTED_DESTINATION_TYPES:
        problem = f'destination type "{kind}" is not supported yet (supported: {supported})'
        raise config_problem(problem, ("type",))
    if kind not in SUPPORTED_DESTINATION_TYPES:
        problem = f'unknown destination type "{kind}" (supported: {supported})'
        raise config_problem(problem, ("type",))
    return value


Destination = Annotated[
    DirectoryDestination | MemoryDestination,
    Field(discriminator="type"),
    BeforeValidator(_check_destination),
]


def default_storage() -> DirectoryDestination:
    """``$STATE_DIRECTORY`` (systemd's StateDirectory=) or the platform's state directory."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not state:
        import platformdirs

        dirs = platformdirs.PlatformDirs("tbot-py", appauthor=False, use_site_for_root=True)
        state = dirs.user_state_dir
    return DirectoryDestination(path=state)


# --- services -------------------------------------------------------------------------------


def _on_off(value: object) -> object:
    # YAML 1.1 reads a bare on/off as a boolean.
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


class HookConfig(_Model):
    """A command run after the service has written renewed credentials (``hooks:`` items)."""

    command: Annotated[list[str], BeforeValidator(check_hook_command)]
    timeout: HookTimeout = DEFAULT_HOOK_TIMEOUT


class _ServiceBase(_Model):
    type: str
    name: Annotated[str, AfterValidator(check_service_name)] | None = None
    credential_ttl: PositiveDuration | None = None
    renewal_interval: PositiveDuration | None = None
    hooks: list[HookConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_lifetime_pair(self) -> _ServiceBase:
        if (self.credential_ttl is None) != (self.renewal_interval is None):
            present = "credential_ttl" if self.credential_ttl is not None else "renewal_interval"
            raise config_problem(
                "credential_ttl and renewal_interval must both be set if either is", (present,)
            )
        return self

    def effective_lifetime(self, bot: BotConfig) -> tuple[timedelta, timedelta]:
        """(credential TTL, renewal interval): the service's own, else the bot's."""
        if self.credential_ttl is not None and self.renewal_interval is not None:
            return self.credential_ttl, self.renewal_interval
        return bot.credential_ttl, bot.renewal_interval

    def hook_list(self) -> tuple[Hook, ...]:
        """The ``hooks`` as values for ``tbot_py.services.hooks.run_hooks``, in order."""
        from tbot_py.services.hooks import Hook  # lazily: it loads asyncio

        return tuple(Hook(command=tuple(h.command), timeout=h.timeout) for h in self.hooks)


class IdentityServiceConfig(_ServiceBase):
    """An ``identity`` output: an impersonated identity for tsh, tctl, ssh and SDK clients."""

    type: Literal["identity"] = "identity"
    destination: Destination
    roles: list[str] = Field(default_factory=list)
    allow_reissue: bool = False
    ssh_config: Annotated[Literal["on", "off"], BeforeValidator(_on_off)] = "on"


def _check_principals(value: list[str]) -> list[str]:
    if not value:
        raise config_problem("must list at least one principal (the host names clients dial)")
    for i, principal in enumerate(value):
        if not principal.strip():
            raise config_problem("must not be empty", (i,))
    return value


def _check_ca_type(value: object) -> object:
    if value == "openssh":
        raise config_problem('ca_type "openssh" is not supported yet (supported: user)')
    return value


class SSHHostServiceConfig(_ServiceBase):
    """An ``ssh_host`` output: a host key and certificate for ``principals``, and the user CA."""

    type: Literal["ssh_host"] = "ssh_host"
    destination: Destination
    principals: Annotated[list[str], AfterValidator(_check_principals)]
    ca_type: Annotated[Literal["user"], BeforeValidator(_check_ca_type)] = "user"


def _check_selector_labels(value: dict[str, list[str]]) -> dict[str, list[str]]:
    for key, values in value.items():
        if not key.strip():
            raise config_problem("label names must not be empty")
        if not values:
            raise config_problem("must list at least one value", (key,))
        if len(values) > 1:
            raise config_problem(
                "more than one value per label is not supported yet (give exactly one)", (key,)
            )
        for i, item in enumerate(values):
            if not item:
                raise config_problem("must not be empty", (key, i))
    return value


class WorkloadIdentitySelectorConfig(_Model):
    """Which ``workload_identity`` resource: by ``name`` or by ``labels`` (exactly one)."""

    name: str = ""
    labels: Annotated[dict[str, list[str]], AfterValidator(_check_selector_labels)] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> WorkloadIdentitySelectorConfig:
        if bool(self.name) == bool(self.labels):
            raise config_problem("set exactly one of name and labels")
        return self


def _check_federated(value: object) -> object:
    if value is True:
        raise config_problem(
            "include_federated_trust_bundles is not supported yet (there is no federation)"
        )
    return value


def _check_audiences(value: list[str]) -> list[str]:
    if not value:
        raise config_problem("must list at least one audience")
    for i, audience in enumerate(value):
        if not audience.strip():
            raise config_problem("must not be empty", (i,))
    return value


class WorkloadIdentityX509ServiceConfig(_ServiceBase):
    """A ``workload-identity-x509`` output: an X.509 SVID, its key and the SPIFFE bundle."""

    type: Literal["workload-identity-x509"] = "workload-identity-x509"
    destination: Destination
    selector: WorkloadIdentitySelectorConfig
    include_federated_trust_bundles: Annotated[bool, BeforeValidator(_check_federated)] = False


class WorkloadIdentityJWTServiceConfig(_ServiceBase):
    """A ``workload-identity-jwt`` output: a JWT-SVID for ``audiences``."""

    type: Literal["workload-identity-jwt"] = "workload-identity-jwt"
    destination: Destination
    selector: WorkloadIdentitySelectorConfig
    audiences: Annotated[list[str], AfterValidator(_check_audiences)]


def _check_required_name(value: str) -> str:
    if not value.strip():
        raise config_problem("must not be empty")
    return value


class ApplicationServiceConfig(_ServiceBase):
    """An ``application`` output: a TLS client certificate routed to one app."""

    type: Literal["application"] = "application"
    destination: Destination
    app_name: Annotated[str, AfterValidator(_check_required_name)]
    specific_tls_extensions: bool = False


class DatabaseServiceConfig(_ServiceBase):
    """A ``database`` output: a TLS client certificate routed to one database service."""

    type: Literal["database"] = "database"
    destination: Destination
    service: Annotated[str, AfterValidator(_check_required_name)]
    database: str = ""
    username: str = ""
    format: Literal["", "tls", "mongo", "cockroach"] = ""


# Add a model here and to the ServiceConfig union to support a new service type.
SERVICE_MODELS: dict[str, type[_ServiceBase]] = {
    "identity": IdentityServiceConfig,
    "ssh_host": SSHHostServiceConfig,
    "workload-identity-x509": WorkloadIdentityX509ServiceConfig,
    "workload-identity-jwt": WorkloadIdentityJWTServiceConfig,
    "application": ApplicationServiceConfig,
    "database": DatabaseServiceConfig,
}


def _check_service_type(value: object) -> object:
    if not isinstance(value, dict):
        return value
    supported = ", ".join(SERVICE_MODELS)
    if "type" not in value:
        raise config_problem(f'missing required key "type" (one of: {supported})')
    kind = value["type"]
    if not isinstance(kind, str):
        raise config_problem(f"expected a string, got {describe_type(kind)}", ("type",))
    if kind in KNOWN_SERVICE_TYPES and kind not in SERVICE_MODELS:
        problem = f'service type "{kind}" is not supported yet (supported: {supported})'
        raise config_problem(problem, ("type",))
    if kind not in SERVICE_MODELS:
        raise config_problem(f'unknown service type "{kind}" (supported: {supported})', ("type",))
    return value


ServiceConfig = Annotated[
    IdentityServiceConfig
    | SSHHostServiceConfig
    | WorkloadIdentityX509ServiceConfig
    | WorkloadIdentityJWTServiceConfig
    | ApplicationServiceConfig
    | DatabaseServiceConfig,
    Field(discriminator="type"),
    BeforeValidator(_check_service_type),
]


# --- the whole file -------------------------------------------------------------------------


def _check_version(value: object) -> object:
    if isinstance(value, str) and value != "v2":
        raise config_problem(
            f'unsupported config version "{value}": only v2 configs are supported (use version: v2)'
        )
    if not isinstance(value, str):
        raise config_problem(
            f'expected "v2", got {describe_type(value)} (only v2 configs are supported)'
        )
    return value


class BotConfig(_Model):
    """A validated v2 tbot config. Build it with the loader, ``apply_overrides`` or from data."""

    version: Annotated[Literal["v2"], BeforeValidator(_check_version)]
    proxy_server: Address | None = None
    auth_server: Address | None = None
    # Where the diagnostics HTTP server listens (health, readiness, metrics); off if unset.
    diag_addr: Address | None = None
    # tbot accepts insecure at the top level too; validation folds it into onboarding.insecure.
    insecure: bool = False
    onboarding: Onboarding = Field(default_factory=Onboarding)
    storage: Destination = Field(default_factory=default_storage)
    credential_ttl: PositiveDuration = DEFAULT_CREDENTIAL_TTL
    renewal_interval: PositiveDuration = DEFAULT_RENEWAL_INTERVAL
    # Deprecated alias of credential_ttl; folded into it by validation.
    certificate_ttl: PositiveDuration | None = None
    oneshot: bool = False
    debug: bool = False
    services: list[ServiceConfig] = Field(default_factory=list)
    # Legacy synonym of services; validation appends its entries to services.
    outputs: list[ServiceConfig] = Field(default_factory=list)

    _warnings: list[ConfigWarning] = PrivateAttr(default_factory=list)
    _notices: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _require_version(cls, data: Any) -> Any:
        if isinstance(data, dict) and "version" not in data:
            raise config_problem(
                'missing key "version": only v2 configs are supported, '
                'add "version: v2" at the top of the file'
            )
        return data

    @model_validator(mode="after")
    def _check_whole_config(self) -> BotConfig:
        warnings: list[ConfigWarning] = []
        problems: list[tuple[Loc, str]] = []
        if self.proxy_server is not None and self.auth_server is not None:
            problems.append(
                (("auth_server",), "proxy_server and auth_server are mutually exclusive")
            )
        if self.certificate_ttl is not None:
            warnings.append(
                ConfigWarning(
                    "certificate_ttl is deprecated, use credential_ttl", ("certificate_ttl",)
                )
            )
            if "credential_ttl" not in self.model_fields_set:
                self.credential_ttl = self.certificate_ttl
            self.certificate_ttl = None
        if self.insecure:
            onboarding = self.onboarding
            problems += trust_conflicts(
                insecure=True,
                ca_pins=bool(onboarding.ca_pins),
                ca_path=onboarding.ca_path is not None,
                prefix=("onboarding",),
            )
            self.onboarding = onboarding.model_copy(update={"insecure": True})
            self.insecure = False
        located: list[tuple[Loc, ServiceConfig]] = [
            (("services", i), s) for i, s in enumerate(self.services)
        ]
        located += [(("outputs", i), s) for i, s in enumerate(self.outputs)]
        located = _name_services(located, problems)
        _check_directories(self.storage, located, problems)
        warnings += lifetime_warnings(self.credential_ttl, self.renewal_interval, (), self.oneshot)
        for loc, service in located:
            if service.credential_ttl is not None and service.renewal_interval is not None:
                warnings += lifetime_warnings(
                    service.credential_ttl, service.renewal_interval, loc, self.oneshot
                )
        if problems:
            raise config_problems(problems)
        self.services = [service for _, service in located]
        self.outputs = []
        self._warnings = warnings
        return self

    def __eq__(self, other: object) -> bool:
        # Compare settings only: warnings and notices depend on how the config was built.
        if not isinstance(other, BotConfig):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    @property
    def warnings(self) -> list[str]:
        """Non-fatal problems (e.g. TTL shorter than the renewal interval) for the caller to log."""
        return [str(warning) for warning in self._warnings]

    @property
    def notices(self) -> list[str]:
        """INFO messages from ``apply_overrides``: which flags replaced values from the file."""
        return list(self._notices)

    def require_address(self) -> str:
        """The proxy or auth server address, or a ConfigError when neither is set."""
        address = self.proxy_server or self.auth_server
        if address is None:
            raise ConfigError("either proxy_server or auth_server must be set")
        return address


def _name_services(
    located: list[tuple[Loc, ServiceConfig]], problems: list[tuple[Loc, str]]
) -> list[tuple[Loc, ServiceConfig]]:
    """Give unnamed services tbot's default names and report duplicate names."""
    per_type: dict[str, int] = {}
    seen: dict[str, Loc] = {}
    named: list[tuple[Loc, ServiceConfig]] = []
    for loc, original in located:
        service = original
        per_type[service.type] = per_type.get(service.type, 0) + 1
        name = service.name
        where: Loc = (*loc, "name")
        if name is None:
            name = default_service_name(service.type, per_type[service.type])
            service = service.model_copy(update={"name": name})
            where = loc
        if name in seen:
            problems.append(
                (where, f'service name "{name}" is already used by {format_yaml_path(seen[name])}')
            )
        else:
            seen[name] = loc
        named.append((loc, service))
    return named


def _check_directories(
    storage: DirectoryDestination | MemoryDestination,
    located: list[tuple[Loc, ServiceConfig]],
    problems: list[tuple[Loc, str]],
) -> None:
    """Two writers in one directory would overwrite each other's files (tbot only logs this)."""
    owners: dict[str, str] = {}
    if isinstance(storage, DirectoryDestination):
        owners[storage.absolute_path()] = "the storage directory"
    for loc, service in located:
        destination = getattr(service, "destination", None)
        if not isinstance(destination, DirectoryDestination):
            continue
        path = destination.absolute_path()
        if path in owners:
            problems.append(
                (
                    (*loc, "destination", "path"),
                    f"directory {path} is already used by {owners[path]}",
                )
            )
        else:
            owners[path] = format_yaml_path(loc)
