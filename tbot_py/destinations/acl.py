"""POSIX access ACLs on destination directories: who, besides the bot, may read credentials.

Like tbot (tbot.md §3.1), files stay private to their owner and each configured
reader gets a read-only entry: owner ``rw-``, group ``---``, other ``---``, mask
``r--`` and one ``r--`` entry per reader (``rwx``/``r-x`` on directories).

Writing ACLs uses the ``setfacl`` tool (Debian package ``acl``). There is no
maintained Python binding with wheels: pylibacl ships only an sdist that needs
libacl1-dev and a C compiler, which would break ``make demo`` on a fresh
machine. Reading needs no tool: the kernel exposes the access ACL as the
``system.posix_acl_access`` extended attribute, whose small binary format is
parsed here (no subprocess, and it works on an open descriptor).

Paths are pinned: setfacl receives the directory descriptor (``pass_fds``) and
paths of the form ``/proc/self/fd/<dir_fd>/<name>``, so renaming or swapping a
component above the directory cannot redirect it. Names are relative paths
below it, checked to contain no symlink first; ``-P`` makes setfacl skip, not
follow, a final name that is swapped for a symlink after the check. (Swapping
a component below the directory needs write access to it, which only the
owner and the bot have.) Only access
ACLs are used: default ACLs are removed from directories, because inherited
entries would grant access nobody configured.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import secrets
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from tbot_py.errors import AclError

ACCESS_ACL_XATTR = "system.posix_acl_access"
DEFAULT_ACL_XATTR = "system.posix_acl_default"

# The kernel's xattr format (include/uapi/linux/posix_acl_xattr.h): a little-endian
# u32 version, then (u16 tag, u16 perm, u32 id) per entry.
_XATTR_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_TAG_NAMES = {
    USER_OBJ: "user",
    USER: "user",
    GROUP_OBJ: "group",
    GROUP: "group",
    MASK: "mask",
    OTHER: "other",
}
_NO_ID = -1  # the qualifier of entries that name nobody (owner, group, mask, other)

# (tag, qualifier or _NO_ID, permission bits rwx = 4|2|1)
_Entry = tuple[int, int, int]

_NUMERIC_ID = re.compile(r"[0-9]+")
_PERMS = re.compile(r"[r-][w-][x-]")
# (uid_t)-1 means "unchanged" to chown and is never a real id.
_MAX_ID = 2**32 - 2
_SETFACL_TIMEOUT = 60.0
_UNSUPPORTED = "Operation not supported"


@dataclass(frozen=True)
class Reader:
    """A user or group that may read a destination: a name, or a numeric id as a string.

    Numeric ids need not exist on this host (tbot's rule: the reader may live
    in a container); names must resolve when the ACL is built.
    """

    kind: Literal["user", "group"]
    id: str

    def __post_init__(self) -> None:
        if self.kind not in ("user", "group"):
            raise AclError(f"reader kind must be 'user' or 'group', not {self.kind!r}")
        if not self.id or not self.id.isprintable():
            raise AclError(f"invalid {self.kind} name {self.id!r}")

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"

    def numeric_id(self) -> int:
        """The uid or gid: the id itself if numeric, else the name looked up in pwd/grp."""
        if _NUMERIC_ID.fullmatch(self.id):
            value = int(self.id)
            if value > _MAX_ID:
                raise AclError(f"{self.kind} id {self.id} is out of range")
            return value
        try:
            if self.kind == "user":
                return pwd.getpwnam(self.id).pw_uid
            return grp.getgrnam(self.id).gr_gid
        except (KeyError, ValueError):
            raise AclError(f"unknown {self.kind} {self.id!r}") from None

    def entry(self, perms: str) -> str:
        """A setfacl entry such as ``u:1001:r--`` or ``g:1001:r-x``.

        Names are resolved here and passed on as numbers: setfacl would read a
        name like ``010`` or ``0x10`` as a (octal or hex) number.
        """
        if not _PERMS.fullmatch(perms):
            raise AclError(f"invalid ACL permissions {perms!r} (expected e.g. r-x)")
        return f"{self.kind[0]}:{self.numeric_id()}:{perms}"


# --- the ACLs we set --------------------------------------------------------------------------


def _reader_acl(readers: Iterable[Reader], *, is_dir: bool) -> list[_Entry]:
    """tbot's runtime ACL; without readers, the plain 0600/0700 mode (no ACL at all)."""
    owner, read = (0o7, 0o5) if is_dir else (0o6, 0o4)
    entries = [(USER_OBJ, _NO_ID, owner), (GROUP_OBJ, _NO_ID, 0), (OTHER, _NO_ID, 0)]
    named = sorted({(USER if r.kind == "user" else GROUP, r.numeric_id(), read) for r in readers})
    if named:
        entries += [(MASK, _NO_ID, read), *named]
    return entries


