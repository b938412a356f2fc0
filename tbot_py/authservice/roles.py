"""Role resources, as in Teleport: strict models, YAML in and out, and trait expansion.

A role file looks like Teleport's (``kind: role``, ``version: v6``/``v7``/``v8``) but
accepts only the fields tbot-py acts on; any other key is an error, so a rule that
would be silently ignored never looks like it is in force::

    kind: role
    version: v7
    metadata: {name: mcp-readonly, description: optional}
    spec:
      options: {max_session_ttl: 8h}
      allow:
        logins: ['{{internal.logins}}', ubuntu]
        app_labels: {env: dev}
        workload_identity_labels: {team: payments}
        db_labels: {env: dev}
        db_names: [orders, 'test_*']
        db_users: [reader]
        mcp: {tools: ['^(get|query|list|search|find)_.*$']}
        impersonate: {roles: [a, b]}
      deny: {}

Files are read with the config loader's machinery, so errors look like config errors:
``role.yaml:7: spec.allow.app_labels.env: ...``. Every pattern (label values, MCP
tools) is checked when the role is read; decisions live in :mod:`.rbac`.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from tbot_py.config._checks import (
    Loc,
    PositiveDuration,
    config_problem,
    config_problems,
    describe_type,
)
from tbot_py.config.duration import format_duration
from tbot_py.config.loader import _parse_yaml, config_error_from_validation
from tbot_py.errors import ConfigError

KIND_ROLE = "role"
SUPPORTED_VERSIONS = ("v6", "v7", "v8")
DEFAULT_VERSION = "v7"
#: Teleport's default ``max_session_ttl``.
DEFAULT_MAX_SESSION_TTL = timedelta(hours=30)
#: The one trait template tbot-py expands: the bot's own logins.
LOGINS_TRAIT = "{{internal.logins}}"
WILDCARD = "*"

#: A bot's traits: trait name to values. Only ``logins`` exists today.
Traits = Mapping[str, Sequence[str]]

#: Role names and SSH logins end up in certificate subjects and principals: printable,
#: no separators, no spaces.
NAME_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")
_LOGINS_TRAIT_RE = re.compile(r"^\{\{\s*internal\.logins\s*\}\}$")


# --- patterns ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled form of a label or tool pattern, cached; raises ``re.error``.

    ``^...$`` is a regular expression; anything else is an fnmatch-style glob
    (``*``, ``?``, ``[...]``), anchored and case-sensitive. Match with ``fullmatch``.
    """
    if pattern.startswith("^") and pattern.endswith("$"):
        return re.compile(pattern)
    return re.compile(fnmatch.translate(pattern))


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid label or tool pattern, or None when it is."""
    if not pattern:
        return "a pattern must not be empty"
    if "{{" in pattern:
        return f"trait templates are only supported in logins, not in pattern {pattern!r}"
    if pattern.startswith("^") and not pattern.endswith("$"):
        return f"regular expression {pattern!r} must end with $ (a regex pattern is ^...$)"
    try:
        compile_pattern(pattern)
    except re.error as exc:
        return f"invalid regular expression {pattern!r}: {exc}"
    return None


def _check_pattern(value: str) -> str:
    problem = pattern_problem(value)
    if problem:
        raise config_problem(problem)
    return value


def _check_label_values(value: object) -> str | tuple[str, ...]:
    """A label selector value: one pattern or a list of them."""
    if isinstance(value, str):
        return _check_pattern(value)
    if not isinstance(value, list | tuple):
        raise config_problem(f"expected a string or a list of strings, got {describe_type(value)}")
    problems: list[tuple[Loc, str]] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            problems.append(((index,), f"expected a string, got {describe_type(item)}"))
        elif problem := pattern_problem(item):
            problems.append(((index,), problem))
    if problems:
        raise config_problems(problems)
    return tuple(value)


def _check_login(value: str) -> str:
    if _LOGINS_TRAIT_RE.match(value):
        return LOGINS_TRAIT
    if "{{" in value:
        raise config_problem(
            f"unsupported trait template {value!r}; only {LOGINS_TRAIT} is supported"
        )
    if not NAME_RE.match(value):
        raise config_problem(f"invalid login {value!r}: use letters, digits and _ . @ : -")
    return value


def _check_role_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise config_problem(
            f"invalid role name {value!r}: use 1-128 letters, digits and _ . @ : -"
        )
    return value


def _dump_label_values(value: str | tuple[str, ...]) -> str | list[str]:
    return value if isinstance(value, str) else list(value)


Pattern = Annotated[str, AfterValidator(_check_pattern)]
LabelValues = Annotated[
    str | tuple[str, ...],
    PlainValidator(_check_label_values),
    PlainSerializer(_dump_label_values),
]
Login = Annotated[str, AfterValidator(_check_login)]
RoleName = Annotated[str, AfterValidator(_check_role_name)]
SessionTTL = Annotated[PositiveDuration, PlainSerializer(format_duration, return_type=str)]


# --- models ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    """Immutable; an unknown key is an error that names the keys this mapping accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = list(cls.model_fields)
            unknown = [str(key) for key in data if key not in cls.model_fields]
            if unknown:
                raise config_problems([((key,), _unknown_key(key, known)) for key in unknown])
        return data


