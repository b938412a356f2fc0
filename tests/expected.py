"""tbot's artifact names, written out independently of tbot_py (tbot.md §2.2, §4.1)."""

from __future__ import annotations

from pathlib import Path

#: What every identity output holds, whatever its destination and ssh_config setting.
IDENTITY_FILES = frozenset(
    {
        "identity",
        "key",
        "key.pub",
        "key-cert.pub",
        "tlscert",
        "teleport-host-ca.crt",
        "teleport-user-ca.crt",
        "teleport-database-ca.crt",
    }
)
#: Added with ssh_config: on (ssh_config only for directories).
SSH_FILES = frozenset({"known_hosts", "ssh_config"})
#: The bot's own storage (tbot's BotKinds), besides the lock file.
BOT_STORAGE_FILES = frozenset(
    {"key", "key.pub", "key-cert.pub", "tlscert", "tlscacerts", "sshcacerts", "tokenhash"}
)


def artifact_names(directory: Path) -> set[str]:
    """The artifact names in a destination directory: the flat names, not the layout's own
    entries (``..data``, version directories, ``lock``; see tbot_py.destinations.layout)."""
    return {p.name for p in directory.iterdir() if not p.name.startswith(".") and p.name != "lock"}


def artifacts(directory: Path) -> dict[str, bytes]:
    """Every artifact's bytes, read through its flat name as a client would."""
    return {name: (directory / name).read_bytes() for name in sorted(artifact_names(directory))}