def _legacy_acl(owner_uid: int, bot_uid: int, reader_uid: int, *, is_dir: bool) -> list[_Entry]:
    full, read = (0o7, 0o5) if is_dir else (0o6, 0o4)
    named: dict[int, int] = {}
    if reader_uid != owner_uid:
        named[reader_uid] = read
    if bot_uid != owner_uid:
        named[bot_uid] = full  # the bot's rights win if it is also the reader
    entries = [(USER_OBJ, _NO_ID, full), (GROUP_OBJ, _NO_ID, 0), (OTHER, _NO_ID, 0)]
    if named:
        entries += [(MASK, _NO_ID, full), *((USER, uid, p) for uid, p in sorted(named.items()))]
    return entries


def _perm_text(bits: int) -> str:
    return "".join(c if bits & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1)))


def _format_entry(entry: _Entry) -> str:
    """getfacl's long form, which setfacl also accepts: ``user:1001:r--``, ``mask::r-x``."""
    tag, qualifier, perms = entry
    who = "" if qualifier == _NO_ID else str(qualifier)
    return f"{_TAG_NAMES[tag]}:{who}:{_perm_text(perms)}"


def _spec(entries: Iterable[_Entry]) -> str:
    return ",".join(_format_entry(e) for e in entries)


# --- setting ----------------------------------------------------------------------------------


def apply_reader_acls(
    dir_fd: int,
    *,
    directories: Sequence[str],
    files: Sequence[str],
    readers: Sequence[Reader],
    include_self: bool = True,
) -> None:
    """Set exactly tbot's reader ACL on entries of the directory open as ``dir_fd``.

    ``directories`` and ``files`` are paths relative to it, such as
    ``..<version>/key``, with no symlink in them; ``"."`` (added first when
    ``include_self``) is the directory itself. ``--set`` replaces whatever was
    there, so drift is corrected. With no readers the ACL is removed, leaving
    mode 0700/0600. At most two setfacl runs.
    """
    dir_names = ["."] if include_self else []
    dir_names += [name for name in directories if name not in dir_names]
    # Resolve every reader before changing anything: an unknown name must change nothing.
    dir_acl = _reader_acl(readers, is_dir=True)
    file_acl = _reader_acl(readers, is_dir=False)
    _set_acl(dir_fd, dir_names, dir_acl, is_dir=True)
    _set_acl(dir_fd, files, file_acl, is_dir=False)


def set_legacy_init_acl(
    dir_fd: int,
    names_dirs: Sequence[str],
    names_files: Sequence[str],
    bot_user_uid: int,
    reader_uid: int,
    *,
    owner_uid: int | None = None,
) -> None:
    """``tbot-py init``'s ACL (tbot's legacy style): the bot may write, the reader may read.

    Files: owner ``rw-``, ``user:<bot>`` ``rw-`` unless the bot is the owner,
    ``user:<reader>`` ``r--`` unless the reader is the owner, mask ``rw-``,
    group and other nothing. Directories: the same with ``rwx`` for owner, bot
    and mask, and ``r-x`` for the reader. Deviations from tbot, which gives
    both users ``rw-``/``r-x``: the reader is read-only (enough to use the
    credentials, and it cannot corrupt them), and the bot may write
    directories (every write creates a new version directory). The owner is
    that of ``dir_fd`` unless ``owner_uid`` says otherwise.
    """
    owner = os.fstat(dir_fd).st_uid if owner_uid is None else owner_uid
    for names, is_dir in ((names_dirs, True), (names_files, False)):
        acl = _legacy_acl(owner, bot_user_uid, reader_uid, is_dir=is_dir)
        _set_acl(dir_fd, names, acl, is_dir=is_dir)


