"""``tbot-py init``: prepare a destination for a bot running as another user (tbot.md §3.5).

Run once as root, before the daemon's first start::

    tbot-py init --destination-dir /opt/machine-id --bot-user tbot --reader-user alice

It creates the directory (and missing parents) with mode 0700, walking the path
one component at a time with ``O_NOFOLLOW`` so that a symlink in the path is
refused rather than followed (``--symlinks insecure`` resolves it first).
Ownership goes to ``--owner`` (default: the bot user and its primary group,
else the current user). With both ``--bot-user`` and ``--reader-user`` and
``--acls try|required`` it sets tbot's legacy init ACL (see
``set_legacy_init_acl``), after testing that ACLs work there; otherwise, mode
0700 for directories and 0600 for files. ``--clean`` deletes whatever the
directory layout (``lock``, ``..data``, version directories and their links)
does not account for (see ``tbot_py.destinations.layout``).

Deviations from tbot: the reader's ACL entry is read-only (tbot: read-write);
the bot gets ``rwx`` on directories (it creates a version directory per
write); artifacts are not pre-created as empty files (the daemon writes whole
versions); and the default owner is the bot user whenever ``--bot-user`` is
given, so a fallback to plain modes still leaves a directory the bot can write.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import click

from tbot_py.destinations.acl import (
    acl_support_problem,
    apply_reader_acls,
    fd_path,
    readers_from_acl,
    set_legacy_init_acl,
)
from tbot_py.destinations.fs import DIR_MODE, FILE_MODE
from tbot_py.destinations.layout import (
    LOCK_NAME,
    is_layout_entry,
    is_version_name,
    link_target,
    version_files,
)
from tbot_py.errors import AclError, ConfigError, DestinationError

if TYPE_CHECKING:  # imported lazily at run time: the schema pulls in pydantic
    from tbot_py.config.schema import DirectoryDestination as DirectoryDestinationConfig

AclMode = Literal["off", "try", "required"]
_ACL_MODES: dict[str, AclMode] = {"off": "off", "try": "try", "required": "required"}
SymlinksMode = Literal["secure", "try-secure", "insecure"]

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Intermediate components need only search permission, not read.
_WALK_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@click.command("init")
@click.option(
    "--destination-dir",
    help="The directory to prepare (default: the directory output of -c CONFIG).",
)
@click.option(
    "-c",
    "--config",
    "config_path",
    envvar="TBOT_CONFIG_PATH",
    type=click.Path(dir_okay=False),
    help="Config file whose directory output to prepare (env TBOT_CONFIG_PATH).",
)
@click.option("--init-dir", help="With -c: which output directory, when there are several.")
@click.option("--bot-user", help="The user the daemon runs as; it may write the directory.")
@click.option("--reader-user", help="A user that may read the credentials (via an ACL).")
@click.option("--owner", help="USER[:GROUP] to own it (default: the bot user, else you).")
@click.option("--clean", is_flag=True, help="Delete entries that tbot-py did not write.")
@click.option(
    "--acls",
    type=click.Choice(["off", "try", "required"]),
    help="Grant access with ACLs (default try; needs --bot-user and --reader-user).",
)
@click.option(
    "--symlinks",
    type=click.Choice(["secure", "try-secure", "insecure"]),
    help="insecure: follow symlinks in the path (default: refuse them).",
)
def init(
    *,
    destination_dir: str | None,
    config_path: str | None,
    init_dir: str | None,
    bot_user: str | None,
    reader_user: str | None,
    owner: str | None,
    clean: bool,
    acls: AclMode | None,
    symlinks: SymlinksMode | None,
) -> None:
    """Prepare a destination directory for a bot that runs as another user."""
    config_acls: str | None = None
    config_symlinks: str | None = None
    if destination_dir is None:
        if config_path is None:
            raise ConfigError("pass --destination-dir DIR, or -c CONFIG to use its output")
        destination = _pick_directory(config_path, init_dir)
        destination_dir = destination.absolute_path()
        # Directory options the config may carry; the flags win.
        config_acls = getattr(destination, "acls", None)
        config_symlinks = getattr(destination, "symlinks", None)
    plan = _plan(
        path=destination_dir,
        bot_user=bot_user,
        reader_user=reader_user,
        owner=owner,
        acls=acls or _ACL_MODES.get(config_acls or "") or "try",
        follow_symlinks=(symlinks or config_symlinks) == "insecure",
        clean=clean,
    )
    with contextlib.ExitStack() as stack:
        for line in prepare_destination(plan, stack):
            click.echo(line)


def _pick_directory(config_path: str, init_dir: str | None) -> DirectoryDestinationConfig:
    from tbot_py.config.loader import load_config_file
    from tbot_py.config.schema import DirectoryDestination

    config = load_config_file(config_path)
    outputs = [s.destination for s in config.services]
    if not outputs:
        raise ConfigError("the config has no outputs; pass --destination-dir", source=config_path)
    described = ", ".join(
        d.absolute_path() if isinstance(d, DirectoryDestination) else d.type for d in outputs
    )
    if init_dir is not None:
        wanted = os.path.normpath(os.path.abspath(init_dir))
        outputs = [
            d
            for d in outputs
            if isinstance(d, DirectoryDestination) and d.absolute_path() == wanted
        ]
        if not outputs:
            raise ConfigError(
                f"--init-dir {init_dir}: no output of the config writes there "
                f"(outputs: {described})",
                source=config_path,
            )
    elif len(outputs) > 1:
        raise ConfigError(
            f"the config has {len(outputs)} outputs; choose one with --init-dir "
            f"(one of: {described})",
            source=config_path,
        )
    destination = outputs[0]
    if not isinstance(destination, DirectoryDestination):
        raise ConfigError("tbot-py init only supports directory destinations", source=config_path)
    return destination


# --- what to do -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """A resolved user (or owner) with the ids that go to chown and the ACL."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class InitPlan:
    """Everything ``tbot-py init`` will do, resolved and checked before touching the disk."""

    path: str
    owner: Account
    bot: Account | None
    reader: Account | None
    acls: AclMode
    follow_symlinks: bool
    clean: bool

    @property
    def wants_acls(self) -> bool:
        return self.acls != "off" and self.bot is not None and self.reader is not None


