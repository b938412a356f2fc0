"""Role files: strict parsing, errors at file:line: yaml.path, YAML out, trait expansion."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tbot_py.authservice.roles import (
    LOGINS_TRAIT,
    PRESET_ROLES,
    ImpersonateRule,
    MCPRule,
    RoleConditions,
    new_role,
    parse_role_yaml,
)
from tbot_py.errors import ConfigError

ROLE_YAML = """\
kind: role
version: v7
metadata:
  name: mcp-readonly
  description: Read-only MCP tools on dev apps
spec:
  options:
    max_session_ttl: 8h
  allow:
    logins: ['{{internal.logins}}', ubuntu]
    app_labels:
      env: dev
      team: [a, 'db-*']
    mcp:
      tools: ['^(get|query|list|search|find)_.*$']
    impersonate:
      roles: [a, b]
  deny:
    logins: [root]
    app_labels: {env: prod}
    mcp: {tools: [delete_*]}
"""


def test_a_role_file_is_parsed_into_the_model() -> None:
    role = parse_role_yaml(ROLE_YAML, "role.yaml")
    assert (role.kind, role.version, role.name) == ("role", "v7", "mcp-readonly")
    assert role.metadata.description == "Read-only MCP tools on dev apps"
    assert role.max_session_ttl == timedelta(hours=8)
    assert role.spec.allow == RoleConditions(
        logins=(LOGINS_TRAIT, "ubuntu"),
        app_labels={"env": "dev", "team": ("a", "db-*")},
        mcp=MCPRule(tools=("^(get|query|list|search|find)_.*$",)),
        impersonate=ImpersonateRule(roles=("a", "b")),
    )
    assert role.spec.deny == RoleConditions(
        logins=("root",), app_labels={"env": "prod"}, mcp=MCPRule(tools=("delete_*",))
    )


@pytest.mark.parametrize("version", ["v6", "v7", "v8"])
def test_supported_versions_are_accepted(version: str) -> None:
    role = parse_role_yaml(ROLE_YAML.replace("version: v7", f"version: {version}"))
    assert role.version == version


def test_defaults_are_teleports() -> None:
    role = parse_role_yaml("kind: role\nversion: v7\nmetadata: {name: bare}\n")
    assert role.max_session_ttl == timedelta(hours=30)
    assert role.spec.allow == RoleConditions() == role.spec.deny


def test_to_yaml_reads_back_unchanged_and_leaves_out_empty_rules() -> None:
    role = parse_role_yaml(ROLE_YAML)
    assert parse_role_yaml(role.to_yaml()) == role
    for preset in PRESET_ROLES:
        assert parse_role_yaml(preset.to_yaml()) == preset
    bare = new_role("bare")
    assert bare.to_yaml() == (
        "kind: role\nversion: v7\nmetadata:\n  name: bare\n"
        "spec:\n  options:\n    max_session_ttl: 30h\n"
    )


def test_template_spacing_is_normalised() -> None:
    role = parse_role_yaml(ROLE_YAML.replace("'{{internal.logins}}'", "'{{ internal.logins }}'"))
    assert role.spec.allow.logins == (LOGINS_TRAIT, "ubuntu")


def test_trait_expansion_replaces_the_template_with_the_bots_logins() -> None:
    allow = parse_role_yaml(ROLE_YAML).spec.allow
    assert allow.expand_logins({"logins": ["root", "ubuntu"]}) == ("root", "ubuntu")
    assert allow.expand_logins({"logins": ["deploy"]}) == ("deploy", "ubuntu")
    assert allow.expand_logins({}) == ("ubuntu",)


def _replace(old: str, new: str) -> str:
    assert ROLE_YAML.count(old) == 1, old
    return ROLE_YAML.replace(old, new)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (_replace("env: dev", "env: '^(unclosed$'"),
         "role.yaml:12: spec.allow.app_labels.env: invalid regular expression '^(unclosed$': "
         "missing ), unterminated subpattern at position 1"),
        (_replace("['^(get|query|list|search|find)_.*$']", "\n        - get_*\n        - '^(x$'"),
         "role.yaml:17: spec.allow.mcp.tools[1]: invalid regular expression '^(x$': "
         "missing ), unterminated subpattern at position 1"),
        (_replace("[delete_*]", "['^delete_']"),
         "role.yaml:21: spec.deny.mcp.tools[0]: regular expression '^delete_' must end with $ "
         "(a regex pattern is ^...$)"),
        (_replace("kind: role", "kind: user"),
         'role.yaml:1: kind: unsupported kind "user"; only "role" is supported'),
        (_replace("version: v7", "version: v5"),
         'role.yaml:2: version: unsupported role version "v5"; use one of v6, v7, v8'),
        (_replace("kind: role\n", ""), 'role.yaml:1: missing required key "kind"'),
        (_replace("version: v7\n", ""), 'role.yaml:1: missing required key "version"'),
        (_replace("  name: mcp-readonly\n", ""),
         'role.yaml:3: metadata: missing required key "name"'),
        (_replace("  name: mcp-readonly", "  name: 'has space'"),
         "role.yaml:4: metadata.name: invalid role name 'has space': "
         "use 1-128 letters, digits and _ . @ : -"),
        (_replace("    app_labels:\n      env", "    app_label:\n      env"),
         'role.yaml:11: spec.allow.app_label: unknown key "app_label"; '
         'did you mean "app_labels"?'),
        (_replace("spec:", "specs:"),
         'role.yaml:6: specs: unknown key "specs"; did you mean "spec"?'),
        (_replace("    logins: [root]", "    rule: []"),
         'role.yaml:19: spec.deny.rule: unknown key "rule"; did you mean "rules"?'),
        (_replace("    logins: [root]", "    rules: [{resources: [node], verbs: [create]}]"),
         'role.yaml:19: spec.deny.rules[0].resources: unknown resource "node" '
         "(known: *, app_session, host_cert)"),
        (_replace("    logins: [root]", "    rules: [{resources: [host_cert], verbs: []}]"),
         "role.yaml:19: spec.deny.rules[0].verbs: a rule needs at least one verb"),
        (_replace("max_session_ttl: 8h", "max_session_ttl: 8 hours"),
         'role.yaml:8: spec.options.max_session_ttl: invalid duration "8 hours" '
         "(use Go syntax such as 30s, 20m, 1h)"),
        (_replace("max_session_ttl: 8h", "max_session_ttl: 0s"),
         'role.yaml:8: spec.options.max_session_ttl: duration must be greater than zero, '
         'got "0s"'),
        (_replace(", ubuntu]", ", '{{external.groups}}']"),
         "role.yaml:10: spec.allow.logins[1]: unsupported trait template "
         "'{{external.groups}}'; only {{internal.logins}} is supported"),
        (_replace(", ubuntu]", ", 'two words']"),
         "role.yaml:10: spec.allow.logins[1]: invalid login 'two words': "
         "use letters, digits and _ . @ : -"),
        (_replace("env: dev", "env: 5"),
         "role.yaml:12: spec.allow.app_labels.env: expected a string or a list of strings, "
         "got an integer"),
        (_replace("[a, 'db-*']", "[a, true]"),
         "role.yaml:13: spec.allow.app_labels.team[1]: expected a string, got a boolean"),
        (_replace("env: dev", "'*': dev"),
         "role.yaml:12: spec.allow.app_labels.*: the label name '*' only works with the value '*'"),
        (_replace("env: dev", "env: '{{internal.logins}}'"),
         "role.yaml:12: spec.allow.app_labels.env: trait templates are only supported in logins, "
         "not in pattern '{{internal.logins}}'"),
        (_replace("[delete_*]}", "[delete_*}"),
         "role.yaml:21: invalid YAML: expected ',' or ']', but got '}'"),
        ("", 'role.yaml: the role file is empty; it needs "kind: role"'),
        ("# only a comment\n", 'role.yaml: the role file is empty; it needs "kind: role"'),
        ("- kind: role\n",
         "role.yaml:1: expected a mapping of config keys at the top level, got a list"),
        ("kind: role\nversion: v7\nkind: role\n", 'role.yaml:3: duplicate key "kind"'),
    ],
)  # fmt: skip
def test_role_errors_name_file_line_and_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_role_yaml(text, "role.yaml")
    assert str(err.value) == error


def test_several_problems_report_the_first_and_count_the_rest() -> None:
    text = _replace("env: dev", "env: '^(x$'").replace("[delete_*]", "['^(y$']")
    with pytest.raises(ConfigError) as err:
        parse_role_yaml(text, "role.yaml")
    assert str(err.value).startswith("role.yaml:12: spec.allow.app_labels.env: ")
    assert str(err.value).endswith("(and 1 more error)")


DB_ROLE_YAML = """\
kind: role
version: v7
metadata: {name: db-reader}
spec:
  allow:
    db_labels: {env: [dev, staging]}
    db_users: [reader, 'app_*']
    db_names: ['^orders_.*$']
  deny:
    db_labels: {env: prod}
    db_users: [root]
    db_names: [postgres]
