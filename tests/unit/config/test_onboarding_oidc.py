"""The onboarding options of the OIDC join methods (kubernetes, github, gitlab, generic_oidc)."""

from __future__ import annotations

import textwrap
from datetime import timedelta

import pytest

from tbot_py.config.loader import load_config_text
from tbot_py.config.overrides import CLIOverrides, apply_overrides
from tbot_py.config.render import render_config_yaml
from tbot_py.config.schema import BotConfig
from tbot_py.errors import ConfigError

SOURCE = "/etc/tbot.yaml"


def load(text: str) -> BotConfig:
    return load_config_text(textwrap.dedent(text), source=SOURCE)


def error_for(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text)
    return info.value


def onboarding(lines: str) -> str:
    """A config whose ``onboarding:`` block is ``lines`` (indented by two spaces each)."""
    return "version: v2\nonboarding:\n" + textwrap.indent(textwrap.dedent(lines), "  ")


# -- valid configs ------------------------------------------------------------------------------


def test_github_needs_only_the_token_resource_name() -> None:
    config = load(onboarding("join_method: github\ntoken: gha-deploy\n"))
    assert config.onboarding.join_method == "github"
    assert config.onboarding.read_token() == "gha-deploy"
    assert config.onboarding.is_delegated()


def test_token_join_is_not_delegated() -> None:
    assert not load(onboarding("token: abc\n")).onboarding.is_delegated()


def test_kubernetes_token_path_is_optional() -> None:
    plain = load(onboarding("join_method: kubernetes\ntoken: k8s\n")).onboarding
    assert plain.kubernetes is None
    given = load(
        onboarding("join_method: kubernetes\ntoken: k8s\nkubernetes: {token_path: /run/tok}\n")
    ).onboarding
    assert given.kubernetes is not None
    assert given.kubernetes.token_path == "/run/tok"


def test_gitlab_variable_name_defaults_to_tbot_gitlab_jwt() -> None:
    config = load(onboarding("join_method: gitlab\ntoken: gl\ngitlab: {}\n"))
    assert config.onboarding.gitlab is not None
    assert config.onboarding.gitlab.token_env_var_name == "TBOT_GITLAB_JWT"
    custom = load(
        onboarding("join_method: gitlab\ntoken: gl\ngitlab: {token_env_var_name: MY_JWT}\n")
    )
    assert custom.onboarding.gitlab is not None
    assert custom.onboarding.gitlab.token_env_var_name == "MY_JWT"


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("{env: IDP_TOKEN}", "env", "IDP_TOKEN"),
        ("{path: /run/idp/token}", "path", "/run/idp/token"),
        ("{command: [idp-cli, token, --json]}", "command", ["idp-cli", "token", "--json"]),
    ],
)
def test_generic_oidc_takes_one_source(section: str, field: str, value: object) -> None:
    config = load(onboarding(f"join_method: generic_oidc\ntoken: idp\ngeneric_oidc: {section}\n"))
    generic = config.onboarding.generic_oidc
    assert generic is not None
    assert getattr(generic, field) == value
    assert generic.timeout == timedelta(seconds=10)


def test_generic_oidc_timeout_can_be_raised_to_five_minutes() -> None:
    config = load(
        onboarding("join_method: generic_oidc\ntoken: idp\ngeneric_oidc: {env: T, timeout: 5m}\n")
    )
    assert config.onboarding.generic_oidc is not None
    assert config.onboarding.generic_oidc.timeout == timedelta(minutes=5)


def test_oidc_sections_survive_rendering() -> None:
    config = load(
        onboarding(
            "join_method: generic_oidc\ntoken: idp\n"
            "generic_oidc: {command: [sh, -c, 'cat /t'], timeout: 30s}\n"
        )
    )
    assert load_config_text(render_config_yaml(config)) == config


