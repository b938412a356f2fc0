"""POSIX ACLs set with the real setfacl and checked with the real getfacl, on tmp_path."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tbot_py.destinations.acl import (
    Reader,
    acl_drift,
    acl_support_problem,
    apply_reader_acls,
    readers_from_acl,
    set_legacy_init_acl,
)
from tbot_py.errors import AclError, DestinationError

NOBODY_READERS = [Reader("user", "4242"), Reader("group", "4343")]


def getfacl(path: Path) -> list[str]:
    """The entries of ``getfacl -n`` (numeric ids), without the header."""
    done = subprocess.run(
        ["getfacl", "-n", "-c", "-p", str(path)], capture_output=True, text=True, check=True
    )
    return [line for line in done.stdout.splitlines() if line]


@contextlib.contextmanager
def opened(path: Path, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def acl_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """tmp_path/dest open as a descriptor, with a file ``f`` and a directory ``d`` in it."""
    if shutil.which("setfacl") is None or shutil.which("getfacl") is None:
        pytest.skip("setfacl/getfacl are not installed (apt-get install acl)")
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    (dest / "f").write_bytes(b"secret")
    (dest / "f").chmod(0o600)
    (dest / "d").mkdir(mode=0o700)
    with opened(dest) as fd:
        problem = acl_support_problem(fd)
        if problem is not None:
            pytest.skip(f"ACLs do not work in {dest}: {problem}")
        yield dest, fd


def install_failing_setfacl(bin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put a setfacl first on PATH that fails like it does on a file system without ACLs."""
    bin_dir.mkdir()
    script = bin_dir / "setfacl"
    script.write_text(
        '#!/bin/sh\nfor last; do :; done\necho "setfacl: $last: Operation not supported" >&2\n'
        "exit 1\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.fixture
def fake_setfacl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_failing_setfacl(tmp_path / "bin", monkeypatch)


def test_reader_acl_is_tbots_on_files_and_directories(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    apply_reader_acls(fd, directories=["d"], files=["f"], readers=NOBODY_READERS)
    expected_dir = [
        "user::rwx", "user:4242:r-x", "group::---", "group:4343:r-x", "mask::r-x", "other::---",
    ]  # fmt: skip
    assert getfacl(dest) == expected_dir
    assert getfacl(dest / "d") == expected_dir
    assert getfacl(dest / "f") == [
        "user::rw-", "user:4242:r--", "group::---", "group:4343:r--", "mask::r--", "other::---",
    ]  # fmt: skip
    assert (dest / "f").read_bytes() == b"secret"


def test_include_self_false_leaves_the_directory_alone(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    apply_reader_acls(fd, directories=[], files=["f"], readers=NOBODY_READERS, include_self=False)
    assert getfacl(dest) == ["user::rwx", "group::---", "other::---"]
    assert "user:4242:r--" in getfacl(dest / "f")


def test_names_resolve_to_numeric_entries() -> None:
    assert Reader("user", "root").entry("r--") == "u:0:r--"
    assert Reader("group", "4343").entry("r-x") == "g:4343:r-x"
    # setfacl would read "010" as octal 8; we pass decimal.
    assert Reader("user", "010").entry("r--") == "u:10:r--"


def test_unknown_name_is_one_line_error_and_changes_nothing(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    readers = [Reader("user", "4242"), Reader("user", "no-such-user-tbotpy")]
    with pytest.raises(AclError) as caught:
        apply_reader_acls(fd, directories=[], files=["f"], readers=readers)
    assert str(caught.value) == "unknown user 'no-such-user-tbotpy'"
    assert isinstance(caught.value, DestinationError)
    assert getfacl(dest / "f") == ["user::rw-", "group::---", "other::---"]
    with pytest.raises(AclError, match="unknown group 'no-such-group-tbotpy'"):
        Reader("group", "no-such-group-tbotpy").numeric_id()


def test_bad_reader_values_are_refused() -> None:
    with pytest.raises(AclError, match="'user' or 'group'"):
        Reader("role", "x")  # type: ignore[arg-type]
    with pytest.raises(AclError, match="invalid user name"):
        Reader("user", "")
    with pytest.raises(AclError, match="out of range"):
        Reader("user", str(2**32)).numeric_id()
    with pytest.raises(AclError, match="invalid ACL permissions"):
        Reader("user", "1").entry("rwz")


def test_drift_is_reported_then_corrected(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    readers = [Reader("user", "4242")]
    apply_reader_acls(fd, directories=[], files=["f"], readers=readers)
    with opened(dest / "f") as file_fd:
        assert acl_drift(file_fd, readers, is_dir=False) is None
        subprocess.run(["setfacl", "-m", "u:4243:rw-", str(dest / "f")], check=True)
        assert acl_drift(file_fd, readers, is_dir=False) == (
            "has user:4243:rw-, mask::rw-; lacks mask::r--"
        )
        apply_reader_acls(fd, directories=[], files=["f"], readers=readers)
        assert acl_drift(file_fd, readers, is_dir=False) is None
        assert acl_drift(file_fd, [Reader("user", "4244")], is_dir=False) == (
            "has user:4242:r--; lacks user:4244:r--"
        )


def test_default_acl_on_a_directory_is_drift_and_removed(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    readers = [Reader("user", "4242")]
    apply_reader_acls(fd, directories=["d"], files=[], readers=readers)
    subprocess.run(["setfacl", "-m", "d:u:4242:r-x", str(dest / "d")], check=True)
    with opened(dest / "d") as dir_fd:
        assert acl_drift(dir_fd, readers, is_dir=True) == "has a default ACL"
        apply_reader_acls(fd, directories=["d"], files=[], readers=readers)
        assert acl_drift(dir_fd, readers, is_dir=True) is None
    assert not any(line.startswith("default:") for line in getfacl(dest / "d"))


def test_readers_round_trip_through_the_acl(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    apply_reader_acls(
        fd, directories=[], files=["f"], readers=[Reader("group", "root"), *NOBODY_READERS]
    )
    assert readers_from_acl(fd) == [
        Reader("user", "4242"),
        Reader("group", "0"),
        Reader("group", "4343"),
    ]
    # An O_PATH descriptor (no read access needed) works too.
    with opened(dest / "f", os.O_PATH) as path_fd:
        assert readers_from_acl(path_fd) == readers_from_acl(fd)


def test_a_file_without_acl_has_no_readers_and_no_drift_from_none(
    acl_dir: tuple[Path, int],
) -> None:
    dest, _ = acl_dir
    with opened(dest / "f") as file_fd:
        assert readers_from_acl(file_fd) == []
        assert acl_drift(file_fd, [], is_dir=False) is None
        os.chmod(dest / "f", 0o640)
        assert acl_drift(file_fd, [], is_dir=False) == "has group::r--; lacks group::---"


def test_no_readers_removes_the_acl(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    apply_reader_acls(fd, directories=["d"], files=["f"], readers=NOBODY_READERS)
    apply_reader_acls(fd, directories=["d"], files=["f"], readers=[])
    assert getfacl(dest / "f") == ["user::rw-", "group::---", "other::---"]
    assert stat.S_IMODE((dest / "f").stat().st_mode) == 0o600
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o700
    assert readers_from_acl(fd) == []


def test_symlinks_and_path_names_are_refused(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    (dest / "link").symlink_to(dest / "f")
    with pytest.raises(AclError, match="link: is a symlink"):
        apply_reader_acls(fd, directories=[], files=["link"], readers=NOBODY_READERS)
    assert getfacl(dest / "f") == ["user::rw-", "group::---", "other::---"]
    for name in ("d/../f", "..", "", "d/", "./f"):
        with pytest.raises(AclError, match="invalid name"):
            apply_reader_acls(fd, directories=[], files=[name], readers=[])
    (dest / "d" / "x").write_bytes(b"x")
    (dest / "dlink").symlink_to(dest / "d")
    with pytest.raises(AclError, match="dlink: is a symlink"):
        apply_reader_acls(fd, directories=[], files=["dlink/x"], readers=NOBODY_READERS)
    assert "user:4242:r--" not in getfacl(dest / "d" / "x")
    with pytest.raises(AclError, match="is not a regular file"):
        apply_reader_acls(fd, directories=[], files=["d"], readers=[])
    with pytest.raises(AclError, match="is not a directory"):
        apply_reader_acls(fd, directories=["f"], files=[], readers=[])


def test_paths_below_the_directory_get_the_acl(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    (dest / "d" / "key").write_bytes(b"k")
    apply_reader_acls(fd, directories=["d"], files=["d/key"], readers=NOBODY_READERS)
    assert "user:4242:r--" in getfacl(dest / "d" / "key")
    assert "user:4242:r-x" in getfacl(dest / "d")


def test_the_directory_descriptor_pins_the_target(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    moved = dest.with_name("moved")
    dest.rename(moved)
    dest.mkdir()
    (dest / "f").write_bytes(b"decoy")
    apply_reader_acls(fd, directories=[], files=["f"], readers=NOBODY_READERS)
    assert "user:4242:r--" in getfacl(moved / "f")
    assert "user:4242:r--" not in getfacl(dest / "f")


def test_legacy_init_acl_lets_the_bot_write_and_the_reader_read(
    acl_dir: tuple[Path, int],
) -> None:
    dest, fd = acl_dir
    set_legacy_init_acl(fd, [".", "d"], ["f"], 4242, 4343, owner_uid=os.geteuid())
    assert getfacl(dest / "d") == [
        "user::rwx", "user:4242:rwx", "user:4343:r-x", "group::---", "mask::rwx", "other::---",
    ]  # fmt: skip
    assert getfacl(dest / "f") == [
        "user::rw-", "user:4242:rw-", "user:4343:r--", "group::---", "mask::rw-", "other::---",
    ]  # fmt: skip


def test_legacy_init_acl_skips_the_owner(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    me = os.fstat(fd).st_uid
    set_legacy_init_acl(fd, [], ["f"], me, 4343)
    assert getfacl(dest / "f") == [
        "user::rw-", "user:4343:r--", "group::---", "mask::rw-", "other::---",
    ]  # fmt: skip
    set_legacy_init_acl(fd, [], ["f"], me, me)
    assert getfacl(dest / "f") == ["user::rw-", "group::---", "other::---"]


def test_support_probe_leaves_nothing_behind(acl_dir: tuple[Path, int]) -> None:
    dest, fd = acl_dir
    assert acl_support_problem(fd) is None
    assert sorted(p.name for p in dest.iterdir()) == ["d", "f"]


def test_support_problem_names_a_missing_setfacl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with opened(tmp_path) as fd:
        assert acl_support_problem(fd) == "setfacl is not installed"
        with pytest.raises(AclError, match="setfacl is not installed"):
            apply_reader_acls(fd, directories=[], files=[], readers=[])


@pytest.mark.usefixtures("fake_setfacl")
def test_support_problem_and_errors_name_an_unsupported_file_system(tmp_path: Path) -> None:
    (tmp_path / "f").touch()
    with opened(tmp_path) as fd:
        assert acl_support_problem(fd) == (
            "the file system does not support ACLs (Operation not supported)"
        )
        with pytest.raises(AclError) as caught:
            apply_reader_acls(fd, directories=[], files=["f"], readers=[], include_self=False)
    # setfacl's own line, with the real path instead of /proc/self/fd/N.
    assert str(caught.value) == f"setfacl: {tmp_path}/f: Operation not supported"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "f"]


def test_support_problem_when_the_directory_is_not_ours(tmp_path: Path) -> None:
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl is not installed (apt-get install acl)")
    target = Path("/")
    if os.geteuid() == 0:
        target = tmp_path / "theirs"
        target.mkdir()
        os.chown(target, 4242, 4242)
    owner = target.stat().st_uid
    with opened(target) as fd:
        assert acl_support_problem(fd) == (
            f"the directory is owned by uid {owner}, not by us (uid {os.geteuid()})"
        )


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mount: a real file system without ACL support (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a ramfs needs root")
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl is not installed (apt-get install acl)")
    mount = tmp_path / "ramfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "ramfs", "-o", "size=1m", "none", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_file_system_without_acls_is_detected(ramfs: Path) -> None:
    (ramfs / "f").write_bytes(b"x")
    with opened(ramfs) as fd:
        assert acl_support_problem(fd) == (
            "the file system does not support ACLs (Operation not supported)"
        )
        assert readers_from_acl(fd) == []
        with pytest.raises(AclError, match="Operation not supported"):
            apply_reader_acls(fd, directories=[], files=["f"], readers=NOBODY_READERS)
    assert sorted(p.name for p in ramfs.iterdir()) == ["f"]