def _plan(
    *,
    path: str,
    bot_user: str | None,
    reader_user: str | None,
    owner: str | None,
    acls: AclMode,
    follow_symlinks: bool,
    clean: bool,
) -> InitPlan:
    bot = _user("--bot-user", bot_user) if bot_user else None
    reader = _user("--reader-user", reader_user) if reader_user else None
    if acls == "required" and (bot is None or reader is None):
        raise ConfigError("--acls required needs both --bot-user and --reader-user")
    return InitPlan(
        path=os.path.normpath(os.path.abspath(path)),
        owner=_owner(owner) if owner is not None else bot or _current_user(),
        bot=bot,
        reader=reader,
        acls=acls,
        follow_symlinks=follow_symlinks,
        clean=clean,
    )


def _user(flag: str, value: str) -> Account:
    """A user by name, or by uid if it has a passwd entry (its primary group is needed)."""
    entry: pwd.struct_passwd | None = None
    with contextlib.suppress(KeyError, ValueError):
        entry = pwd.getpwnam(value)
    if entry is None and re.fullmatch("[0-9]+", value):
        with contextlib.suppress(KeyError, OverflowError):
            entry = pwd.getpwuid(int(value))
    if entry is None:
        raise ConfigError(f"{flag}: unknown user {value!r}")
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _owner(value: str) -> Account:
    user_part, _, group_part = value.partition(":")
    user = _user("--owner", user_part)
    if not group_part:
        return user
    try:
        gid = grp.getgrnam(group_part).gr_gid
    except (KeyError, ValueError):
        if not re.fullmatch("[0-9]+", group_part):
            raise ConfigError(f"--owner: unknown group {group_part!r}") from None
        gid = int(group_part)
    return Account(f"{user.name}:{group_part}", user.uid, gid)


def _current_user() -> Account:
    uid = os.geteuid()
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Account(str(uid), uid, os.getegid())
    return Account(entry.pw_name, uid, entry.pw_gid)


# --- doing it ---------------------------------------------------------------------------------


@dataclass
class _Contents:
    """The destination's entries, sorted by what the directory layout says they are."""

    dirs: list[str] = field(default_factory=list)  # version directories
    files: list[str] = field(default_factory=list)  # lock, and files of an older layout
    old_files: list[str] = field(default_factory=list)  # those files of an older layout
    links: list[str] = field(default_factory=list)  # ..data and <name> -> ..data/<name>
    versions: dict[str, tuple[int, list[str]]] = field(default_factory=dict)  # fd, files
    strays: list[str] = field(default_factory=list)  # not ours