"""


def test_db_rules_are_parsed_and_read_back_unchanged() -> None:
    role = parse_role_yaml(DB_ROLE_YAML, "role.yaml")
    assert role.spec.allow == RoleConditions(
        db_labels={"env": ("dev", "staging")},
        db_users=("reader", "app_*"),
        db_names=("^orders_.*$",),
    )
    assert role.spec.deny == RoleConditions(
        db_labels={"env": "prod"}, db_users=("root",), db_names=("postgres",)
    )
    assert parse_role_yaml(role.to_yaml()) == role


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("[reader, 'app_*']", "['{{internal.db_users}}']",
         "role.yaml:7: spec.allow.db_users[0]: trait templates are only supported in logins, "
         "not in pattern '{{internal.db_users}}'"),
        ("['^orders_.*$']", "['^(orders$']",
         "role.yaml:8: spec.allow.db_names[0]: invalid regular expression '^(orders$': "
         "missing ), unterminated subpattern at position 1"),
        ("{env: prod}", "{'*': prod}",
         "role.yaml:10: spec.deny.db_labels.*: the label name '*' only works with the value '*'"),
        ("db_names: [postgres]", "db_name: [postgres]",
         'role.yaml:12: spec.deny.db_name: unknown key "db_name"; did you mean "db_names"?'),
    ],
)  # fmt: skip
def test_db_rule_errors_name_file_line_and_key(old: str, new: str, error: str) -> None:
    assert DB_ROLE_YAML.count(old) == 1, old
    with pytest.raises(ConfigError) as err:
        parse_role_yaml(DB_ROLE_YAML.replace(old, new), "role.yaml")
    assert str(err.value) == error


def test_the_access_and_editor_presets_allow_every_database() -> None:
    presets = {role.name: role for role in PRESET_ROLES}
    access, editor = presets["access"].spec.allow, presets["editor"].spec.allow
    assert access.db_labels == editor.db_labels == {"*": "*"}
    assert (access.db_users, access.db_names) == (("*",), ("*",))
    assert (editor.db_users, editor.db_names) == ((), ())
    assert presets["auditor"].spec.allow == RoleConditions()


def test_roles_built_in_code_are_validated_too() -> None:
    with pytest.raises(ValueError, match="invalid regular expression"):
        new_role("x", allow=RoleConditions.model_validate({"app_labels": {"env": "^(x$"}}))
