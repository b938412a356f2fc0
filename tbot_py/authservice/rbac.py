"""Role-based access decisions: pure functions over :class:`~.roles.Role` values.

Apps and MCP tools (:func:`check_app_access`), databases (:func:`check_db_access`,
``db_labels``, ``db_users``, ``db_names``), workload identities
(:func:`check_workload_identity_access`, ``workload_identity_labels``), and what a
certificate for a set of roles may carry (:func:`certificate_logins`, :func:`session_ttl_limit`).

Semantics, deny wins:

1. If any role's ``deny.app_labels`` matches the app, deny.
2. Else, if a tool is given and any role's ``deny.mcp.tools`` matches it, deny.
3. Else allow if one role's ``allow.app_labels`` matches the app and, when a tool is
   given, that same role's ``allow.mcp.tools`` matches the tool.
4. Otherwise deny.

A label selector matches when, for every key, the app has that label and its value
matches one of the key's patterns. An empty selector matches nothing; ``{'*': '*'}``
matches every app, even one without labels. A pattern is ``*`` (anything), a glob
(fnmatch-style, anchored, case-sensitive) or ``^...$`` (a full regular expression).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from tbot_py.authservice.roles import WILDCARD, Role, RoleConditions, Traits, compile_pattern


@dataclass(frozen=True)
class AccessDecision:
    """The answer to an access check; ``reason`` names the role and rule that decided."""

    allowed: bool
    reason: str


def match_value(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern``: ``*``, a glob, or a ``^...$`` regex."""
    return pattern == WILDCARD or compile_pattern(pattern).fullmatch(value) is not None


