from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from tbot_py.config import (
    CLIOverrides,
    Onboarding,
    apply_overrides,
    load_config_text,
    render_config_yaml,
)
from tbot_py.errors import ConfigError

TOKEN = "tok-3f9a1c7e5b2d"


def all_error_texts(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), source="tbot.yaml")
    err = info.value
    return " ".join([str(err), repr(err), err.message, str(err.__cause__), str(err.__context__)])


def test_repr_of_config_hides_the_token() -> None:
    config = load_config_text(f"version: v2\nonboarding:\n  token: {TOKEN}\n")
    assert TOKEN not in repr(config)
    assert TOKEN not in str(config)
    assert TOKEN not in repr(config.onboarding)
    assert TOKEN not in repr(config.model_dump())


def test_repr_of_cli_overrides_hides_the_token() -> None:
    assert TOKEN not in repr(CLIOverrides(token=TOKEN))


@pytest.mark.parametrize(
    "text",
    [
        f"version: v2\nonboarding:\n  token: [{TOKEN}]\n",
        f"version: v2\nonboarding:\n  token: {{{TOKEN}: 1}}\n",
        f"version: v2\nonboarding:\n  token: {TOKEN}\n  ca_pins: [sha256:x]\n",
        f"version: v2\nonboarding:\n  token: {TOKEN}\n  insecure: true\n  ca_path: /ca\n",
        f"version: v2\nonboarding:\n  token: '{TOKEN}\n",
        f"version: v2\nonboarding:\n  token: {TOKEN}\n  token: {TOKEN}\n",
        f"version: v2\nonboarding:\n  token: {TOKEN}\n  join_method: azure\n",
    ],
)
def test_config_errors_never_contain_the_token(text: str) -> None:
    assert TOKEN not in all_error_texts(text)


def test_override_errors_never_contain_the_token() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(None, CLIOverrides(token=TOKEN, join_method="nope"))
    assert TOKEN not in str(info.value)
    assert info.value.__cause__ is None


def test_render_is_the_one_place_the_token_is_written() -> None:
    config = load_config_text(f"version: v2\nonboarding:\n  token: {TOKEN}\n")
    assert f"token: {TOKEN}" in render_config_yaml(config)


def test_inline_token_is_returned_as_is() -> None:
    onboarding = Onboarding.model_validate({"token": TOKEN})
    assert onboarding.read_token() == TOKEN
    assert onboarding.token_file() is None


def test_no_token_reads_as_none() -> None:
    assert Onboarding().read_token() is None


def test_token_file_is_read_lazily_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    onboarding = Onboarding.model_validate({"token": str(path)})  # may not exist yet
    path.write_text(f"\n  {TOKEN}\n")
    assert onboarding.token_file() == str(path)
    assert onboarding.read_token() == TOKEN


def test_missing_token_file_is_reported_without_secrets(tmp_path: Path) -> None:
    path = tmp_path / "token"
    onboarding = Onboarding.model_validate({"token": str(path)})
    with pytest.raises(ConfigError) as info:
        onboarding.read_token()
    assert str(info.value) == f"onboarding.token: token file {path} does not exist"


def test_empty_token_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(" \n")
    with pytest.raises(ConfigError, match=f"^onboarding.token: token file {path} is empty$"):
        Onboarding.model_validate({"token": str(path)}).read_token()


def test_token_path_that_is_a_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read: it is a directory"):
        Onboarding.model_validate({"token": str(tmp_path)}).read_token()


def test_unreadable_token_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file; simulate what everyone else gets
        monkeypatch.setattr(Path, "read_text", _raise_permission_error)
    with pytest.raises(ConfigError) as info:
        Onboarding.model_validate({"token": str(path)}).read_token()
    assert str(info.value) == (
        f"onboarding.token: token file {path} cannot be read: permission denied"
    )


def _raise_permission_error(*_args: object, **_kwargs: object) -> str:
    raise PermissionError(13, "Permission denied")


def test_empty_token_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^tbot.yaml:3: onboarding.token: must not be empty"):
        load_config_text("version: v2\nonboarding:\n  token: ''\n", source="tbot.yaml")


def test_relative_token_file_path_is_refused_not_sent_as_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bot-token").write_text("secret-value\n")
    monkeypatch.chdir(tmp_path)
    onboarding = Onboarding.model_validate({"token": "./bot-token"})
    with pytest.raises(ConfigError, match="absolute paths") as info:
        onboarding.read_token()
    assert "secret-value" not in str(info.value)
