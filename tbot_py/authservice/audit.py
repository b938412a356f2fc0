"""The audit log: ``DIR/audit.log``, one JSON object per line, never a secret.

Every join, renewal, issuance and CA fetch the server answers, every lock
the server creates (``lock.created``) and every change an admin command
makes is one event::

    {"time": "2025-01-02T03:04:05.678Z", "event": "bot.join", "success": true,
     "code": 200, "actor": {"bot": "ci", "instance": "9f0c..."},
     "remote_addr": "127.0.0.1", "resource": "token/1a2b3c4d", "details": {...}}

A join token appears only as its :func:`token_id` (8 hex characters of its
SHA-256); no key, certificate or request body is ever written. Messages of
denials are the ones the client got, which are written to be safe to show.

The server and the admin commands append to the same file from different
processes. Each line goes out in one ``os.write`` on an ``O_APPEND``
descriptor and stays under :data:`MAX_LINE_BYTES`, so lines never interleave.
There is no fsync: losing the last lines on power loss is acceptable for an
audit trail, interleaving is not. A failure to write is logged at ERROR and
never fails the request or the admin command that caused it.

To record an admin change, call after it succeeded::

    audit.emit(cluster, "admin.role.create", resource=f"role/{name}")
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tbot_py.authservice.errors import AuthServiceError
from tbot_py.client.wire import WireError

if TYPE_CHECKING:
    from tbot_py.authservice.cluster import Cluster
    from tbot_py.authservice.locks import Lock

log = logging.getLogger("tbot_py.authservice")

AUDIT_LOG = "audit.log"
#: Every line is shorter than this (Linux's PIPE_BUF), so one write() is never split.
MAX_LINE_BYTES = 4096
TOKEN_ID_CHARS = 8
#: How often ``auth audit --follow`` looks for new lines.
FOLLOW_POLL_S = 0.5

_MAX_TEXT = 512  # any single string value; a long message is clipped, not dropped
_HARD_CLIP = 64  # six such values, each character escaped to six bytes, still fit a line
_LOCAL_ADMIN = "local"
_REMOTE_ADMIN = "remote"
# Set while the server's admin API runs an admin.py function for a remote admin.
_admin_actor: ContextVar[dict[str, str | int] | None] = ContextVar("admin_actor", default=None)
_READ_CHUNK = 1 << 20


def audit_log_path(data_dir: Path) -> Path:
    """Where the cluster in ``data_dir`` keeps its audit log."""
    return data_dir / AUDIT_LOG


def token_id(token_hash: str) -> str:
    """The safe short name of a join token: the first 8 hex characters of its SHA-256.

    It identifies a token in listings and audit events without helping anyone
    find the token: recovering a 128-bit token from 32 bits of its hash is no
    easier than guessing it.
    """
    return token_hash[:TOKEN_ID_CHARS]


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC with milliseconds: ``2025-01-02T03:04:05.678Z``."""
    t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def bot_actor(bot: str, instance: str) -> dict[str, str]:
    """The actor of an event caused by a bot instance."""
    return {"bot": bot, "instance": instance}


def lock_details(lock: Lock) -> dict[str, str]:
    """What lock events record about a lock: target, message, creator and any expiry."""
    details = {
        "target_kind": lock.target_kind,
        "target": lock.target,
        "message": lock.message,
        "created_by": lock.created_by,
    }
    if lock.expires_at is not None:
        details["expires"] = format_time(lock.expires_at)
    return details


def local_admin_actor() -> dict[str, str | int]:
    """The actor of an admin command run on the data directory: the OS user running it.

    The name comes from the password database for the real uid, not from
    ``$USER`` or ``$LOGNAME``, which the caller can set to anything.
    """
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:  # no passwd entry, e.g. in a container
        user = str(uid)
    return {"admin": _LOCAL_ADMIN, "user": user, "uid": uid}


def remote_admin_actor(user: str) -> dict[str, str | int]:
    """The actor of an admin change made through the server's admin API by ``user`` (cert CN)."""
    return {"admin": _REMOTE_ADMIN, "user": user}


def admin_actor() -> dict[str, str | int]:
    """Who is making the current admin change: the remote admin, or else the local OS user."""
    return _admin_actor.get() or local_admin_actor()


@contextmanager
def acting_as(actor: dict[str, str | int]) -> Iterator[None]:
    """Attribute the admin changes made inside the block (by :func:`emit`) to ``actor``."""
    token = _admin_actor.set(actor)
    try:
        yield
    finally:
        _admin_actor.reset(token)


