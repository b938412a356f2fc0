"""Reader ACLs on a directory destination: set before a version is published, drift corrected."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tbot_py.destinations import DirectoryDestination
from tbot_py.destinations.acl import Reader, acl_drift, apply_reader_acls
from tbot_py.errors import DestinationError
from tests.acls import skip_unless_acls_work

READERS = (Reader(kind="user", id="4242"), Reader(kind="group", id="4343"))


@pytest.fixture
def acl_root(tmp_path: Path) -> Path:
    skip_unless_acls_work(tmp_path)
    return tmp_path


def _drift(path: Path, readers: tuple[Reader, ...], *, is_dir: bool) -> str | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return acl_drift(fd, readers, is_dir=is_dir)
    finally:
        os.close(fd)


def _version(dest: DirectoryDestination) -> Path:
    return dest.path / os.readlink(dest.path / "..data")


def test_readers_get_read_only_acls_on_every_published_file(acl_root: Path) -> None:
    dest = DirectoryDestination(acl_root / "out", readers=READERS)
    dest.init()
    dest.write_many({"key": b"k", "tlscert": b"c"})
    assert _drift(dest.path, READERS, is_dir=True) is None
    assert _drift(_version(dest), READERS, is_dir=True) is None
    for name in ("key", "tlscert"):
        assert _drift(_version(dest) / name, READERS, is_dir=False) is None
    getfacl = subprocess.run(
        ["getfacl", "-n", "-p", str(_version(dest) / "key")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "user:4242:r--" in getfacl.stdout
    assert "group:4343:r--" in getfacl.stdout
    assert "mask::r--" in getfacl.stdout


def test_drift_is_corrected_by_the_next_write(acl_root: Path) -> None:
    dest = DirectoryDestination(acl_root / "out", readers=READERS)
    dest.init()
    dest.write_many({"key": b"k", "tlscert": b"c"})
    tampered = _version(dest) / "tlscert"
    subprocess.run(["setfacl", "-m", "u:4244:rw-", str(tampered)], check=True)
    assert _drift(tampered, READERS, is_dir=False) is not None
    dest.write("key", b"k2")  # tlscert is carried over (same inode) and its ACL set again
    assert _drift(_version(dest) / "tlscert", READERS, is_dir=False) is None


def test_readers_left_on_the_directory_by_init_are_inherited(acl_root: Path) -> None:
    out = acl_root / "out"
    out.mkdir(mode=0o700)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        apply_reader_acls(fd, directories=[], files=[], readers=READERS[:1])
    finally:
        os.close(fd)
    dest = DirectoryDestination(out)  # no readers configured
    dest.init()
    dest.write("key", b"k")
    assert _drift(_version(dest) / "key", READERS[:1], is_dir=False) is None


def test_acls_off_sets_none(acl_root: Path) -> None:
    dest = DirectoryDestination(acl_root / "out", acls="off", readers=READERS)
    dest.init()
    dest.write("key", b"k")
    assert _drift(_version(dest) / "key", (), is_dir=False) is None


def _fake_setfacl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "setfacl"
    fake.write_text("#!/bin/sh\necho 'setfacl: x: Operation not supported' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_acls_required_fails_loudly_where_acls_do_not_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_setfacl(tmp_path, monkeypatch)
    dest = DirectoryDestination(tmp_path / "out", acls="required", readers=READERS)
    with pytest.raises(DestinationError, match=r"ACLs are required \(acls: required\) but"):
        dest.init()


def test_acls_try_warns_and_writes_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fake_setfacl(tmp_path, monkeypatch)
    dest = DirectoryDestination(tmp_path / "out", acls="try", readers=READERS)
    dest.init()
    dest.write("key", b"k")
    assert "readers will not get ACLs" in caplog.text
    assert dest.read("key") == b"k"