def _unknown_key(key: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f'unknown key "{key}"; did you mean "{close[0]}"?'
    return f'unknown key "{key}" (known keys: {", ".join(known)})'


class RoleMetadata(_Strict):
    """``metadata``: the role's name and an optional description."""

    name: RoleName
    description: str = ""


class RoleOptions(_Strict):
    """``spec.options``."""

    max_session_ttl: SessionTTL = DEFAULT_MAX_SESSION_TTL


class MCPRule(_Strict):
    """``mcp``: the MCP tools a role allows or denies (globs or ``^regex$``)."""

    tools: tuple[Pattern, ...] = ()


class ImpersonateRule(_Strict):
    """``impersonate``: stored with the role; not used for decisions yet."""

    roles: tuple[RoleName, ...] = ()


#: Resources and verbs a ``rules`` entry may name (Teleport's names; ``*`` is any).
#: ``host_cert``/``create`` signs SSH host certificates and TLS server certificates;
#: ``app_session``/``create`` lets a service (the MCP access proxy) open app sessions
#: for its clients.
RULE_RESOURCES = frozenset({"app_session", "host_cert", WILDCARD})
RULE_VERBS = frozenset({"create", WILDCARD})


def _check_rule_names(kind: str, known: frozenset[str]) -> Any:
    def check(values: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in values if v not in known]
        if unknown:
            raise config_problem(
                f'unknown {kind} "{unknown[0][:64]}" (known: {", ".join(sorted(known))})'
            )
        if not values:
            raise config_problem(f"a rule needs at least one {kind}")
        return values

    return check


class ResourceRule(_Strict):
    """A ``rules`` entry: ``verbs`` on ``resources`` (see :data:`RULE_RESOURCES`)."""

    resources: Annotated[
        tuple[str, ...], AfterValidator(_check_rule_names("resource", RULE_RESOURCES))
    ]
    verbs: Annotated[tuple[str, ...], AfterValidator(_check_rule_names("verb", RULE_VERBS))]

    def matches(self, resource: str, verb: str) -> bool:
        """Whether this rule covers ``verb`` on ``resource``."""
        return (resource in self.resources or WILDCARD in self.resources) and (
            verb in self.verbs or WILDCARD in self.verbs
        )


class RoleConditions(_Strict):
    """``spec.allow`` or ``spec.deny``."""

    logins: tuple[Login, ...] = ()
    app_labels: dict[str, LabelValues] = {}
    mcp: MCPRule = MCPRule()
    impersonate: ImpersonateRule = ImpersonateRule()
    rules: tuple[ResourceRule, ...] = ()
    #: Which workload_identity resources a bot may get SVIDs for (same rules as app_labels).
    workload_identity_labels: dict[str, LabelValues] = {}
    #: Which db resources a certificate may be routed to (same rules as app_labels).
    db_labels: dict[str, LabelValues] = {}
    #: Database names and users such a certificate may carry (globs or ``^regex$``).
    db_names: tuple[Pattern, ...] = ()
    db_users: tuple[Pattern, ...] = ()

    @field_validator("app_labels", "workload_identity_labels", "db_labels")
    @classmethod
    def _check_selector_keys(cls, selector: dict[str, LabelValues]) -> dict[str, LabelValues]:
        problems: list[tuple[Loc, str]] = []
        for key, values in selector.items():
            if not key:
                problems.append(((key,), "a label name must not be empty"))
            elif key == WILDCARD and values not in (WILDCARD, (WILDCARD,)):
                problems.append(((key,), "the label name '*' only works with the value '*'"))
        if problems:
            raise config_problems(problems)
        return selector

    def expand_logins(self, traits: Traits) -> tuple[str, ...]:
        """``logins`` with ``{{internal.logins}}`` replaced by the ``logins`` trait, deduped."""
        expanded: list[str] = []
        for login in self.logins:
            expanded += traits.get("logins", ()) if login == LOGINS_TRAIT else [login]
        return tuple(dict.fromkeys(expanded))


class RoleSpec(_Strict):
    """``spec``: options, then what the role allows and denies (deny wins)."""

    options: RoleOptions = RoleOptions()
    allow: RoleConditions = RoleConditions()
    deny: RoleConditions = RoleConditions()


class Role(_Strict):
    """A role resource."""

    kind: str = KIND_ROLE
    version: str = DEFAULT_VERSION
    metadata: RoleMetadata
    spec: RoleSpec = RoleSpec()

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, kind: str) -> str:
        if kind != KIND_ROLE:
            raise config_problem(f'unsupported kind "{kind}"; only "{KIND_ROLE}" is supported')
        return kind

    @field_validator("version")
    @classmethod
    def _check_version(cls, version: str) -> str:
        if version not in SUPPORTED_VERSIONS:
            raise config_problem(
                f'unsupported role version "{version}"; use one of {", ".join(SUPPORTED_VERSIONS)}'
            )
        return version

    @property
    def name(self) -> str:
        """``metadata.name``."""
        return self.metadata.name

    @property
    def max_session_ttl(self) -> timedelta:
        """``spec.options.max_session_ttl``."""
        return self.spec.options.max_session_ttl

    def to_yaml(self) -> str:
        """The role as a YAML document that :func:`parse_role_yaml` reads back unchanged.

        Empty rules are left out; ``max_session_ttl`` is always shown.
        """
        spec: dict[str, Any] = {"options": self.spec.options.model_dump(mode="json")}
        spec |= self.spec.model_dump(mode="json", exclude_defaults=True, exclude={"options"})
        doc = {
            "kind": self.kind,
            "version": self.version,
            "metadata": self.metadata.model_dump(mode="json", exclude_defaults=True),
            "spec": spec,
        }
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)

    def to_json(self) -> dict[str, Any]:
        """The role as plain JSON data, every field included."""
        return self.model_dump(mode="json")