@dataclass(frozen=True)
class AuditEvent:
    """One audit record; see the module docstring for the JSON form.

    ``code`` is the HTTP status, 0 for admin commands and for locks the server
    creates (``lock.created``, whose actor is the instance that caused it,
    next to the refused ``bot.renew``). ``actor`` is empty when
    the caller was not identified (a refused join, a missing client
    certificate). ``remote_addr`` is absent for local admin commands and
    ``message`` is set for denials only.
    """

    time: datetime
    event: str
    success: bool
    code: int
    actor: Mapping[str, str | int] = field(default_factory=dict)
    remote_addr: str | None = None
    resource: str | None = None
    message: str | None = None
    details: Mapping[str, str | int | bool] = field(default_factory=dict)

    def to_json(self, *, clip_at: int = _MAX_TEXT) -> dict[str, Any]:
        """The JSON object written to the log; optional fields only when set."""
        doc: dict[str, Any] = {
            "time": format_time(self.time),
            "event": self.event,
            "success": self.success,
            "code": self.code,
            "actor": {k: _clip(v, clip_at) for k, v in self.actor.items()},
        }
        optional = {
            "remote_addr": self.remote_addr,
            "resource": self.resource,
            "message": self.message,
        }
        doc.update({k: _clip(v, clip_at) for k, v in optional.items() if v is not None})
        if self.details:
            doc["details"] = {k: _clip(v, clip_at) for k, v in self.details.items()}
        return doc

    def to_line(self) -> bytes:
        """One line of compact JSON, newline included, shorter than MAX_LINE_BYTES."""
        line = _json_line(self.to_json())
        if len(line) >= MAX_LINE_BYTES:
            # Only odd input gets here (escaping can make a character six bytes). Keep
            # the facts, clip every value hard and drop details rather than split a write.
            doc = self.to_json(clip_at=_HARD_CLIP)
            doc.pop("details", None)
            doc["truncated"] = True
            line = _json_line(doc)
        return line


class AuditLog:
    """Appends events to one audit log file; see the module docstring for why it is safe."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, event: AuditEvent) -> None:
        """Write ``event`` as one line; raises OSError when the file cannot be written."""
        line = event.to_line()
        fd = os.open(
            self.path,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                os.fchmod(fd, 0o600)  # e.g. restored from a backup with looser modes
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written != len(line):
            raise OSError(f"short write ({written} of {len(line)} bytes)")

    def record(self, event: AuditEvent) -> bool:
        """Append ``event``; on failure log it at ERROR and return False. Never raises."""
        try:
            self.append(event)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.error(
                "cannot write the audit log %s: %s; %s on %s was not recorded",
                self.path,
                reason,
                event.event,
                event.resource or "-",
            )
            return False
        return True


def emit(
    cluster: Cluster,
    event: str,
    *,
    resource: str,
    details: Mapping[str, str | int | bool] | None = None,
    now: datetime | None = None,
) -> None:
    """Record a successful admin change to ``cluster``, made by :func:`admin_actor`.

    ``event`` is ``admin.<kind>.<operation>`` (``admin.bot.add``) and
    ``resource`` is ``<kind>/<name>`` (``bot/ci``); ``now`` is the time of the
    change when the caller has one. Never raises.
    """
    AuditLog(audit_log_path(cluster.data_dir)).record(
        AuditEvent(
            time=now or datetime.now(UTC),
            event=event,
            success=True,
            code=0,
            actor=admin_actor(),
            resource=resource,
            details=details or {},
        )
    )


#: Call fields copied into ``details``; the rest is actor, resource or the server log only.
_DETAILS = (
    "generation",
    "roles",
    "expires",
    "idempotent_retry",
    "join_method",
    "rejoin",
    "route",
    # The MCP access proxy's calls: whose session, which app, the decision, the SANs asked.
    "user",
    "app",
    "allowed",
    "dns_names",
)
#: Details named by prefix: the identifying claims of an OIDC join (``claim.repository``).
_DETAIL_PREFIXES = ("claim.",)


@contextmanager
def audited_call(
    audit_log: AuditLog,
    event: str,
    *,
    remote: str | None,
) -> Iterator[dict[str, Any]]:
    """Audit one API call and log it at INFO with its outcome; never a token or key.

    The handler fills the yielded dict: ``bot`` and ``instance`` once the
    caller is known, ``resource``, and details (``generation``, ``roles``,
    ``expires``, ``idempotent_retry``, ``route``). A denial is recorded with the status
    and message the client gets (see ``app._error_middleware``).
    """
    fields: dict[str, Any] = {}
    outcome: tuple[int, str | None] | None = None  # stays None when cancelled
    try:
        yield fields
        outcome = (200, None)
    except AuthServiceError as exc:
        outcome = (exc.status, exc.message)
        raise
    except WireError as exc:
        outcome = (400, str(exc))
        raise
    except Exception:
        outcome = (500, "internal server error")
        raise
    finally:
        if outcome is not None:
            code, message = outcome
            _log_call(event, fields, remote, code, message)
            actor: dict[str, str] = {}
            if "bot" in fields and "instance" in fields:
                actor = bot_actor(fields["bot"], fields["instance"])
            # Written on the event loop: one small append without fsync, cheaper
            # than a thread hop.
            audit_log.record(
                AuditEvent(
                    time=datetime.now(UTC),
                    event=event,
                    success=message is None,
                    code=code,
                    actor=actor,
                    remote_addr=remote,
                    resource=fields.get("resource"),
                    message=message,
                    details={
                        k: v
                        for k, v in fields.items()
                        if k in _DETAILS or k.startswith(_DETAIL_PREFIXES)
                    },
                )
            )


def _log_call(
    event: str, fields: Mapping[str, Any], remote: str | None, code: int, message: str | None
) -> None:
    # The server log keeps its familiar one-line form next to the audit event.
    names = ("bot", "instance", "generation", "roles", "expires")
    parts = [f"{k}={fields[k]}" for k in names if k in fields]
    line = " ".join([*parts, f"remote={remote or '-'}"])
    if message is None:
        log.info("%s result=ok %s", event, line)
    elif code < 500:
        log.info("%s result=denied status=%d %s reason=%r", event, code, line, message)
    else:
        log.info("%s result=error %s", event, line)


# -- reading ------------------------------------------------------------------------


class AuditReader:
    """Reads the complete lines appended to an audit log since the last call.

    A last line without its newline yet is kept until it is complete. A file
    that was replaced (new inode) or truncated is read again from its start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        self._line_number = 0

    def read_new(self) -> Iterator[tuple[int, bytes]]:
        """``(line number, line)`` for each new complete line; none when there is no file."""
        try:
            file = self.path.open("rb")
        except FileNotFoundError:
            return
        with file:
            info = os.fstat(file.fileno())
            if info.st_ino != self._inode or info.st_size < self._offset:
                self._inode, self._offset, self._partial = info.st_ino, 0, b""
                self._line_number = 0
            file.seek(self._offset)
            # In chunks: a log of a long-lived server can be far larger than memory wants.
            while chunk := file.read(_READ_CHUNK):
                self._offset += len(chunk)
                *lines, self._partial = (self._partial + chunk).split(b"\n")
                for line in lines:
                    self._line_number += 1
                    yield self._line_number, line

    def read_events(
        self, *, since: datetime | None = None
    ) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """``(line number, event)`` for each new line, None for a line that is not an event.

        With ``since``, events before it (or without a readable time) are left out.
        """
        for number, line in self.read_new():
            doc = parse_event(line)
            if doc is not None and since is not None:
                when = event_time(doc)
                if when is None or when < since:
                    continue
            yield number, doc


