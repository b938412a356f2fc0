"""RBAC decisions as a table: app labels, MCP tools, deny wins, and the reason given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta

import pytest

from tbot_py.authservice import rbac
from tbot_py.authservice.rbac import AccessDecision, check_app_access, match_labels, match_value
from tbot_py.authservice.roles import (
    LOGINS_TRAIT,
    Role,
    RoleConditions,
    compile_pattern,
    new_role,
)

Selector = Mapping[str, str | Sequence[str]]


def role(
    name: str,
    *,
    allow: Selector | None = None,
    tools: Sequence[str] = (),
    deny: Selector | None = None,
    deny_tools: Sequence[str] = (),
) -> Role:
    return new_role(
        name,
        allow=RoleConditions.model_validate({"app_labels": allow or {}, "mcp": {"tools": tools}}),
        deny=RoleConditions.model_validate(
            {"app_labels": deny or {}, "mcp": {"tools": deny_tools}}
        ),
    )


READ_ONLY_TOOLS = "^(get|query|list|search|find)_.*$"
# The two examples from the issue.
DEV_ALL_TOOLS = role("dev-all-tools", allow={"env": "dev"}, tools=["*"])
MCP_READONLY = role("mcp-readonly", allow={"env": "dev"}, tools=[READ_ONLY_TOOLS])

EVERYTHING = role("everything", allow={"*": "*"}, tools=["*"])
NO_PROD = role("no-prod", deny={"env": "prod"})
NO_DELETE = role("no-delete", deny_tools=["delete_*"])
NO_WRITES = role("no-writes", deny_tools=["^(delete|drop)_.*$"])
APP_ONLY = role("app-only", allow={"env": "dev"})
DB_GLOB = role("db-apps", allow={"service": "db-*"}, tools=["*"])
DEV_OR_STAGING = role("dev-or-staging", allow={"env": ["dev", "staging"]}, tools=["*"])
TEAM_DEV = role("team-dev", allow={"env": "dev", "team": "^(a|b)$"}, tools=["*"])
GET_ONLY = role("get-only", allow={"*": "*"}, tools=["^get_.*$"])
ONE_CHAR = role("one-char", allow={"*": "*"}, tools=["get_?"])
ANY_ENV = role("any-env", allow={"env": "*"}, tools=["*"])
DENY_ALL = role("deny-all", deny={"*": "*"})
NO_PROD_OR_STAGING = role("no-prod-or-staging", deny={"env": ["prod", "staging"]})
SELF_DENY = role("self-deny", allow={"*": "*"}, tools=["*"], deny_tools=["delete_*"])
NOTHING = role("nothing")

DEV = {"env": "dev"}
PROD = {"env": "prod"}


def ok(reason: str) -> AccessDecision:
    return AccessDecision(True, reason)


def no(reason: str) -> AccessDecision:
    return AccessDecision(False, reason)


NO_APP = no('no role allows app "app"')


def no_tool(tool: str) -> AccessDecision:
    return no(f'no role allows tool "{tool}" on app "app"')


ROWS: list[tuple[str, list[Role], dict[str, str], str | None, AccessDecision]] = [
    # Issue example 1: every tool on dev apps.
    ("tools-star-dev-app", [DEV_ALL_TOOLS], DEV, None,
     ok('allowed by role "dev-all-tools": app_labels env=dev')),
    ("tools-star-any-tool", [DEV_ALL_TOOLS], DEV, "delete_everything",
     ok('allowed by role "dev-all-tools": app_labels env=dev, mcp.tools *')),
    ("tools-star-prod-app", [DEV_ALL_TOOLS], PROD, None, NO_APP),
    ("tools-star-prod-tool", [DEV_ALL_TOOLS], PROD, "get_user", NO_APP),
    # Issue example 2: read-only tools by regex.
    ("readonly-get", [MCP_READONLY], DEV, "get_user",
     ok(f'allowed by role "mcp-readonly": app_labels env=dev, mcp.tools {READ_ONLY_TOOLS}')),
    ("readonly-query", [MCP_READONLY], DEV, "query_db", ok(
        f'allowed by role "mcp-readonly": app_labels env=dev, mcp.tools {READ_ONLY_TOOLS}')),
    ("readonly-list", [MCP_READONLY], DEV, "list_tables", ok(
        f'allowed by role "mcp-readonly": app_labels env=dev, mcp.tools {READ_ONLY_TOOLS}')),
    ("readonly-search", [MCP_READONLY], DEV, "search_docs", ok(
        f'allowed by role "mcp-readonly": app_labels env=dev, mcp.tools {READ_ONLY_TOOLS}')),
    ("readonly-find", [MCP_READONLY], DEV, "find_x", ok(
        f'allowed by role "mcp-readonly": app_labels env=dev, mcp.tools {READ_ONLY_TOOLS}')),
    ("readonly-delete", [MCP_READONLY], DEV, "delete_user", no_tool("delete_user")),
    ("readonly-needs-underscore", [MCP_READONLY], DEV, "getuser", no_tool("getuser")),
    ("readonly-case-sensitive", [MCP_READONLY], DEV, "GET_user", no_tool("GET_user")),
    ("readonly-app-only", [MCP_READONLY], DEV, None,
     ok('allowed by role "mcp-readonly": app_labels env=dev')),
    # Deny wins over allow, for labels and for tools, in any role order.
    ("deny-label-wins", [EVERYTHING, NO_PROD], PROD, None,
     no('denied by role "no-prod": app_labels env=prod')),
    ("deny-label-wins-first", [NO_PROD, EVERYTHING], PROD, "get_x",
     no('denied by role "no-prod": app_labels env=prod')),
    ("deny-label-other-app", [EVERYTHING, NO_PROD], DEV, None,
     ok('allowed by role "everything": app_labels *=*')),
    ("deny-tool-wins", [EVERYTHING, NO_DELETE], DEV, "delete_user",
     no('denied by role "no-delete": mcp.tools delete_*')),
    ("deny-tool-other-tool", [EVERYTHING, NO_DELETE], DEV, "get_user",
     ok('allowed by role "everything": app_labels *=*, mcp.tools *')),
    ("deny-tool-no-tool-asked", [EVERYTHING, NO_DELETE], DEV, None,
     ok('allowed by role "everything": app_labels *=*')),
    ("deny-tool-regex", [EVERYTHING, NO_WRITES], DEV, "drop_table",
     no('denied by role "no-writes": mcp.tools ^(delete|drop)_.*$')),
    ("deny-tool-same-role", [SELF_DENY], DEV, "delete_x",
     no('denied by role "self-deny": mcp.tools delete_*')),
    ("deny-all-star", [EVERYTHING, DENY_ALL], {}, None,
     no('denied by role "deny-all": app_labels *=*')),
    ("deny-list-value", [EVERYTHING, NO_PROD_OR_STAGING], {"env": "staging"}, None,
     no('denied by role "no-prod-or-staging": app_labels env=staging')),
    ("deny-label-beats-tool-allow", [DEV_ALL_TOOLS, role("no-dev", deny=DEV)], DEV, "get",
     no('denied by role "no-dev": app_labels env=dev')),
    # One role grants the app but not the tool, another grants both.
    ("split-grant", [APP_ONLY, DEV_ALL_TOOLS], DEV, "run_job",
     ok('allowed by role "dev-all-tools": app_labels env=dev, mcp.tools *')),
    ("split-grant-reversed", [DEV_ALL_TOOLS, APP_ONLY], DEV, "run_job",
     ok('allowed by role "dev-all-tools": app_labels env=dev, mcp.tools *')),
    ("app-without-tools", [APP_ONLY], DEV, "get_x", no_tool("get_x")),
    ("app-without-tools-no-tool", [APP_ONLY], DEV, None,
     ok('allowed by role "app-only": app_labels env=dev')),
    ("tool-in-role-without-app", [APP_ONLY, role("tools", allow=PROD, tools=["*"])], DEV,
     "get_x", no_tool("get_x")),
    # Globs are anchored and case-sensitive.
    ("glob-match", [DB_GLOB], {"service": "db-orders"}, None,
     ok('allowed by role "db-apps": app_labels service=db-*')),
    ("glob-empty-suffix", [DB_GLOB], {"service": "db-"}, "x",
     ok('allowed by role "db-apps": app_labels service=db-*, mcp.tools *')),
    ("glob-anchored-start", [DB_GLOB], {"service": "mydb-orders"}, None, NO_APP),
    ("glob-case", [DB_GLOB], {"service": "DB-orders"}, None, NO_APP),
    ("glob-one-char", [ONE_CHAR], {}, "get_a",
     ok('allowed by role "one-char": app_labels *=*, mcp.tools get_?')),
    ("glob-one-char-only", [ONE_CHAR], {}, "get_ab", no_tool("get_ab")),
    # List values: any one of them.
    ("list-first", [DEV_OR_STAGING], DEV, None,
     ok('allowed by role "dev-or-staging": app_labels env=dev')),
    ("list-second", [DEV_OR_STAGING], {"env": "staging"}, None,
     ok('allowed by role "dev-or-staging": app_labels env=staging')),
    ("list-none", [DEV_OR_STAGING], PROD, None, NO_APP),
    # A missing label never matches, not even '*' as its value.
    ("missing-label", [DEV_ALL_TOOLS], {}, None, NO_APP),
    ("other-label-only", [DEV_ALL_TOOLS], {"team": "dev"}, None, NO_APP),
    ("star-value-needs-label", [ANY_ENV], {"team": "a"}, None, NO_APP),
    ("star-value", [ANY_ENV], {"env": "anything"}, None,
     ok('allowed by role "any-env": app_labels env=*')),
    # Every key of a selector must match; regexes are full matches.
    ("all-keys", [TEAM_DEV], {"env": "dev", "team": "a"}, None,
     ok('allowed by role "team-dev": app_labels env=dev, team=^(a|b)$')),
    ("all-keys-missing-one", [TEAM_DEV], DEV, None, NO_APP),
    ("all-keys-regex-anchored", [TEAM_DEV], {"env": "dev", "team": "ab"}, None, NO_APP),
    # '*': '*' matches every app, even one without labels.
    ("star-selector-no-labels", [EVERYTHING], {}, "anything",
     ok('allowed by role "everything": app_labels *=*, mcp.tools *')),
    # Regex anchoring: ^get_.*$ does not match forget_x.
    ("regex-anchor-start", [GET_ONLY], {}, "forget_x", no_tool("forget_x")),
    ("regex-anchor-match", [GET_ONLY], {}, "get_x",
     ok('allowed by role "get-only": app_labels *=*, mcp.tools ^get_.*$')),
    # Empty selectors match nothing; no roles allow nothing.
    ("empty-role", [NOTHING], DEV, None, NO_APP),
    ("no-roles", [], DEV, "get_x", NO_APP),
    ("only-denies", [NO_PROD, NO_DELETE], DEV, "get_x", NO_APP),
]  # fmt: skip


@pytest.mark.parametrize(
    ("roles", "labels", "tool", "expected"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS]
)
def test_check_app_access(
    roles: list[Role], labels: dict[str, str], tool: str | None, expected: AccessDecision
) -> None:
    assert check_app_access(roles, "app", labels, tool) == expected


def test_the_table_is_big_enough_and_its_ids_are_unique() -> None:
    assert len(ROWS) >= 30
    assert len({row[0] for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("*", "", True),
        ("*", "anything at all", True),
        ("dev", "dev", True),
        ("dev", "devel", False),
        ("db-*", "db-1", True),
        ("db-*", "xdb-1", False),
        ("get_?", "get_a", True),
        ("[ab]x", "bx", True),
        ("[ab]x", "cx", False),
        ("^get_.*$", "get_x", True),
        ("^get_.*$", "forget_x", False),
        ("^a|b$", "ab", False),  # a full match, not Go's unanchored alternation
        ("^dev$", "Dev", False),
        ("Dev", "dev", False),
        ("^$", "", True),
    ],
)
def test_match_value(pattern: str, value: str, expected: bool) -> None:
    assert match_value(pattern, value) is expected


def test_match_labels_semantics() -> None:
    assert not match_labels({}, {})
    assert not match_labels({}, {"env": "dev"})
    assert match_labels({"*": "*"}, {})
    assert match_labels({"*": ["*"]}, {"env": "dev"})
    assert not match_labels({"*": "dev"}, {"env": "dev"})  # Teleport supports only '*': '*'
    assert match_labels({"env": ["prod", "dev"]}, {"env": "dev", "team": "a"})
    assert not match_labels({"env": []}, {"env": "dev"})
    assert not match_labels({"env": "dev", "team": "a"}, {"env": "dev"})


def test_patterns_are_compiled_once() -> None:
    compile_pattern.cache_clear()
    for _ in range(5):
        check_app_access([MCP_READONLY], "app", DEV, "get_user")
    info = compile_pattern.cache_info()
    assert info.misses == 2  # "dev" and the tools regex
    assert info.hits >= 8


def test_certificate_logins_expand_traits_and_drop_denied_ones() -> None:
    traits = {"logins": ["root", "ubuntu"]}
    web = new_role("web", allow=RoleConditions(logins=(LOGINS_TRAIT, "deploy", "root")))
    no_root = new_role("no-root", deny=RoleConditions(logins=("root",)))
    no_own = new_role("no-own", deny=RoleConditions(logins=(LOGINS_TRAIT,)))
    assert rbac.certificate_logins([web], traits) == ("root", "ubuntu", "deploy")
    assert rbac.certificate_logins([web, no_root], traits) == ("ubuntu", "deploy")
    assert rbac.certificate_logins([no_own, web], traits) == ("deploy",)
    assert rbac.certificate_logins([web], {}) == ("deploy", "root")
    assert rbac.certificate_logins([no_root], traits) == ()


def test_session_ttl_limit_is_the_shortest_role_ttl() -> None:
    short = new_role("short", max_session_ttl=timedelta(minutes=30))
    assert rbac.session_ttl_limit([EVERYTHING, short]) == timedelta(minutes=30)
    assert rbac.session_ttl_limit([EVERYTHING]) == timedelta(hours=30)
    assert rbac.session_ttl_limit([]) is None


# -- databases ---------------------------------------------------------------------------------


def db_role(
    name: str,
    *,
    allow: Selector | None = None,
    users: Sequence[str] = (),
    names: Sequence[str] = (),
    deny: Selector | None = None,
    deny_users: Sequence[str] = (),
    deny_names: Sequence[str] = (),
) -> Role:
    return new_role(
        name,
        allow=RoleConditions.model_validate(
            {"db_labels": allow or {}, "db_users": users, "db_names": names}
        ),
        deny=RoleConditions.model_validate(
            {"db_labels": deny or {}, "db_users": deny_users, "db_names": deny_names}
        ),
    )


DB_DEV = db_role("db-dev", allow={"env": "dev"}, users=["reader", "app_*"], names=["^orders_.*$"])
DB_ANY = db_role("db-any", allow={"*": "*"}, users=["*"], names=["*"])
DB_LABELS_ONLY = db_role("db-labels-only", allow={"env": "dev"})
DB_NO_PROD = db_role("db-no-prod", deny={"env": "prod"})
DB_NO_ROOT = db_role("db-no-root", deny_users=["root", "admin*"])
DB_NO_SYSTEM = db_role("db-no-system", deny_names=["postgres", "template?"])
PROD = {"env": "prod"}
NO_DB = AccessDecision(False, 'no role allows database "db"')

DB_ROWS: list[tuple[str, list[Role], dict[str, str], str, str, AccessDecision]] = [
    ("labels-user-name", [DB_DEV], DEV, "reader", "orders_eu",
     ok('allowed by role "db-dev": db_labels env=dev, db_users reader, db_names ^orders_.*$')),
    ("user-glob", [DB_DEV], DEV, "app_web", "",
     ok('allowed by role "db-dev": db_labels env=dev, db_users app_*')),
    ("labels-only-when-nothing-asked", [DB_LABELS_ONLY], DEV, "", "",
     ok('allowed by role "db-labels-only": db_labels env=dev')),
    ("labels-only-role-does-not-allow-a-user", [DB_LABELS_ONLY], DEV, "reader", "",
     AccessDecision(False, 'no role allows db_user "reader" on database "db"')),
    ("name-not-matched", [DB_DEV], DEV, "reader", "billing",
     AccessDecision(
         False, 'no role allows db_user "reader" and db_name "billing" on database "db"')),
    ("wrong-labels", [DB_DEV], PROD, "reader", "", NO_DB),
    ("app-labels-do-not-grant-databases", [EVERYTHING], DEV, "", "", NO_DB),
    ("one-role-must-allow-all", [DB_LABELS_ONLY, db_role("u", users=["reader"])], DEV, "reader",
     "", AccessDecision(False, 'no role allows db_user "reader" on database "db"')),
    ("second-role-allows", [DB_LABELS_ONLY, DB_ANY], DEV, "reader", "x",
     ok('allowed by role "db-any": db_labels *=*, db_users *, db_names *')),
    ("deny-labels-win", [DB_ANY, DB_NO_PROD], PROD, "", "",
     AccessDecision(False, 'denied by role "db-no-prod": db_labels env=prod')),
    ("deny-user-wins", [DB_ANY, DB_NO_ROOT], DEV, "admin_1", "",
     AccessDecision(False, 'denied by role "db-no-root": db_users admin*')),
    ("deny-name-wins", [DB_ANY, DB_NO_SYSTEM], DEV, "reader", "template1",
     AccessDecision(False, 'denied by role "db-no-system": db_names template?')),
    ("deny-user-ignored-when-not-asked", [DB_ANY, DB_NO_ROOT], DEV, "", "x",
     ok('allowed by role "db-any": db_labels *=*, db_names *')),
    ("only-denies", [DB_NO_PROD, DB_NO_ROOT], DEV, "", "", NO_DB),
    ("no-roles", [], DEV, "reader", "x", NO_DB),
]  # fmt: skip


@pytest.mark.parametrize(
    ("roles", "labels", "user", "name", "expected"),
    [row[1:] for row in DB_ROWS],
    ids=[row[0] for row in DB_ROWS],
)
def test_check_db_access(
    roles: list[Role], labels: dict[str, str], user: str, name: str, expected: AccessDecision
) -> None:
    assert rbac.check_db_access(roles, "db", labels, user, name) == expected
