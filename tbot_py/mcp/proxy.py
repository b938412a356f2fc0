"""The MCP access proxy: mTLS in from ``tbot-py mcp connect``, MCP servers out, RBAC between.

Who may do what is decided by the auth service, which the proxy asks as its own bot
(mTLS with the identity file in its config, re-read whenever the file changes):

- at start, and again before 2/3 of its life or when the identity file changes, it
  gets its TLS server certificate (host CA) and the user CA that client certificates
  must chain to;
- for each connection it reads the tunnel hello (:mod:`.tunnel`). A list hello is
  answered with the apps the client may reach and each app's tool patterns. A session
  hello asks the auth service for the client's roles and the app (a JWT too when the
  app's headers use one), starts or connects to the upstream MCP server
  (:mod:`.upstream`) with the headers rewritten, and then pumps MCP messages both ways.

Every client request and notification is checked (:mod:`.authz`) and audited
(``mcp.request``); a denied ``tools/call`` is answered by the proxy and never reaches
the upstream; ``tools/list`` answers are filtered. A session ends when either side
closes, when the upstream exits, at ``expires`` (the client certificate's NotAfter or
the JWT's expiry), or when the auth service, asked again every ``session_recheck``,
refuses it (a lock, say); it is audited as ``mcp.session.start``/``mcp.session.end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from tbot_py.authservice.audit import AuditEvent, AuditLog, format_time
from tbot_py.authservice.rbac import match_labels
from tbot_py.authservice.roles import Role, role_from_data
from tbot_py.authservice.server import format_host_port
from tbot_py.client import wire
from tbot_py.errors import (
    AccessDenied,
    BadParameter,
    ClientError,
    Error,
    IdentityError,
    NotFound,
    TrustError,
)
from tbot_py.identity.tlsid import TLSIdentity
from tbot_py.mcp import authz, tunnel
from tbot_py.mcp.proxyauth import (
    IdentityAuth,
    ProxyAuth,
    ServerCert,
    fetch_server_cert,
    file_version,
    load_server_cert,
    server_context,
    server_names,
)
from tbot_py.mcp.proxyconfig import ProxyConfig, rewrite_headers
from tbot_py.mcp.upstream import Upstream, UpstreamError, open_upstream

log = logging.getLogger("tbot_py.mcp.proxy")

#: How often the proxy looks at its identity file to renew its server certificate.
IDENTITY_POLL_S = 5.0
#: How long to wait before trying again when the server certificate cannot be renewed.
RENEW_RETRY_S = 10.0
#: How long stopping waits for sessions to close their upstreams.
STOP_TIMEOUT_S = 10.0
_PARSE_ERROR = -32700
_INVALID_REQUEST = -32600


class OpenUpstream(Protocol):
    """How the proxy gets an upstream for an app (:func:`.upstream.open_upstream`)."""

    def __call__(
        self, app: wire.MCPApp, headers: Mapping[str, str], *, name_for_logs: str
    ) -> Upstream: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- pure helpers ------------------------------------------------------------------------


def parse_roles(docs: Sequence[Mapping[str, Any]]) -> list[Role]:
    """The roles the auth service sent; Error if one cannot be read."""
    try:
        return [role_from_data(dict(doc)) for doc in docs]
    except Error:
        raise Error("the auth service sent a role the access proxy cannot read") from None


def tool_patterns(roles: Sequence[Role], labels: Mapping[str, str]) -> dict[str, list[str]]:
    """The ``mcp.tools`` patterns that apply on an app: allowed by roles that grant it, denied."""
    allow = [
        pattern
        for role in roles
        if match_labels(role.spec.allow.app_labels, labels)
        for pattern in role.spec.allow.mcp.tools
    ]
    deny = [pattern for role in roles for pattern in role.spec.deny.mcp.tools]
    return {"allow": list(dict.fromkeys(allow)), "deny": list(dict.fromkeys(deny))}


def _id_key(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _rpc_error(code: int, message: str) -> authz.Message:
    return {
        "jsonrpc": authz.JSONRPC_VERSION,
        "id": None,
        "error": {"code": code, "message": message},
    }


def _client_message(exc: Error) -> str:
    """What a client is told when the auth service refused it or could not be asked."""
    if isinstance(exc, (IdentityError, TrustError)):  # the proxy's own trouble: no details
        return "the access proxy cannot use its identity with the auth service; see its log"
    if isinstance(exc, ClientError):
        return exc.message  # the auth service's one line, or why it could not be reached
    return str(exc)


def _cert_actor(cert_pem: bytes) -> dict[str, str | int]:
    """Who the (TLS-verified) client certificate names, for audit lines of refused hellos."""
    try:
        identity = TLSIdentity.from_subject(x509.load_pem_x509_certificate(cert_pem).subject)
    except (ValueError, TypeError):
        return {}
    return {"user": identity.username, "bot": identity.bot_name}


async def _expire(delay: float) -> str:
    await asyncio.sleep(delay)
    return "the session expired"


class _Refused(Exception):
    """A session hello is refused; the message is the one line the client gets."""

    def __init__(self, message: str, actor: Mapping[str, str | int] | None = None) -> None:
        super().__init__(message)
        self.actor = dict(actor or {})


# --- the proxy ---------------------------------------------------------------------------


@dataclass
class _Session:
    """One open MCP session: who, which app, what the roles allow, where to write, the audit."""

    actor: dict[str, str | int]
    app: wire.MCPApp
    policy: authz.ToolPolicy
    expires: datetime
    writer: asyncio.StreamWriter
    audit: Callable[[str, bool, str | None, Mapping[str, str]], None]
    #: What the auth service was asked; asked again (without a JWT) while the session lasts.
    request: wire.MCPSessionRequest
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tools_list_ids: set[str] = field(default_factory=set)

    async def send(self, value: Mapping[str, Any] | list[Any]) -> None:
        """Write one line to the client; both directions write, one at a time."""
        async with self.write_lock:
            self.writer.write(tunnel.encode_line(value))
            await self.writer.drain()

    async def from_client(self, reader: asyncio.StreamReader, upstream: Upstream) -> str:
        """Check, audit and forward the client's messages; answer denied requests here."""
        while True:
            line = await tunnel.read_line(reader)
            if line is None:
                return "the client closed the session"
            try:
                payload = tunnel.decode_line(line)
                messages = authz.iter_requests(payload)
            except tunnel.TunnelError as exc:
                await self.send(_rpc_error(_PARSE_ERROR, str(exc)))
                continue
            except ValueError as exc:
                await self.send(_rpc_error(_INVALID_REQUEST, str(exc)))
                continue
            forward: list[authz.Message] = []
            for message in messages:
                decision = authz.check_request(message, self.policy)
                if "method" in message:
                    reason = None if decision.allowed else decision.reason
                    fields = authz.audit_fields(message, decision)
                    self.audit("mcp.request", decision.allowed, reason, fields)
                if not decision.allowed:
                    if "id" in message:
                        await self.send(authz.denial_response(message, decision))
                    continue
                if message.get("method") == authz.METHOD_TOOLS_LIST and "id" in message:
                    self.tools_list_ids.add(_id_key(message["id"]))
                forward.append(message)
            if forward:
                await upstream.send(forward if isinstance(payload, list) else forward[0])

    async def from_upstream(self, upstream: Upstream) -> str:
        """Pass the upstream's messages to the client, ``tools/list`` answers filtered."""
        while True:
            payload = await upstream.receive()
            if payload is None:
                return "the MCP server ended"
            if isinstance(payload, list):
                await self.send([self._filter(m) if isinstance(m, dict) else m for m in payload])
            else:
                await self.send(self._filter(payload))

    def _filter(self, message: authz.Message) -> authz.Message:
        is_response = "method" not in message and ("result" in message or "error" in message)
        key = _id_key(message.get("id"))
        if not is_response or key not in self.tools_list_ids:
            return message
        self.tools_list_ids.discard(key)
        filtered, removed = authz.filter_tools_list(message, self.policy)
        if removed:
            log.debug("hid %d tools of app %s", len(removed), self.app.name)
        return filtered


