"""tbot's artifact names, written out independently of tbot_py (tbot.md §2.2, §4.1)."""

from __future__ import annotations

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