def parse_event(line: bytes) -> dict[str, Any] | None:
    """The event a log line holds, or None when it is not a JSON audit event."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
        return None
    return doc


def event_time(doc: Mapping[str, Any]) -> datetime | None:
    """When an event happened, or None when its ``time`` is missing or malformed."""
    value = doc.get("time")
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def format_text(doc: Mapping[str, Any]) -> str:
    """One readable line: time, event, outcome, actor, then ``key=value`` fields.

    Every value that is not a plain word is JSON-quoted, so a hostile name or
    message cannot forge a line or move the cursor on a terminal.
    """
    code = doc.get("code")
    outcome = "ok" if doc.get("success") is True else "denied"
    if isinstance(code, int) and code >= 500:
        outcome = "error"
    parts = [_word(doc.get("time", "-")), _word(doc.get("event", "-")), outcome]
    if isinstance(code, int) and code:
        parts.append(f"code={code}")
    actor = doc.get("actor")
    pairs: list[tuple[str, object]] = list(actor.items()) if isinstance(actor, dict) else []
    pairs += [(k, doc[k]) for k in ("remote_addr", "resource") if k in doc]
    details = doc.get("details")
    if isinstance(details, dict):
        pairs += list(details.items())
    if "message" in doc:
        pairs.append(("message", doc["message"]))
    if doc.get("truncated") is True:
        pairs.append(("truncated", "true"))
    parts += [f"{_word(k)}={_word(v)}" for k, v in pairs]
    return " ".join(parts)


def _word(value: object) -> str:
    text = str(value)
    if text and text.isascii() and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return json.dumps(text)


def _clip(value: object, limit: int) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 1] + "…"
    return value


def _json_line(doc: Mapping[str, Any]) -> bytes:
    # ASCII-only JSON: control characters and odd Unicode are escaped, so one event is one line.
    return (json.dumps(doc, separators=(",", ":"), ensure_ascii=True) + "\n").encode()