def prepare_destination(plan: InitPlan, stack: contextlib.ExitStack) -> list[str]:
    """Create, own and protect the directory as planned; the summary lines to print.

    Descriptors opened on the way are closed by ``stack``.
    """
    path = plan.path
    if plan.follow_symlinks and os.path.realpath(path) != path:
        path = os.path.realpath(path)
        _warn(f"{plan.path} leads through a symlink; preparing {path}")
    dir_fd, created = _open_destination(path, stack)
    summary = [f"Prepared {path} for tbot-py:"]
    if created:
        summary.append("  created: " + ", ".join(created_path for created_path, _ in created))
    use_acls = _acls_usable(plan, dir_fd, path, summary)
    contents = _survey(dir_fd, stack, clean=plan.clean)
    if plan.clean:
        for name in contents.strays:
            _remove(dir_fd, name, path)
            summary.append(f"  removed: {os.path.join(path, name)}")
    for names, what in ((contents.old_files, "kept"), (contents.strays, "left alone")):
        if names:
            summary.append(f"  {what} (not tbot-py's; --clean removes them): {', '.join(names)}")
    levels = _levels(dir_fd, contents, [fd for made, fd in created if made != path])
    for level_fd, names in [*((fd, [*d, *f]) for fd, d, f in levels), (dir_fd, contents.links)]:
        for name in names:
            _chown(level_fd, name, plan.owner)
    summary.append(f"  owner: {plan.owner.name} (uid {plan.owner.uid}, gid {plan.owner.gid})")
    if use_acls and plan.bot is not None and plan.reader is not None:
        for level_fd, dirs, files in levels:
            set_legacy_init_acl(
                level_fd, dirs, files, plan.bot.uid, plan.reader.uid, owner_uid=plan.owner.uid
            )
        summary.append(
            f"  ACL: {plan.bot.name} (bot) may write, {plan.reader.name} may read, "
            "group and others have no access"
        )
    else:
        for level_fd, dirs, files in levels:
            _make_private(level_fd, dirs, files)
        summary.append("  mode: 0700 directories, 0600 files (no ACL)")
    return summary


def _acls_usable(plan: InitPlan, dir_fd: int, path: str, summary: list[str]) -> bool:
    """Whether to set ACLs: asked for, and they work here (else an error or a warning)."""
    if not plan.wants_acls:
        if plan.acls != "off" and (plan.bot or plan.reader):
            summary.append("  ACLs: off (they need both --bot-user and --reader-user)")
        return False
    problem = acl_support_problem(dir_fd, require_owner=False)
    if problem is not None and plan.acls == "required":
        raise AclError(f"ACLs are required but do not work here: {problem}", path=path)
    if problem is not None:
        _warn(
            f"ACLs do not work in {path} ({problem}); using mode 0700/0600 instead, "
            "so the reader user cannot read the credentials"
        )
        return False
    if plan.reader is not None and plan.reader.uid == plan.owner.uid:
        _warn(
            f"the reader user {plan.reader.name} also owns {path}; "
            "this will break OpenSSH's permission checks"
        )
    return True


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _levels(
    dir_fd: int, contents: _Contents, parent_fds: list[int]
) -> list[tuple[int, list[str], list[str]]]:
    """(directory fd, its directories, its files) per level: "." is the directory itself."""
    levels: list[tuple[int, list[str], list[str]]] = [(fd, ["."], []) for fd in parent_fds]
    levels.append((dir_fd, [".", *contents.dirs], contents.files))
    # A version's subdirectories (``cockroach/``) are owned and protected like its files.
    levels += [
        (fd, sorted({name.split("/")[0] for name in files if "/" in name}), files)
        for fd, files in contents.versions.values()
    ]
    return levels