def new_role(
    name: str,
    *,
    allow: RoleConditions | None = None,
    deny: RoleConditions | None = None,
    max_session_ttl: timedelta = DEFAULT_MAX_SESSION_TTL,
    description: str = "",
) -> Role:
    """A role built in code (presets, tests); validated like one read from a file."""
    return Role(
        metadata=RoleMetadata(name=name, description=description),
        spec=RoleSpec(
            options=RoleOptions(max_session_ttl=max_session_ttl),
            allow=allow or RoleConditions(),
            deny=deny or RoleConditions(),
        ),
    )


def parse_role_yaml(text: str, source: str = "<role>") -> Role:
    """Read one role document; ``source`` names it in errors. Raises ConfigError.

    Unlike a role built in code, a file must say ``kind`` and ``version``.
    """
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        raise ConfigError('the role file is empty; it needs "kind: role"', source=source)
    data, lines = _parse_yaml(text, source)
    for key in ("kind", "version"):
        if key not in data:
            raise ConfigError(f'missing required key "{key}"', source=source, line=lines[()])
    return role_from_data(data, source=source, lines=lines)


def role_from_data(
    data: Any, *, source: str | None = None, lines: Mapping[Loc, int] | None = None
) -> Role:
    """Validate plain data (a parsed file, a stored row) into a Role, or raise one ConfigError.

    Raised outside the ``except`` block so pydantic's error, which holds the input, is not
    attached as its context.
    """
    try:
        return Role.model_validate(data)
    except ValidationError as exc:
        failure = config_error_from_validation(exc, data, source=source, lines=lines)
    raise failure


_ALL_APPS: dict[str, LabelValues] = {WILDCARD: WILDCARD}

#: Seeded into every cluster (schema migration 3), as Teleport seeds its presets.
PRESET_ROLES: tuple[Role, ...] = (
    new_role(
        "access",
        description="The bot's logins, every app, MCP tool and database",
        allow=RoleConditions(
            logins=(LOGINS_TRAIT,),
            app_labels=_ALL_APPS,
            mcp=MCPRule(tools=(WILDCARD,)),
            db_labels=_ALL_APPS,
            db_names=(WILDCARD,),
            db_users=(WILDCARD,),
        ),
    ),
    new_role(
        "editor",
        description="Every app and database; no logins",
        allow=RoleConditions(app_labels=_ALL_APPS, db_labels=_ALL_APPS),
    ),
    new_role("auditor", description="Allows nothing"),
)