def match_labels(selector: Mapping[str, str | Sequence[str]], labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy ``selector`` (Teleport semantics; see the module docstring)."""
    return _matched_rules(selector, labels) is not None


def check_app_access(
    roles: Sequence[Role],
    app_name: str,
    app_labels: Mapping[str, str],
    tool: str | None = None,
) -> AccessDecision:
    """May a holder of ``roles`` use app ``app_name`` (and its MCP ``tool``, if given)?"""
    for role in roles:
        rules = _matched_rules(role.spec.deny.app_labels, app_labels)
        if rules is not None:
            return AccessDecision(False, f'denied by role "{role.name}": app_labels {rules}')
    if tool is not None:
        for role in roles:
            pattern = _first_match(role.spec.deny.mcp.tools, tool)
            if pattern is not None:
                return AccessDecision(False, f'denied by role "{role.name}": mcp.tools {pattern}')
    app_granted = False
    for role in roles:
        rules = _matched_rules(role.spec.allow.app_labels, app_labels)
        if rules is None:
            continue
        if tool is None:
            return AccessDecision(True, f'allowed by role "{role.name}": app_labels {rules}')
        app_granted = True
        pattern = _first_match(role.spec.allow.mcp.tools, tool)
        if pattern is not None:
            return AccessDecision(
                True, f'allowed by role "{role.name}": app_labels {rules}, mcp.tools {pattern}'
            )
    if app_granted:
        return AccessDecision(False, f'no role allows tool "{tool}" on app "{app_name}"')
    return AccessDecision(False, f'no role allows app "{app_name}"')


def certificate_logins(roles: Sequence[Role], traits: Traits) -> tuple[str, ...]:
    """SSH logins for a certificate holding ``roles``: allowed ones minus denied ones.

    ``{{internal.logins}}`` expands to the ``logins`` trait on both sides. In role order,
    without duplicates; empty when no role allows a login.
    """
    denied = {login for role in roles for login in role.spec.deny.expand_logins(traits)}
    allowed = (login for role in roles for login in role.spec.allow.expand_logins(traits))
    return tuple(dict.fromkeys(login for login in allowed if login not in denied))


def check_rule(roles: Sequence[Role], resource: str, verb: str) -> AccessDecision:
    """May a holder of ``roles`` do ``verb`` on ``resource``? A ``deny.rules`` match wins."""
    for role in roles:
        if any(rule.matches(resource, verb) for rule in role.spec.deny.rules):
            return AccessDecision(False, f'denied by role "{role.name}": rules {resource}/{verb}')
    for role in roles:
        if any(rule.matches(resource, verb) for rule in role.spec.allow.rules):
            return AccessDecision(True, f'allowed by role "{role.name}": rules {resource}/{verb}')
    return AccessDecision(False, f"no role allows {verb} on {resource}")


def session_ttl_limit(roles: Sequence[Role]) -> timedelta | None:
    """The shortest ``max_session_ttl`` of ``roles``; None for no roles."""
    return min((role.max_session_ttl for role in roles), default=None)


def check_workload_identity_access(
    roles: Sequence[Role], name: str, labels: Mapping[str, str]
) -> AccessDecision:
    """May a holder of ``roles`` get SVIDs of workload identity ``name``?

    ``workload_identity_labels`` decides, deny first, exactly as ``app_labels`` does for apps.
    """
    for role in roles:
        rules = _matched_rules(role.spec.deny.workload_identity_labels, labels)
        if rules is not None:
            return AccessDecision(
                False, f'denied by role "{role.name}": workload_identity_labels {rules}'
            )
    for role in roles:
        rules = _matched_rules(role.spec.allow.workload_identity_labels, labels)
        if rules is not None:
            return AccessDecision(
                True, f'allowed by role "{role.name}": workload_identity_labels {rules}'
            )
    return AccessDecision(False, f'no role allows workload identity "{name}"')


def check_db_access(
    roles: Sequence[Role],
    db_name: str,
    db_labels: Mapping[str, str],
    db_user: str = "",
    database: str = "",
) -> AccessDecision:
    """May a holder of ``roles`` reach database ``db_name`` as ``db_user`` on ``database``?

    Deny wins: a role whose ``deny.db_labels`` match the database, or whose
    ``deny.db_users`` / ``deny.db_names`` match the requested user / name, denies.
    Otherwise one role must allow all of it: its ``allow.db_labels`` match and, for
    each of ``db_user`` and ``database`` that is not empty, its ``db_users`` /
    ``db_names`` match too.
    """
    for role in roles:
        rules = _matched_rules(role.spec.deny.db_labels, db_labels)
        if rules is not None:
            return AccessDecision(False, f'denied by role "{role.name}": db_labels {rules}')
        for field, pattern in _db_matches(role.spec.deny, db_user, database):
            if pattern is not None:
                return AccessDecision(False, f'denied by role "{role.name}": {field} {pattern}')
    labels_granted = False
    for role in roles:
        rules = _matched_rules(role.spec.allow.db_labels, db_labels)
        if rules is None:
            continue
        labels_granted = True
        matches = _db_matches(role.spec.allow, db_user, database)
        if all(pattern is not None for _, pattern in matches):
            reason = ", ".join([f"db_labels {rules}", *(f"{f} {p}" for f, p in matches)])
            return AccessDecision(True, f'allowed by role "{role.name}": {reason}')
    if not labels_granted:
        return AccessDecision(False, f'no role allows database "{db_name}"')
    asked = " and ".join(
        f'{field} "{value}"'
        for field, value in (("db_user", db_user), ("db_name", database))
        if value
    )
    return AccessDecision(False, f'no role allows {asked} on database "{db_name}"')


def _db_matches(
    conditions: RoleConditions, db_user: str, database: str
) -> list[tuple[str, str | None]]:
    """For the user and the name requested (if any): the field and its first matching pattern."""
    asked = (
        ("db_users", db_user, conditions.db_users),
        ("db_names", database, conditions.db_names),
    )
    return [(field, _first_match(patterns, value)) for field, value, patterns in asked if value]


def _matched_rules(
    selector: Mapping[str, str | Sequence[str]], labels: Mapping[str, str]
) -> str | None:
    """``key=pattern, ...`` naming the pattern that matched each key, or None for no match."""
    if not selector:
        return None
    matched: list[str] = []
    for key, patterns in selector.items():
        candidates = (patterns,) if isinstance(patterns, str) else tuple(patterns)
        if key == WILDCARD:
            # '*': '*' matches every app; Teleport supports no other value for '*'.
            if candidates != (WILDCARD,):
                return None
            matched.append(f"{WILDCARD}={WILDCARD}")
            continue
        value = labels.get(key)
        if value is None:
            return None
        pattern = _first_match(candidates, value)
        if pattern is None:
            return None
        matched.append(f"{key}={pattern}")
    return ", ".join(matched)


def _first_match(patterns: Sequence[str], value: str) -> str | None:
    return next((p for p in patterns if match_value(p, value)), None)
