"""The shipped examples stay valid configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tbot_py.config import load_config_file

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_loads_without_errors(path: Path) -> None:
    config = load_config_file(path)
    assert config.services
    assert config.require_address()


def test_there_are_examples_for_ci_and_daemon() -> None:
    assert {p.name for p in EXAMPLES} >= {"ci-oneshot.yaml", "daemon.yaml"}