def _set_acl(dir_fd: int, names: Sequence[str], entries: list[_Entry], *, is_dir: bool) -> None:
    if not names:
        return
    _check_names(dir_fd, names, is_dir=is_dir)
    # -k drops default ACLs from directories; -P skips a name swapped for a symlink.
    _run_setfacl(dir_fd, names, ["-P", *(["-k"] if is_dir else []), f"--set={_spec(entries)}"])


def _check_names(dir_fd: int, names: Iterable[str], *, is_dir: bool) -> None:
    """Each name is a relative path below ``dir_fd`` with no symlink and no ``..`` in it."""
    where = fd_path(dir_fd)
    for name in names:
        if name == "." and is_dir:
            continue
        parts = name.split("/")
        if any(part in ("", ".", "..") or "\0" in part for part in parts):
            raise AclError(
                f"invalid name {name!r}: expected a path below the directory", path=where
            )
        for depth in range(1, len(parts) + 1):
            _check_entry(
                dir_fd, "/".join(parts[:depth]), where, is_dir if depth == len(parts) else True
            )


def _check_entry(dir_fd: int, name: str, where: str, is_dir: bool) -> None:
    path = os.path.join(where, name)
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError as exc:
        raise AclError(f"cannot set its ACL: {exc.strerror or exc}", path=path) from None
    if stat.S_ISLNK(mode):
        raise AclError("is a symlink; ACLs are set on real files only", path=path)
    if is_dir and not stat.S_ISDIR(mode):
        raise AclError("is not a directory", path=path)
    if not is_dir and not stat.S_ISREG(mode):
        raise AclError("is not a regular file", path=path)