class MCPProxy:
    """The access proxy's listener and sessions; ``start`` then ``stop``."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        auth: ProxyAuth,
        open_upstream: OpenUpstream = open_upstream,
        audit: AuditLog | None = None,
        clock: Callable[[], datetime] = utc_now,
        hello_timeout: float = tunnel.HELLO_TIMEOUT_S,
    ) -> None:
        self.config = config
        self._auth = auth
        self._open_upstream = open_upstream
        self._audit = audit or AuditLog(Path(config.audit_log))
        self._clock = clock
        self._hello_timeout = hello_timeout
        self._config_apps = {app.name: app.to_mcp_app() for app in config.apps}
        self._connections: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._renewal: asyncio.Task[None] | None = None
        self.addr = ""

    async def start(self) -> str:
        """Get the server certificate, listen, and return the bound ``host:port``."""
        names = server_names(self.config.listen_host, self.config.public_hosts)
        identity_version = file_version(Path(self.config.identity))
        cert = await fetch_server_cert(self._auth, names)
        ctx = server_context(cert)
        try:
            self._server = await asyncio.start_server(
                self._accept,
                self.config.listen_host,
                self.config.listen_port,
                ssl=ctx,
                limit=tunnel.stream_limit(),
                ssl_handshake_timeout=self._hello_timeout,
            )
        except OSError as exc:
            raise Error(f"cannot listen on {self.config.listen}: {exc.strerror or exc}") from None
        host, port = self._server.sockets[0].getsockname()[:2]
        self.addr = format_host_port(str(host), int(port))
        self._renewal = asyncio.create_task(
            self._keep_server_cert(ctx, cert, names, identity_version)
        )
        log.info("MCP access proxy listening on %s", self.addr)
        return self.addr

    async def stop(self) -> None:
        """Stop listening, end every session (stopping its upstream) and the renewals."""
        if self._server is not None:
            self._server.close()
        if self._renewal is not None:
            self._renewal.cancel()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        if self._renewal is not None:
            await asyncio.gather(self._renewal, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _keep_server_cert(
        self,
        ctx: ssl.SSLContext,
        cert: ServerCert,
        names: Sequence[str],
        identity_version: tuple[int, int, int] | None,
    ) -> None:
        path = Path(self.config.identity)
        while True:
            until_due = (cert.renew_at - self._clock()).total_seconds()
            await asyncio.sleep(max(0.0, min(IDENTITY_POLL_S, until_due)))
            version = file_version(path)
            if version == identity_version and self._clock() < cert.renew_at:
                continue
            try:
                cert = await fetch_server_cert(self._auth, names)
            except Error as exc:
                log.warning("cannot renew the proxy's TLS certificate: %s", exc)
                await asyncio.sleep(RENEW_RETRY_S)
                continue
            load_server_cert(ctx, cert)
            identity_version = version
            log.info("renewed the proxy's TLS certificate (valid until %s)", cert.not_after)

    # -- connections --

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Only stop() cancels: end this task normally, or asyncio logs the cancellation.
            log.debug("connection closed: the proxy is stopping")
        except (ConnectionError, ssl.SSLError) as exc:
            log.debug("connection ended: %s", exc)
        except Exception:
            log.exception("MCP session failed")
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        peer = writer.get_extra_info("peername")
        remote = str(peer[0]) if peer else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:  # CERT_REQUIRED makes this impossible; fail closed anyway
            return
        if ssl_object.selected_alpn_protocol() != tunnel.ALPN:
            await self._answer(writer, tunnel.error_answer(f"use the ALPN protocol {tunnel.ALPN}"))
            return
        cert_pem = ssl.DER_cert_to_PEM_cert(der).encode()
        try:
            async with asyncio.timeout(self._hello_timeout):
                line = await tunnel.read_line(reader, tunnel.MAX_HELLO_BYTES)
            if line is None:
                return
            hello = tunnel.Hello.from_json(tunnel.decode_line(line))
        except TimeoutError:
            message = f"no hello within {self._hello_timeout:g} s"
            await self._answer(writer, tunnel.error_answer(message))
            return
        except tunnel.TunnelError as exc:
            await self._answer(writer, tunnel.error_answer(str(exc)))
            return
        if hello.list:
            await self._answer(writer, await self._list_answer(cert_pem))
        else:
            await self._session(reader, writer, cert_pem, hello.app, remote)

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, answer: Mapping[str, Any]) -> None:
        writer.write(tunnel.encode_line(answer))
        await writer.drain()

    async def _list_answer(self, cert_pem: bytes) -> dict[str, Any]:
        request = wire.MCPAppsRequest(
            client_cert=cert_pem, config_apps=tuple(self._config_apps.values())
        )
        try:
            answer = await self._auth.mcp_apps(request)
            roles = parse_roles(answer.roles)
        except Error as exc:
            log.warning("app list refused: %s", exc)
            return tunnel.error_answer(_client_message(exc))
        apps = [
            {
                "name": app.name,
                "description": app.description,
                "uri": app.uri,
                "labels": dict(app.labels),
                "tools": tool_patterns(roles, app.labels),
            }
            for app in answer.apps
        ]
        return {"ok": True, "user": answer.user, "apps": apps}

    # -- sessions --

    async def _session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cert_pem: bytes,
        name: str,
        remote: str | None,
    ) -> None:
        def audit(
            event: str, success: bool, message: str | None, details: Mapping[str, str]
        ) -> None:
            self._audit.record(
                AuditEvent(
                    time=self._clock(),
                    event=event,
                    success=success,
                    code=0,
                    actor=actor,
                    remote_addr=remote,
                    resource=f"app/{name}",
                    message=message,
                    details=details,
                )
            )

        actor: Mapping[str, str | int] = _cert_actor(cert_pem)
        try:
            session, upstream = await self._open_session(writer, cert_pem, name, audit)
        except _Refused as exc:
            actor = exc.actor or actor
            audit("mcp.session.start", False, str(exc), {})
            await self._answer(writer, tunnel.error_answer(str(exc)))
            return
        actor = session.actor
        reason = "proxy stopping"
        try:
            answer = tunnel.SessionAnswer(app=name, expires=session.expires)
            await self._answer(writer, answer.to_json())
            expires = format_time(session.expires)
            audit(
                "mcp.session.start", True, None, {"expires": expires, "source": session.app.source}
            )
            log.info("session of %s with app %s started", actor.get("user"), name)
            reason = await self._pump(reader, session, upstream)
        finally:
            await upstream.close()
            audit("mcp.session.end", True, None, {"reason": reason})
            log.info("session of %s with app %s ended: %s", actor.get("user"), name, reason)

    async def _open_session(
        self,
        writer: asyncio.StreamWriter,
        cert_pem: bytes,
        name: str,
        audit: Callable[[str, bool, str | None, Mapping[str, str]], None],
    ) -> tuple[_Session, Upstream]:
        """Ask the auth service, rewrite the headers, start the upstream; _Refused if not."""
        config_app = self._config_apps.get(name)
        # A resource's headers are only known from the answer, so ask for a JWT for it.
        want_jwt = config_app is None or any("{{" in header for header in config_app.headers)
        request = wire.MCPSessionRequest(
            client_cert=cert_pem, app=name, config_app=config_app, jwt=want_jwt
        )
        try:
            answer = await self._auth.mcp_session(request)
            roles = parse_roles(answer.roles)
        except Error as exc:
            log.warning("session with app %s refused: %s", name, exc)
            raise _Refused(_client_message(exc)) from None
        actor: dict[str, str | int] = {"user": answer.user, "bot": answer.bot}
        if answer.app.name != name:
            raise _Refused(f'the auth service answered for app "{answer.app.name}"', actor)
        policy = authz.ToolPolicy(roles, name, answer.app.labels)
        decision = policy.app_allowed()
        if not decision.allowed:  # the auth service decided already; fail closed if it erred
            raise _Refused(f'access denied to app "{name}": {decision.reason}', actor)
        if answer.expires <= self._clock():
            raise _Refused("the client certificate has expired; renew the identity", actor)
        try:
            headers = rewrite_headers(answer.app.headers, answer.jwt)
        except ValueError as exc:
            raise _Refused(f'app "{name}": {exc}', actor) from None
        try:
            upstream = self._open_upstream(answer.app, headers, name_for_logs=name)
        except UpstreamError as exc:
            raise _Refused(str(exc), actor) from None
        try:
            await upstream.start()
        except UpstreamError as exc:
            await upstream.close()
            raise _Refused(str(exc), actor) from None
        except BaseException:
            await upstream.close()
            raise
        recheck = dataclasses.replace(request, jwt=False)
        session = _Session(actor, answer.app, policy, answer.expires, writer, audit, recheck)
        return session, upstream

    async def _pump(
        self, reader: asyncio.StreamReader, session: _Session, upstream: Upstream
    ) -> str:
        """Pass messages both ways until one side ends or the session expires; why it ended."""
        delay = max(0.0, (session.expires - self._clock()).total_seconds())
        tasks = [
            asyncio.create_task(session.from_client(reader, upstream)),
            asyncio.create_task(session.from_upstream(upstream)),
            asyncio.create_task(_expire(delay)),
            asyncio.create_task(self._recheck(session)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finished = done.pop()
        error = finished.exception()
        if isinstance(error, (tunnel.TunnelError, UpstreamError)):
            return str(error)
        if isinstance(error, (ConnectionError, ssl.SSLError)):
            return "the client connection broke"
        if error is not None:
            raise error
        return finished.result()

    async def _recheck(self, session: _Session) -> str:
        """Ask the auth service again every ``session_recheck``; why access ended, if it did.

        A lock on the bot, a role taken from it or the app removed ends the session
        within one interval, as Teleport ends sessions a new lock covers. While the
        auth service cannot be reached the session goes on (it still ends at
        ``expires``), and the failure is logged.
        """
        interval = self.config.session_recheck.total_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                await self._auth.mcp_session(session.request)
            except (AccessDenied, NotFound, BadParameter) as exc:
                return f"access was revoked: {exc.message}"
            except Error as exc:
                log.warning(
                    "cannot recheck the session of %s with app %s: %s",
                    session.actor.get("user"), session.app.name, exc,
                )  # fmt: skip


def run_proxy(config: ProxyConfig, *, ready: Callable[[str], None]) -> None:
    """Serve until SIGTERM or SIGINT; ``ready`` gets the bound address once listening."""
    asyncio.run(_serve_until_signalled(config, ready))


async def _serve_until_signalled(config: ProxyConfig, ready: Callable[[str], None]) -> None:
    auth = IdentityAuth(config.auth_server, config.identity, config.ca_pins)
    proxy = MCPProxy(config, auth=auth)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        ready(await proxy.start())
        await stopping.wait()
        log.info("stopping the MCP access proxy")
    finally:
        await proxy.stop()
        await auth.close()
