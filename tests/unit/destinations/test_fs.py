"""Opening destination paths without following symlinks: openat2 and the O_NOFOLLOW walk."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tbot_py.destinations import DirectoryDestination, fs
from tbot_py.errors import DestinationError


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test once with openat2 (where the kernel has it) and once with the fallback walk."""
    if request.param == "openat2":
        if not fs.openat2_available():
            pytest.skip("openat2 is not available on this kernel or is blocked by seccomp")
    else:
        monkeypatch.setattr(fs, "_openat2_state", False)
    yield request.param


def test_opening_a_plain_directory_works(tmp_path: Path, resolver: str) -> None:
    fd = fs.open_directory(tmp_path, "secure")
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path))
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["leaf", "middle"])
def test_a_symlink_anywhere_in_the_path_is_refused_and_named(
    tmp_path: Path, resolver: str, where: str
) -> None:
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    target = tmp_path / "link" if where == "leaf" else tmp_path / "link" / "sub"
    with pytest.raises(DestinationError) as info:
        fs.open_directory(target, "secure")
    assert f"{tmp_path / 'link'} is a symlink; with symlinks: secure" in str(info.value)


def test_the_walk_creates_missing_components_0700_and_never_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fs, "_openat2_state", False)
    old = os.umask(0o022)
    try:
        os.close(fs.open_directory(tmp_path / "a" / "b", "try-secure", create=True))
    finally:
        os.umask(old)
    for path in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "a" / "c").symlink_to(outside)
    with pytest.raises(DestinationError, match="is a symlink"):
        fs.open_directory(tmp_path / "a" / "c" / "d", "try-secure", create=True)
    assert list(outside.iterdir()) == []


def test_insecure_mode_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.close(fs.open_directory(tmp_path / "link", "insecure"))


def test_missing_directory_and_file_in_the_way_are_clear(tmp_path: Path, resolver: str) -> None:
    with pytest.raises(DestinationError, match="does not exist"):
        fs.open_directory(tmp_path / "missing", "secure")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DestinationError, match="not a directory"):
        fs.open_directory(tmp_path / "file", "secure")


def test_write_file_atomic_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    (tmp_path / "config.yaml").symlink_to(outside)
    fs.write_file_atomic(tmp_path / "config.yaml", b"new")
    assert outside.read_bytes() == b"keep"
    assert not (tmp_path / "config.yaml").is_symlink()
    assert (tmp_path / "config.yaml").read_bytes() == b"new"
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "outside"]


def test_a_destination_owned_by_someone_else_gets_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    os.chown(out, 4242, 4242)
    with caplog.at_level(logging.WARNING):
        DirectoryDestination(out).init()
    assert "is owned by uid 4242, not by the user tbot-py runs as (uid 0)" in caplog.text