def _open_destination(path: str, stack: contextlib.ExitStack) -> tuple[int, list[tuple[str, int]]]:
    """Open (creating what is missing, 0700) ``path`` without following any symlink.

    Returns the destination's descriptor and the (path, descriptor) of every
    directory created, outermost first.
    """
    parts = [part for part in path.split("/") if part]
    if not parts:
        raise ConfigError("refusing to use / as a destination directory")
    fd = stack.enter_context(_closing(os.open("/", _WALK_DIR)))
    created: list[tuple[str, int]] = []
    current = ""
    for index, part in enumerate(parts):
        current += "/" + part
        try:
            made = _mkdir_missing(fd, part)
            mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise DestinationError(
                    f"{current} is a symlink; tbot-py init does not follow symlinks in the "
                    f"destination path (use the real path {os.path.realpath(path)}, or pass "
                    "--symlinks insecure)"
                )
            if not stat.S_ISDIR(mode):
                raise DestinationError(f"{current} is not a directory")
            last = index == len(parts) - 1
            fd = stack.enter_context(
                _closing(os.open(part, _OPEN_DIR if last or made else _WALK_DIR, dir_fd=fd))
            )
            if made:
                os.fchmod(fd, DIR_MODE)  # the umask may have taken bits away
                created.append((current, fd))
        except PermissionError:
            raise DestinationError(
                f"{current}: permission denied (run tbot-py init as root)"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # swapped for a symlink after the check
                raise DestinationError(f"{current} is a symlink") from None
            raise DestinationError(f"{current}: {exc.strerror or exc}") from None
    return fd, created


def _mkdir_missing(dir_fd: int, name: str) -> bool:
    try:
        os.mkdir(name, DIR_MODE, dir_fd=dir_fd)
    except FileExistsError:
        return False  # already there (or created concurrently): not ours
    return True


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _survey(dir_fd: int, stack: contextlib.ExitStack, *, clean: bool) -> _Contents:
    contents = _Contents()
    for name in sorted(os.listdir(dir_fd)):
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode) and _is_our_link(dir_fd, name):
            contents.links.append(name)
        elif stat.S_ISDIR(mode) and is_version_name(name):
            contents.dirs.append(name)
            fd = stack.enter_context(_closing(os.open(name, _OPEN_DIR, dir_fd=dir_fd)))
            contents.versions[name] = (fd, version_files(fd))
        elif stat.S_ISREG(mode) and (is_layout_entry(name) or not clean):
            # The layout's lock files are ours. A file of an older layout may hold a key:
            # kept (without --clean) and protected.
            contents.files.append(name)
            if not is_layout_entry(name):
                contents.old_files.append(name)
        else:
            contents.strays.append(name)
    return contents


def _is_our_link(dir_fd: int, name: str) -> bool:
    """``..data``, a leftover temp link, or a flat name pointing into ``..data``."""
    if name == LOCK_NAME or is_version_name(name):
        return False
    return is_layout_entry(name) or os.readlink(name, dir_fd=dir_fd) == link_target(name)


def _remove(dir_fd: int, name: str, path: str) -> None:
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)  # does not follow symlinks
        else:
            os.unlink(name, dir_fd=dir_fd)
    except OSError as exc:
        raise DestinationError(
            f"cannot remove it: {exc.strerror or exc}", path=os.path.join(path, name)
        ) from None


def _chown(dir_fd: int, name: str, owner: Account) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if (st.st_uid, st.st_gid) == (owner.uid, owner.gid):
        return
    try:
        os.chown(name, owner.uid, owner.gid, dir_fd=dir_fd, follow_symlinks=False)
    except PermissionError:
        raise DestinationError(
            f"changing ownership to {owner.name} needs root: run tbot-py init as root, "
            "or pass --owner with your own user",
            path=os.path.normpath(os.path.join(fd_path(dir_fd), name)),
        ) from None


def _make_private(dir_fd: int, dirs: list[str], files: list[str]) -> None:
    """Mode 0700/0600, and no ACL entries left behind that the daemon would inherit."""
    for names, mode in ((dirs, DIR_MODE), (files, FILE_MODE)):
        for name in names:
            os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=False)
    if any(_has_readers(dir_fd, name) for name in [*dirs, *files]):
        try:
            apply_reader_acls(
                dir_fd, directories=dirs, files=files, readers=[], include_self="." in dirs
            )
        except AclError as exc:
            _warn(f"cannot remove old ACL entries: {exc}")


def _has_readers(dir_fd: int, name: str) -> bool:
    if name == ".":
        return bool(readers_from_acl(dir_fd))
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return bool(readers_from_acl(fd))
    finally:
        os.close(fd)
