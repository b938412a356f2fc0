from __future__ import annotations

import os

import pytest

from tbot_py.config import (
    DirectoryDestination,
    MemoryDestination,
    destination_from_uri,
    destination_to_uri,
)
from tbot_py.errors import ConfigError


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("file:///var/lib/out", "/var/lib/out"),
        ("file:///var/lib/with%20space", "/var/lib/with space"),
        ("/opt/machine-id", "/opt/machine-id"),
        ("/opt/machine-id/../out", "/opt/out"),
    ],
)
def test_absolute_paths_and_file_uris_are_directories(uri: str, path: str) -> None:
    assert destination_from_uri(uri) == DirectoryDestination(path=path)


def test_relative_paths_are_made_absolute_against_the_working_directory() -> None:
    expected = os.path.join(os.getcwd(), "out", "dir")
    assert destination_from_uri("out/dir") == DirectoryDestination(path=expected)
    assert destination_from_uri("file:out/dir") == DirectoryDestination(path=expected)


def test_memory_uri_is_a_memory_destination() -> None:
    assert destination_from_uri("memory://") == MemoryDestination()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file://host/path", 'file URIs must not name a host, got "host"'),
        ("memory://foo", 'memory URIs take no host or path, got "memory://foo"'),
        ("memory:///x", 'memory URIs take no host or path, got "memory:///x"'),
        (
            "kubernetes-secret:///name",
            'destination scheme "kubernetes-secret" is not supported yet',
        ),
        ("s3://bucket/key", 'unrecognized destination scheme "s3"'),
        ("", "expected a directory or a URI"),
    ],
)
def test_bad_uris_are_config_errors_naming_the_flag(uri: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        destination_from_uri(uri, flag="--storage")
    err = info.value
    assert err.yaml_path == "--storage"
    assert (err.source, err.line) == (None, None)
    assert err.message.startswith(message)


def test_default_flag_in_errors_is_destination() -> None:
    with pytest.raises(ConfigError) as info:
        destination_from_uri("x://y")
    assert str(info.value).startswith('--destination: unrecognized destination scheme "x"')


def test_destination_to_uri_round_trips() -> None:
    for uri in ("/var/lib/out", "memory://"):
        assert destination_to_uri(destination_from_uri(uri)) == uri