def test_join_method_flag_selects_an_oidc_method() -> None:
    config = apply_overrides(None, CLIOverrides(join_method="gitlab", token="gl-deploy"))
    assert config.onboarding.join_method == "gitlab"
    assert config.onboarding.is_delegated()


# -- refusals, each at its YAML path ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "join_method: github\ntoken: gha\ngitlab: {}\n",
            ":5: onboarding.gitlab: is set but join_method is github "
            "(remove it, or set join_method: gitlab)",
        ),
        (
            "token: abc\nkubernetes: {}\n",
            ":4: onboarding.kubernetes: is set but join_method is token",
        ),
        (
            "join_method: github\ntoken: /var/lib/tbot/token\n",
            ":4: onboarding.token: for join method github this is the name of a token resource, "
            "not a file path",
        ),
        (
            "join_method: kubernetes\ntoken: k8s\nkubernetes: {token_path: run/token}\n",
            ':5: onboarding.kubernetes.token_path: must be an absolute path, got "run/token"',
        ),
        (
            "join_method: kubernetes\ntoken: k8s\nkubernetes: {path: /run/token}\n",
            ':5: onboarding.kubernetes: unknown key "path"',
        ),
        (
            "join_method: gitlab\ntoken: gl\ngitlab: {token_env_var_name: 'MY-JWT'}\n",
            ':5: onboarding.gitlab.token_env_var_name: invalid environment variable name "MY-JWT"',
        ),
        (
            "join_method: generic_oidc\ntoken: idp\ngeneric_oidc: {}\n",
            ":5: onboarding.generic_oidc: set exactly one of env, path and command",
        ),
        (
            "join_method: generic_oidc\ntoken: idp\ngeneric_oidc: {env: A, command: [b]}\n",
            ":5: onboarding.generic_oidc: set exactly one of env, path and command, "
            "e.g. {env: TBOT_ID_TOKEN} (got env and command)",
        ),
        (
            "join_method: generic_oidc\ntoken: idp\ngeneric_oidc: {command: 'idp-cli token'}\n",
            ":5: onboarding.generic_oidc.command: command must be an argv list",
        ),
        (
            "join_method: generic_oidc\ntoken: idp\ngeneric_oidc: {command: []}\n",
            ":5: onboarding.generic_oidc.command: must not be empty",
        ),
        (
            "join_method: generic_oidc\ntoken: idp\ngeneric_oidc: {path: token.jwt}\n",
            ':5: onboarding.generic_oidc.path: must be an absolute path, got "token.jwt"',
        ),
        (
            "join_method: generic_oidc\ntoken: idp\ngeneric_oidc: {env: T, timeout: 6m}\n",
            ':5: onboarding.generic_oidc.timeout: timeout must be at most 5m, got "6m"',
        ),
        (
            "join_method: generic_oidc\ntoken: idp\ngeneric_oidc: {env: T, timeout: 0s}\n",
            ":5: onboarding.generic_oidc.timeout: duration must be greater than zero",
        ),
    ],
)
def test_bad_oidc_onboarding_is_reported_at_its_key(text: str, expected: str) -> None:
    assert str(error_for(onboarding(text))).startswith(SOURCE + expected)


@pytest.mark.parametrize("method", ["kubernetes", "github", "gitlab", "generic_oidc"])
def test_oidc_methods_require_the_token_resource_name(method: str) -> None:
    err = error_for(onboarding(f"join_method: {method}\n"))
    assert err.yaml_path == "onboarding.token"
    assert err.message == (
        f"join method {method} needs the name of a token resource here "
        "(created with tbot-py auth create -f token.yaml)"
    )


def test_join_method_flag_clashing_with_a_section_in_the_file_is_an_error() -> None:
    base = load(onboarding("join_method: gitlab\ntoken: gl\ngitlab: {}\n"))
    with pytest.raises(ConfigError) as info:
        apply_overrides(base, CLIOverrides(join_method="github"))
    assert "onboarding.gitlab: is set but join_method is github" in str(info.value)