def _run_setfacl(dir_fd: int, names: Sequence[str], options: list[str]) -> None:
    tool = shutil.which("setfacl")
    if tool is None:
        raise AclError("setfacl is not installed (install the acl package)")
    base = f"/proc/self/fd/{dir_fd}/"
    # LC_ALL=C: the reason is matched below ("Operation not supported").
    env = {**os.environ, "LC_ALL": "C"}
    try:
        done = subprocess.run(
            [tool, *options, *(base + name for name in names)],
            pass_fds=(dir_fd,),
            capture_output=True,
            text=True,
            errors="replace",
            env=env,
            timeout=_SETFACL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AclError(f"setfacl did not finish within {_SETFACL_TIMEOUT:.0f}s") from None
    except OSError as exc:
        raise AclError(f"cannot run setfacl: {exc.strerror or exc}") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        reason = lines[0] if lines else f"setfacl failed with exit status {done.returncode}"
        # Show the real directory instead of the pinned /proc path.
        where = fd_path(dir_fd)
        reason = reason.replace(base + ".:", where + ":").replace(base, where.rstrip("/") + "/")
        raise AclError(reason)


def fd_path(fd: int) -> str:
    """The path an open descriptor refers to, for messages only (never to open it again)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


# --- reading ----------------------------------------------------------------------------------


def _read_xattr(fd: int, name: str) -> bytes | None:
    """The attribute's value, or None when it is not set or the file system has no ACLs."""
    try:
        try:
            return os.getxattr(fd, name)
        except OSError as exc:
            if exc.errno != errno.EBADF:  # an O_PATH descriptor: go through /proc
                raise
            return os.getxattr(f"/proc/self/fd/{fd}", name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise AclError(f"cannot read its ACL: {exc.strerror or exc}", path=fd_path(fd)) from None


def _parse_acl(data: bytes, *, where: str) -> list[_Entry]:
    if len(data) < _HEADER.size or (len(data) - _HEADER.size) % _ENTRY.size:
        raise AclError(f"malformed ACL attribute ({len(data)} bytes)", path=where)
    (version,) = _HEADER.unpack_from(data)
    if version != _XATTR_VERSION:
        raise AclError(f"unknown ACL attribute version {version}", path=where)
    entries = []
    for tag, perms, qualifier in _ENTRY.iter_unpack(data[_HEADER.size :]):
        if tag not in _TAG_NAMES:
            raise AclError(f"unknown ACL entry tag {tag:#x}", path=where)
        entries.append((tag, qualifier if tag in (USER, GROUP) else _NO_ID, perms & 0o7))
    return entries


def _current_acl(fd: int) -> list[_Entry]:
    """The access ACL; without one, the three entries the mode bits stand for."""
    data = _read_xattr(fd, ACCESS_ACL_XATTR)
    if data is not None:
        return _parse_acl(data, where=fd_path(fd))
    mode = os.fstat(fd).st_mode
    return [
        (USER_OBJ, _NO_ID, mode >> 6 & 7),
        (GROUP_OBJ, _NO_ID, mode >> 3 & 7),
        (OTHER, _NO_ID, mode & 7),
    ]


def readers_from_acl(fd: int) -> list[Reader]:
    """The named users and groups in the access ACL of the open file or directory.

    As numeric-id readers, users first; [] when it has no ACL or the file
    system has none. The daemon uses this to keep the readers that
    ``tbot-py init --reader-user`` granted (it should drop its own uid, which
    init lists when the bot is not the owner).
    """
    data = _read_xattr(fd, ACCESS_ACL_XATTR)
    if data is None:
        return []
    return [
        Reader("user" if tag == USER else "group", str(qualifier))
        for tag, qualifier, _ in _parse_acl(data, where=fd_path(fd))
        if tag in (USER, GROUP)
    ]


def acl_drift(fd: int, readers: Sequence[Reader], *, is_dir: bool) -> str | None:
    """None if the file's ACL is exactly what :func:`apply_reader_acls` sets, else what differs.

    For a warning like ``ACL of X drifted: has user:4243:rw-; lacks user:4242:r--``.
    """
    expected = set(_reader_acl(readers, is_dir=is_dir))
    actual = set(_current_acl(fd))
    problems = []
    if extra := sorted(actual - expected):
        problems.append("has " + ", ".join(_format_entry(e) for e in extra))
    if missing := sorted(expected - actual):
        problems.append("lacks " + ", ".join(_format_entry(e) for e in missing))
    if is_dir and _read_xattr(fd, DEFAULT_ACL_XATTR) is not None:
        problems.append("has a default ACL")
    return "; ".join(problems) or None


# --- support ----------------------------------------------------------------------------------


def acl_support_problem(dir_fd: int, *, require_owner: bool = True) -> str | None:
    """None when ACLs work in the directory open as ``dir_fd``, else a short reason.

    Sets an ACL on a new, uniquely named file in the directory, reads it back
    and deletes the file. With ``require_owner`` (the daemon's case, as in
    tbot) the directory must also be ours; ``tbot-py init`` runs as root and
    passes False.
    """
    if shutil.which("setfacl") is None:
        return "setfacl is not installed"
    me = os.geteuid()
    owner = os.fstat(dir_fd).st_uid
    if require_owner and owner != me:
        return f"the directory is owned by uid {owner}, not by us (uid {me})"
    name = f".tbot-acl-test-{secrets.token_hex(8)}"
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.close(os.open(name, flags, 0o600, dir_fd=dir_fd))
    except OSError as exc:
        return f"cannot create a test file: {exc.strerror or exc}"
    try:
        return _acl_probe_problem(dir_fd, name, (USER, me, 0o4))
    finally:
        # Best effort: the reason for failing, if any, matters more.
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)


def _acl_probe_problem(dir_fd: int, name: str, probe: _Entry) -> str | None:
    """Give ``name`` an ACL with the ``probe`` entry and check that it reads back."""
    acl = [*_reader_acl((), is_dir=False), (MASK, _NO_ID, probe[2]), probe]
    try:
        _set_acl(dir_fd, [name], acl, is_dir=False)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            read_back = _current_acl(fd)
        finally:
            os.close(fd)
    except AclError as exc:
        if _UNSUPPORTED in exc.message:
            return f"the file system does not support ACLs ({_UNSUPPORTED})"
        return exc.message
    except OSError as exc:
        return f"cannot read the test file back: {exc.strerror or exc}"
    return None if probe in read_back else "the file system ignored the ACL"
