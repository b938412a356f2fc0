"""``tbot-py init`` in-process: directory creation, layout cleaning, config picking, errors."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from tbot_py.cli.main import main
from tests.acls import skip_unless_acls_work
from tests.unit.destinations.test_acl import getfacl, install_failing_setfacl

VERSION = "..2026_11_22_01_30_00.123456789-ab12cd"
ME = pwd.getpwuid(os.geteuid()).pw_name


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(["init", *argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str) -> str:
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def make_layout(dest: Path) -> None:
    """A destination as the daemon leaves it, plus entries that are not ours."""
    version = dest / VERSION
    version.mkdir(parents=True, mode=0o755)
    (version / "key").write_bytes(b"key")
    (version / "key").chmod(0o644)
    (version / "cockroach").mkdir(mode=0o755)
    (version / "cockroach" / "node.key").write_bytes(b"key")
    (version / "cockroach" / "node.key").chmod(0o644)
    (dest / "..data").symlink_to(VERSION)
    (dest / "key").symlink_to("..data/key")
    (dest / "cockroach").symlink_to("..data/cockroach")
    (dest / "lock").write_bytes(b"")
    (dest / "lock").chmod(0o644)
    (dest / "..lock").write_bytes(b"")  # the daemon's write lock
    (dest / "tlscert").write_bytes(b"from an older layout")
    (dest / "tlscert").chmod(0o644)
    (dest / "notes").mkdir()
    (dest / "passwd").symlink_to("/etc/passwd")
    (dest / "ssh_config").symlink_to("..data/elsewhere")


def test_creates_missing_directories_private_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "a" / "b"
    code, out, err = run(["--destination-dir", str(dest)], capsys)
    assert code == 0, err
    assert mode_of(tmp_path / "a") == 0o700
    assert mode_of(dest) == 0o700
    assert out.splitlines() == [
        f"Prepared {dest} for tbot-py:",
        f"  created: {tmp_path / 'a'}, {dest}",
        f"  owner: {ME} (uid {os.geteuid()}, gid {pwd.getpwuid(os.geteuid()).pw_gid})",
        "  mode: 0700 directories, 0600 files (no ACL)",
    ]


def test_existing_layout_is_kept_and_made_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest"
    make_layout(dest)
    code, out, err = run(["--destination-dir", str(dest)], capsys)
    assert code == 0, err
    assert mode_of(dest / VERSION) == 0o700
    assert mode_of(dest / VERSION / "key") == 0o600
    assert mode_of(dest / VERSION / "cockroach") == 0o700  # a subdirectory artifact's
    assert mode_of(dest / VERSION / "cockroach" / "node.key") == 0o600
    assert mode_of(dest / "lock") == 0o600
    assert mode_of(dest / "tlscert") == 0o600  # an old key file is protected, not deleted
    assert "  kept (not tbot-py's; --clean removes them): tlscert" in out
    assert "  left alone (not tbot-py's; --clean removes them): notes, passwd, ssh_config" in out
    assert (dest / "notes").is_dir()


def test_clean_removes_only_what_is_not_ours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest"
    make_layout(dest)
    passwd = Path("/etc/passwd").read_bytes()
    code, out, err = run(["--destination-dir", str(dest), "--clean"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in dest.iterdir()) == [
        VERSION, "..data", "..lock", "cockroach", "key", "lock"
    ]  # fmt: skip
    assert (dest / "key").read_bytes() == b"key"
    assert Path("/etc/passwd").read_bytes() == passwd  # the link went, not its target
    removed = [line for line in out.splitlines() if line.startswith("  removed: ")]
    assert removed == [
        f"  removed: {dest / name}" for name in ("notes", "passwd", "ssh_config", "tlscert")
    ]


def test_a_symlink_in_the_path_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = run(["--destination-dir", str(tmp_path / "link" / "dest")], capsys)
    assert one_error(code, err) == (
        f"ERROR: {tmp_path / 'link'} is a symlink; tbot-py init does not follow symlinks in "
        f"the destination path (use the real path {tmp_path / 'real' / 'dest'}, or pass "
        "--symlinks insecure)"
    )
    assert not (tmp_path / "real" / "dest").exists()


def test_symlinks_insecure_follows_the_path_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    argv = ["--destination-dir", str(tmp_path / "link" / "dest"), "--symlinks", "insecure"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert f"warning: {tmp_path / 'link' / 'dest'} leads through a symlink" in err
    assert out.startswith(f"Prepared {tmp_path / 'real' / 'dest'} for tbot-py:")
    assert (tmp_path / "real" / "dest").is_dir()


def test_a_file_in_the_way_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_bytes(b"")
    for dest in (tmp_path / "file", tmp_path / "file" / "dest"):
        code, _, err = run(["--destination-dir", str(dest)], capsys)
        assert one_error(code, err) == f"ERROR: {tmp_path / 'file'} is not a directory"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bot-user", "no-such-user-tbotpy"], "--bot-user: unknown user 'no-such-user-tbotpy'"),
        (["--reader-user", "no-such-user-x"], "--reader-user: unknown user 'no-such-user-x'"),
        (["--owner", f"{ME}:no-such-group-x"], "--owner: unknown group 'no-such-group-x'"),
        (["--acls", "required"], "--acls required needs both --bot-user and --reader-user"),
    ],
)
def test_bad_input_is_one_error_line_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run(["--destination-dir", str(tmp_path / "dest"), *argv], capsys)
    assert one_error(code, err) == f"ERROR: {message}"
    assert not (tmp_path / "dest").exists()


def test_no_directory_given_is_one_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([], capsys)
    assert (
        one_error(code, err) == "ERROR: pass --destination-dir DIR, or -c CONFIG to use its output"
    )


def write_config(path: Path, *destinations: str) -> Path:
    services = "".join(
        f"  - type: identity\n    destination: {destination}\n" for destination in destinations
    )
    path.write_text(f"version: v2\nservices:\n{services}" if services else "version: v2\n")
    return path


def test_config_with_one_directory_output_is_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "out"
    config = write_config(tmp_path / "tbot.yaml", f"{{type: directory, path: {dest}}}")
    code, out, err = run(["-c", str(config)], capsys)
    assert code == 0, err
    assert out.startswith(f"Prepared {dest} for tbot-py:")
    assert dest.is_dir()


def test_config_with_several_outputs_needs_init_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    config = write_config(
        tmp_path / "tbot.yaml",
        f"{{type: directory, path: {one}}}",
        f"{{type: directory, path: {two}}}",
        "{type: memory}",
    )
    code, _, err = run(["-c", str(config)], capsys)
    assert one_error(code, err) == (
        f"ERROR: {config}: the config has 3 outputs; choose one with --init-dir "
        f"(one of: {one}, {two}, memory)"
    )
    code, _, err = run(["-c", str(config), "--init-dir", str(two)], capsys)
    assert code == 0, err
    assert two.is_dir()
    assert not one.exists()
    code, _, err = run(["-c", str(config), "--init-dir", str(tmp_path / "three")], capsys)
    assert "no output of the config writes there" in one_error(code, err)


def test_config_memory_output_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "tbot.yaml", "{type: memory}")
    code, _, err = run(["-c", str(config)], capsys)
    assert one_error(code, err) == (
        f"ERROR: {config}: tbot-py init only supports directory destinations"
    )
    config = write_config(tmp_path / "empty.yaml")
    code, _, err = run(["-c", str(config)], capsys)
    assert one_error(code, err) == (
        f"ERROR: {config}: the config has no outputs; pass --destination-dir"
    )


def test_chown_without_root_is_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() == 0:
        pytest.skip("runs as root; tests/integration/test_init.py covers it as a plain user")
    code, _, err = run(["--destination-dir", str(tmp_path / "d"), "--owner", "root"], capsys)
    assert "changing ownership to root needs root" in one_error(code, err)


# --- ACL mode --------------------------------------------------------------------------------


@pytest.fixture
def acl_tmp(tmp_path: Path) -> Path:
    skip_unless_acls_work(tmp_path)
    return tmp_path


def test_acl_mode_lets_the_bot_write_and_the_reader_read(
    acl_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving the directory to another user needs root")
    dest = acl_tmp / "dest"
    make_layout(dest)
    argv = ["--destination-dir", str(dest), "--bot-user", "nobody", "--reader-user", "daemon"]
    code, out, err = run([*argv, "--owner", "root"], capsys)
    assert code == 0, err
    nobody, daemon = pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("daemon").pw_uid
    for directory in (dest, dest / VERSION):
        assert getfacl(directory) == [
            "user::rwx", f"user:{daemon}:r-x", f"user:{nobody}:rwx",
            "group::---", "mask::rwx", "other::---",
        ]  # fmt: skip
    for file in (dest / "lock", dest / VERSION / "key"):
        assert getfacl(file) == [
            "user::rw-", f"user:{daemon}:r--", f"user:{nobody}:rw-",
            "group::---", "mask::rw-", "other::---",
        ]  # fmt: skip
    assert "  ACL: nobody (bot) may write, daemon may read, group and others have no access" in out
    # Without --owner the bot owns it, so it needs no entry of its own.
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert (dest.stat().st_uid, (dest / VERSION / "key").stat().st_uid) == (nobody, nobody)
    assert (dest / "key").lstat().st_uid == nobody
    assert getfacl(dest) == [
        "user::rwx", f"user:{daemon}:r-x", "group::---", "mask::rwx", "other::---",
    ]  # fmt: skip
    # Plain mode afterwards removes the entries, so the daemon inherits no stale reader.
    code, out, err = run([*argv, "--acls", "off"], capsys)
    assert code == 0, err
    assert getfacl(dest) == ["user::rwx", "group::---", "other::---"]
    assert getfacl(dest / VERSION / "key") == ["user::rw-", "group::---", "other::---"]


def test_reader_owning_the_directory_warns_about_openssh(
    acl_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = acl_tmp / "dest"
    argv = ["--destination-dir", str(dest), "--bot-user", ME, "--reader-user", ME]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert err.splitlines() == [
        f"warning: the reader user {ME} also owns {dest}; "
        "this will break OpenSSH's permission checks"
    ]
    assert getfacl(dest) == ["user::rwx", "group::---", "other::---"]


def test_acls_required_where_they_do_not_work_is_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    install_failing_setfacl(tmp_path / "bin", monkeypatch)
    dest = tmp_path / "dest"
    argv = ["--destination-dir", str(dest), "--bot-user", ME, "--reader-user", "root"]
    code, _, err = run([*argv, "--acls", "required"], capsys)
    assert one_error(code, err) == (
        f"ERROR: {dest}: ACLs are required but do not work here: "
        "the file system does not support ACLs (Operation not supported)"
    )


def test_acls_try_falls_back_to_private_modes_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    install_failing_setfacl(tmp_path / "bin", monkeypatch)
    dest = tmp_path / "dest"
    argv = ["--destination-dir", str(dest), "--bot-user", ME, "--reader-user", "root"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert err.splitlines() == [
        f"warning: ACLs do not work in {dest} (the file system does not support ACLs "
        "(Operation not supported)); using mode 0700/0600 instead, so the reader user "
        "cannot read the credentials"
    ]
    assert "  mode: 0700 directories, 0600 files (no ACL)" in out
    assert mode_of(dest) == 0o700


def test_one_user_only_means_no_acls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["--destination-dir", str(tmp_path / "d"), "--bot-user", ME], capsys)
    assert code == 0, err
    assert "  ACLs: off (they need both --bot-user and --reader-user)" in out
