"""The auth service's HTTPS API: an aiohttp application.

Endpoints (shapes in :mod:`tbot_py.client.wire`):

* ``GET /webapi/find`` (and ``/v1/...``): cluster name and version, unauthenticated.
* ``GET /webapi/auth/export?type=...`` (and ``/v1/...``): CA export, plain text.
* ``POST /v1/webapi/host/credentials``: token join, unauthenticated, rate limited per
  source address (:mod:`.ratelimit`).
* ``POST /v1/bot/renew``, ``POST /v1/bot/certs``, ``GET /v1/bot/cas``: mTLS with
  the bot's own (renewable, not impersonated) certificate.
* ``/v1/admin/...``: the admin commands, mTLS with an admin certificate (:mod:`.admin_api`).
* ``GET /.well-known/openid-configuration`` and ``GET /.well-known/jwks.json``:
  unauthenticated, what a third party needs to verify JWT-SVIDs (:mod:`.workload`).
* ``POST /v1/bot/workload-identity/{x509,jwt}``: SVIDs for a ``workload_identity``
  the bot's roles allow (mTLS with the bot's own certificate).
* ``POST /v1/proxy/mcp/{session,apps}`` and ``POST /v1/proxy/tls-cert``: the MCP access
  proxy's questions (:mod:`.mcp_access`), mTLS with the identity output of the proxy's bot.

Every authenticated call is refused with 403 while a lock is in force on the
bot or the instance, and a renewal that presents the wrong generation locks
the instance (:mod:`.locks`).

Every error is ``{"error": {"message": ...}}`` with Teleport's status code,
except on the export endpoint, which answers in plain text as Teleport does.
Messages never echo a token or a key; unexpected failures become a bare 500
and their traceback goes to the server log only. Every join, renewal, issuance
and CA fetch, allowed or not, is one line in the audit log (:mod:`.audit`), and
so is every lock the service creates (``lock.created``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import tbot_py
from tbot_py.authservice import _sql, audit, ca, mcp_access, rbac, workload
from tbot_py.authservice.admin_api import AdminAPI, add_admin_routes
from tbot_py.authservice.apps import (
    KIND_APP,
    KIND_DB,
    App,
    AppStore,
    Database,
    app_not_found,
    database_not_found,
    get_app,
    get_database,
)
from tbot_py.authservice.bots_store import BotRecord, get_bot
from tbot_py.authservice.cluster import Cluster
from tbot_py.authservice.errors import (
    AccessDenied,
    AuthServiceError,
    BadParameter,
    GenerationMismatch,
    NotFound,
    StorageBusy,
)
from tbot_py.authservice.idtoken import IDTokenRejected
from tbot_py.authservice.instances_store import admit_instance
from tbot_py.authservice.join_tokens import JoinToken, get_join_token
from tbot_py.authservice.jwks import JWKSCache, check_id_token
from tbot_py.authservice.mtls import (
    BotCaller,
    check_bot_certificate,
    check_mcp_client_certificate,
    check_service_certificate,
)
from tbot_py.authservice.ratelimit import RateLimited, SourceRateLimiter
from tbot_py.authservice.roles import NAME_RE, Role
from tbot_py.authservice.roles_store import get_roles, role_not_found
from tbot_py.authservice.tokens_store import TOKEN_NOT_VALID
from tbot_py.authservice.workload_identities import (
    choose_workload_identity,
    list_workload_identities,
)
from tbot_py.client import wire
from tbot_py.errors import IdentityError
from tbot_py.identity import keys
from tbot_py.identity.tlsid import TLSIdentity

log = logging.getLogger("tbot_py.authservice")

MAX_BODY_BYTES = 64 * 1024
#: How many checked bot certificates :class:`VerifiedCallers` remembers.
VERIFIED_CALLERS = 1024

Clock = Callable[[], datetime]
CallerCheck = Callable[[bytes | None, ca.ClusterCAs, datetime], BotCaller]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def utc_now() -> datetime:
    """The real clock; tests pass their own."""
    return datetime.now(UTC)


def p256_public_key(pem: bytes, what: str) -> keys.PublicKey:
    """The P-256 public key in PKIX PEM field ``what``; BadParameter otherwise."""
    try:
        key = keys.load_public_key_pem(pem)
    except IdentityError:
        raise BadParameter(f"{what} is not a PEM ECDSA public key") from None
    if not isinstance(key.curve, ec.SECP256R1):
        raise BadParameter(f"{what} must be an ECDSA P-256 key")
    return key


def requested_public_key(public_keys: wire.PublicKeys) -> keys.PublicKey:
    """The one P-256 key a request carries as PEM and as an SSH line; BadParameter otherwise."""
    tls_key = p256_public_key(public_keys.tls, "public_tls_key")
    # Clients write the SSH line as OpenSSH does: then equal text is the whole check, and
    # a second key parse and comparison is spared. Any other line is parsed below.
    fields = public_keys.ssh.strip().split(b" ")[:2]
    if fields == keys.ssh_public_key_line(tls_key).strip().split(b" "):
        return tls_key
    try:
        ssh_key = keys.load_ssh_public_key_line(public_keys.ssh)
    except IdentityError:
        raise BadParameter("public_ssh_key is not an ECDSA authorized_keys line") from None
    if not keys.same_public_key(tls_key, ssh_key):
        raise BadParameter("public_tls_key and public_ssh_key are not the same key")
    return tls_key


def certificate_profile(bot: BotRecord, roles: Sequence[Role]) -> ca.BotProfile:
    """What a certificate holding ``roles`` carries for ``bot``: role logins and the bot's traits.

    The logins are the roles' ``allow.logins`` minus their ``deny.logins``, with
    ``{{internal.logins}}`` expanded to the bot's logins.
    """
    return ca.BotProfile(
        name=bot.name,
        roles=bot.roles,
        logins=rbac.certificate_logins(roles, bot.traits),
        traits=bot.traits,
    )


class VerifiedCallers:
    """Certificates that passed ``check`` (default :func:`check_bot_certificate`), by DER.

    A keep-alive connection presents the same certificate on every request. The check
    depends on the certificate, on the CAs (fixed for the life of the process) and on the
    time only through the validity window: a certificate that passed at ``t`` passes at
    every ``now`` in ``[t, NotAfter)``. Within that span the remembered answer is the
    answer; outside it (expiry, or an injected clock going back) the certificate is
    checked again. Refusals are never remembered. This spares parsing the certificate
    and verifying its signature on each request; locks and the bot's existence are
    still checked in storage on every call.
    """

    def __init__(
        self,
        cas: ca.ClusterCAs,
        size: int = VERIFIED_CALLERS,
        *,
        check: CallerCheck | None = None,
    ) -> None:
        self._cas = cas
        self._size = size
        self._check = check
        self._passed: dict[bytes, tuple[BotCaller, datetime]] = {}

    def check(self, der: bytes | None, now: datetime) -> BotCaller:
        """As ``check(der, cas, now)``; raises AccessDenied."""
        seen = self._passed.get(der) if der else None
        if seen is not None and seen[1] <= now < seen[0].not_after:
            return seen[0]
        caller = (self._check or check_bot_certificate)(der, self._cas, now)
        assert der is not None  # the check refuses a missing certificate
        if len(self._passed) >= self._size:
            del self._passed[next(iter(self._passed))]  # the oldest
        self._passed[der] = (caller, now)
        return caller


class AuthAPI:
    """The request handlers, bound to one opened cluster."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        public_addr: str,
        clock: Clock = utc_now,
        join_limiter: SourceRateLimiter | None = None,
    ) -> None:
        self.cluster = cluster
        self.public_addr = public_addr
        self.clock = clock
        self.join_limiter = join_limiter if join_limiter is not None else SourceRateLimiter()
        self.audit_log = audit.AuditLog(audit.audit_log_path(cluster.data_dir))
        self.callers = VerifiedCallers(cluster.cas)
        #: Services (the MCP access proxy) calling with a bot's identity output.
        self.service_callers = VerifiedCallers(cluster.cas, check=check_service_certificate)
        #: The certificates MCP clients presented to the proxy.
        self.mcp_clients = VerifiedCallers(cluster.cas, check=check_mcp_client_certificate)
        #: The signing keys of OIDC issuers, fetched and cached for the delegated joins.
        self.issuer_keys = JWKSCache()

    # -- unauthenticated ------------------------------------------------------------

    async def find(self, request: web.Request) -> web.Response:
        """``GET /webapi/find``: what the daemon learns before joining."""
        ping = wire.PingResponse(
            cluster_name=self.cluster.name,
            server_version=tbot_py.__version__,
            proxy_public_addr=self.public_addr,
        )
        return web.json_response(ping.to_json())

    async def export(self, request: web.Request) -> web.Response:
        """``GET /webapi/auth/export``: CA certificates and SSH CA lines, errors in plain text."""
        if request.query.get("format", "") not in ("", "text"):
            return web.Response(status=400, text="only format=text is supported\n")
        try:
            body = ca.export_authority(self.cluster.cas, request.query.get("type", ""))
        except BadParameter as exc:
            return web.Response(status=400, text=exc.message + "\n")
        return web.Response(
            body=body,
            content_type="text/plain",
            headers={"Content-Disposition": 'attachment; filename="authorized_hosts.txt"'},
        )

    async def join(self, request: web.Request) -> web.Response:
        """``POST /v1/webapi/host/credentials``: spend a join token, get the bot's identity."""
        with self._audit("bot.join", request) as fields:
            # Before reading the body: a refused attempt costs us next to nothing. A bot
            # re-joining (delegated methods, every renewal) presents its own current
            # certificate: it is authenticated, as a renewal is, and not throttled as an
            # anonymous join would be.
            if not self._presents_bot_certificate(request):
                self.join_limiter.check(request.remote)
            req = wire.RegisterUsingTokenRequest.from_json(await _read_json(request))
            if req.role != wire.ROLE_BOT:
                raise BadParameter(f'the token does not allow "{req.role[:64]}" role')
            public_key = requested_public_key(req.keys)
            now = self.clock()
            expires = ca.grant_expiry(req.expires, now)
            if not req.token:
                raise AccessDenied(TOKEN_NOT_VALID)
            resource = await self._join_token_resource(req.token)
            if resource is not None:
                certs = await self._join_delegated(
                    request,
                    req,
                    resource,
                    public_key=public_key,
                    expires=expires,
                    now=now,
                    fields=fields,
                )
                return web.json_response(certs.to_json())
            instance_id = str(uuid.uuid4())
            # The token is found by an SQL equality on its SHA-256, not compared in
            # Python. Timing can leak at most how much of the *hash* matched, and the
            # attacker chooses the preimage, not the hash: to steer the hash byte by
            # byte they would have to invert SHA-256. So no constant-time compare here.
            token_hash = keys.token_hash(req.token)
            fields["resource"] = "token/" + audit.token_id(token_hash)
            bot = await asyncio.to_thread(
                self.cluster.storage.instances.join,
                token_hash,
                instance_id=instance_id,
                now=now,
            )
            fields.update(bot=bot.name, instance=instance_id, generation=1)
            stored = await self._read(lambda conn: get_roles(conn, bot.roles))
            roles = _granted(bot, bot.roles, stored, required=False)
            certs = ca.issue_bot_identity(
                self.cluster.cas,
                certificate_profile(bot, roles),
                instance_id=instance_id,
                generation=1,
                public_key=public_key,
                expires=expires,
                now=now,
            )
            fields["expires"] = wire.format_time(expires)
        return web.json_response(certs.to_json())

    async def _join_token_resource(self, token: str) -> JoinToken | None:
        """The OIDC token resource named ``token``, or None (then it is a secret token).

        One indexed read. A secret token is 256 random bits, so it does not name a
        resource by accident; a value no resource name could have is not looked up.
        """
        if not NAME_RE.match(token):
            return None
        return await self._read(lambda conn: get_join_token(conn, token))

    async def _join_delegated(
        self,
        request: web.Request,
        req: wire.RegisterUsingTokenRequest,
        resource: JoinToken,
        *,
        public_key: keys.PublicKey,
        expires: datetime,
        now: datetime,
        fields: dict[str, Any],
    ) -> wire.Certs:
        """A join with an OIDC token resource: verify the ID token, then keep or start an instance.

        A bot re-joining presents its own current certificate over mTLS and keeps its
        instance ID (tbot.md §7.2). The certificates are not renewable: the bot joins
        again, with a fresh ID token, for every renewal.
        """
        method = resource.join_method
        fields.update(resource=f"token/{resource.name}", join_method=method)
        if resource.expired(now):
            assert resource.expires is not None
            raise AccessDenied(
                f'join token "{resource.name}" expired at {wire.format_time(resource.expires)}'
            )
        if not req.id_token:
            raise AccessDenied(
                f'join token "{resource.name}" uses join method {method}: '
                "the request carries no id_token"
            )
        try:
            attributes = await check_id_token(
                resource, req.id_token, self.issuer_keys, cluster_name=self.cluster.name, now=now
            )
        except IDTokenRejected as exc:
            raise AccessDenied(f'join token "{resource.name}" ({method}): {exc.message}') from None
        fields["bot"] = resource.bot_name
        fields.update({f"claim.{name}": value for name, value in attributes.claims.items()})
        presented = self._presented_identity(request, now, resource)
        joined = await asyncio.to_thread(
            self.cluster.storage.instances.join_delegated,
            resource.bot_name,
            new_instance_id=str(uuid.uuid4()),
            presented=presented,
            now=now,
        )
        fields.update(instance=joined.instance_id, generation=joined.generation)
        if presented is not None:
            fields["rejoin"] = joined.instance_id == presented[0]
        if joined.stale:
            # Not enforced for delegated methods (Teleport logs it too): each join
            # proves itself with a fresh ID token.
            log.warning(
                "bot.join bot=%s instance=%s presented generation %d, stored %d: "
                "two processes may share this bot's storage",
                resource.bot_name,
                joined.instance_id,
                presented[1] if presented else 0,
                joined.generation - 1,
            )
        bot = joined.bot
        stored = await self._read(lambda conn: get_roles(conn, bot.roles))
        roles = _granted(bot, bot.roles, stored, required=False)
        certs = ca.issue_bot_identity(
            self.cluster.cas,
            certificate_profile(bot, roles),
            instance_id=joined.instance_id,
            generation=joined.generation,
            public_key=public_key,
            expires=expires,
            now=now,
            renewable=False,
        )
        fields["expires"] = wire.format_time(expires)
        return certs

    def _presents_bot_certificate(self, request: web.Request) -> bool:
        """Whether the caller presents a bot's own current certificate of this cluster."""
        der = _peer_certificate(request)
        if der is None:
            return False
        try:
            self.callers.check(der, self.clock())
        except AccessDenied:
            return False
        return True

    def _presented_identity(
        self, request: web.Request, now: datetime, resource: JoinToken
    ) -> tuple[str, int] | None:
        """(instance ID, generation) of the bot certificate the re-joining caller presents.

        None without a client certificate. A certificate of another bot, or one that
        is not a bot's own, is refused rather than ignored.
        """
        der = _peer_certificate(request)
        if der is None:
            return None
        identity = self.callers.check(der, now).identity
        if identity.bot_name != resource.bot_name:
            raise AccessDenied(
                f'the client certificate is bot "{identity.bot_name}"\'s, but join token '
                f'"{resource.name}" is for bot "{resource.bot_name}"'
            )
        return identity.bot_instance_id, identity.generation

    # -- mTLS: the bot's own certificate ----------------------------------------------

    async def renew(self, request: web.Request) -> web.Response:
        """``POST /v1/bot/renew``: a new bot identity for a new key; bumps the generation.

        A retry from the previous generation with the same new key gets the
        stored answer again (see ``InstanceStore.renew``), so a bot that
        crashed before saving its renewed identity is not locked out. Any other
        stale or reused generation locks the instance and is audited as
        ``lock.created``.
        """
        with self._audit("bot.renew", request) as fields:
            now = self.clock()
            caller = self._caller(request, now, fields)
            fields["resource"] = f"bot_instance/{fields['bot']}/{fields['instance']}"
            if not caller.identity.renewable:
                raise AccessDenied(
                    "this bot identity came from a delegated join and is not renewable; "
                    "the bot joins again with its join method instead"
                )
            req = wire.RenewRequest.from_json(await _read_json(request))
            public_key = requested_public_key(req.keys)
            expires = ca.grant_expiry(req.expires, now)

            def load(conn: _sql.Connection) -> tuple[BotRecord, dict[str, Role]]:
                bot = _existing_bot(conn, caller)
                return bot, get_roles(conn, bot.roles)

            bot, stored = await self._read(load)
            roles = _granted(bot, bot.roles, stored, required=False)
            ident = caller.identity
            profile = certificate_profile(bot, roles)

            def issue(generation: int) -> tuple[str, datetime]:
                certs = ca.issue_bot_identity(
                    self.cluster.cas,
                    profile,
                    instance_id=ident.bot_instance_id,
                    generation=generation,
                    public_key=public_key,
                    expires=expires,
                    now=now,
                )
                return json.dumps(certs.to_json()), expires

            # Checked, issued and recorded in one transaction: a certificate
            # renews at most once, and only its exact retry gets that answer again.
            try:
                answer = await asyncio.to_thread(
                    self.cluster.storage.instances.renew,
                    bot.name,
                    ident.bot_instance_id,
                    presented=ident.generation,
                    new_key_spki=keys.spki_der(public_key),
                    now=now,
                    issue=issue,
                )
            except GenerationMismatch as exc:
                self._audit_lock_created(exc, ident.bot_instance_id, request.remote)
                raise
            if answer.retry:
                log.info(
                    "bot.renew idempotent retry bot=%s instance=%s presented=%d: "
                    "answering with the stored generation %d identity, generation not advanced",
                    bot.name,
                    ident.bot_instance_id,
                    ident.generation,
                    answer.generation,
                )
            fields["generation"] = answer.generation
            if answer.retry:
                fields["idempotent_retry"] = True
            fields["expires"] = wire.format_time(answer.expires)
        return web.json_response(text=answer.body)

    async def certs(self, request: web.Request) -> web.Response:
        """``POST /v1/bot/certs``: an impersonated identity for an output.

        A certificate routed to an app or a database names a stored ``app`` / ``db``
        resource (:mod:`.apps`) that one of the requested roles allows.
        """
        with self._audit("bot.issue", request) as fields:
            now = self.clock()
            caller = self._caller(request, now, fields)
            fields["resource"] = f"bot/{fields['bot']}"
            req = wire.ImpersonateRequest.from_json(await _read_json(request))
            public_key = requested_public_key(req.keys)
            route = _route_of(req)
            if route is not None:
                fields["route"] = _route_resource(route)

            bot, stored = await self._admit(caller, now, with_roles=True)
            roles = tuple(dict.fromkeys(req.role_requests)) or bot.roles
            for role in roles:
                if role not in bot.roles:
                    raise AccessDenied(f'role "{role[:64]}" is not allowed for bot "{bot.name}"')
            fields["roles"] = ",".join(roles)
            granted = _granted(bot, roles, stored, required=True)
            if route is not None:
                target = await self._read(functools.partial(_route_target, route=route))
                _check_route(route, target, granted, bot.name)
            expires = ca.grant_expiry(
                req.expires, now, not_after=_output_limit(caller, granted, now)
            )
            certs = ca.issue_impersonated_identity(
                self.cluster.cas,
                certificate_profile(bot, granted),
                instance_id=caller.identity.bot_instance_id,
                roles=roles,
                public_key=public_key,
                expires=expires,
                reissuable=req.reissuable,
                route_to_cluster=req.route_to_cluster,
                now=now,
                route=route,
            )
            fields["expires"] = wire.format_time(expires)
        return web.json_response(certs.to_json())

    async def host_cert(self, request: web.Request) -> web.Response:
        """``POST /v1/bot/hostcert``: an SSH host certificate signed by the host CA.

        Granted by a role of the bot with ``allow.rules: [{resources: [host_cert],
        verbs: [create]}]`` and no matching ``deny.rules``; denied by default.
        """
        with self._audit("bot.host_cert", request) as fields:
            now = self.clock()
            caller = self._caller(request, now, fields)
            req = wire.HostCertRequest.from_json(await _read_json(request))
            fields["resource"] = "host_cert"
            fields["principals"] = ",".join(p[:64] for p in req.principals)[:512]
            bot, stored = await self._admit(caller, now, with_roles=True)
            granted = _granted(bot, bot.roles, stored, required=False)
            decision = rbac.check_rule(granted, "host_cert", "create")
            if not decision.allowed:
                raise AccessDenied(f'bot "{bot.name}" may not create host certificates')
            expires = ca.grant_expiry(
                req.expires, now, not_after=_output_limit(caller, granted, now)
            )
            cert = ca.issue_ssh_host_certificate(
                self.cluster.cas,
                req.public_ssh_key,
                key_id=req.principals[0],
                principals=req.principals,
                expires=expires,
                now=now,
            )
            fields["expires"] = wire.format_time(expires)
        return web.json_response(wire.HostCertResponse(ssh_cert=cert).to_json())

    async def cas(self, request: web.Request) -> web.Response:
        """``GET /v1/bot/cas``: the cluster's host, user and database CAs."""
        with self._audit("bot.cas", request) as fields:
            fields["resource"] = f"cert_authority/{self.cluster.name}"
            now = self.clock()
            await self._admit(self._caller(request, now, fields), now, with_roles=False)
        cas = self.cluster.cas
        name = self.cluster.name
        authorities = [
            wire.CertAuthority(
                "host",
                name,
                tls_certs=(cas.host.cert_pem,),
                ssh_public_keys=(cas.host.ssh_public_key_line,),
            ),
            wire.CertAuthority(
                "user",
                name,
                tls_certs=(cas.user.cert_pem,),
                ssh_public_keys=(cas.user.ssh_public_key_line,),
            ),
            wire.CertAuthority("db", name, tls_certs=(cas.db.cert_pem,)),
        ]
        return web.json_response(wire.cert_authorities_to_json(authorities))

    # -- OpenID discovery (unauthenticated): how a third party verifies JWT-SVIDs --------

    @property
    def issuer(self) -> str:
        """The ``iss`` of every JWT-SVID: the service's public address over HTTPS."""
        return f"https://{self.public_addr}"

    async def openid_configuration(self, request: web.Request) -> web.Response:
        """``GET /.well-known/openid-configuration``: the issuer and where its JWKS is."""
        return web.json_response(workload.openid_configuration(self.issuer))

    async def jwks(self, request: web.Request) -> web.Response:
        """``GET /.well-known/jwks.json``: the public keys that sign JWT-SVIDs."""
        return web.json_response(self.cluster.workload.jwks)

    # -- workload identity SVIDs (mTLS, bot identity) -------------------------------------

    async def x509_svid(self, request: web.Request) -> web.Response:
        """``POST /v1/bot/workload-identity/x509``: an X.509 SVID and the SPIFFE trust bundle."""
        with self._audit("bot.workload_identity.x509", request) as fields:
            now = self.clock()
            caller = self._caller(request, now, fields)
            req = wire.X509SVIDRequest.from_json(await _read_json(request))
            try:
                public_key = keys.load_public_key_pem(req.public_key)
            except IdentityError:
                raise BadParameter("public_key is not a PEM ECDSA public key") from None
            chosen, expires = await self._svid_grant(caller, now, req.selector, req.expires, fields)
            svid_id = workload.spiffe_id(self.cluster.name, chosen)
            fields.update(spiffe_id=svid_id, expires=wire.format_time(expires))
            cert = workload.issue_x509_svid(
                self.cluster.workload, public_key, svid_id=svid_id, now=now, not_after=expires
            )
        answer = wire.X509SVIDResponse(
            spiffe_id=svid_id,
            svid=cert.public_bytes(serialization.Encoding.PEM),
            bundle=self.cluster.workload.spiffe.cert_pem,
        )
        return web.json_response(answer.to_json())

    async def jwt_svid(self, request: web.Request) -> web.Response:
        """``POST /v1/bot/workload-identity/jwt``: a JWT-SVID for the requested audiences."""
        with self._audit("bot.workload_identity.jwt", request) as fields:
            now = self.clock()
            caller = self._caller(request, now, fields)
            req = wire.JWTSVIDRequest.from_json(await _read_json(request))
            chosen, expires = await self._svid_grant(caller, now, req.selector, req.expires, fields)
            svid_id = workload.spiffe_id(self.cluster.name, chosen)
            fields.update(
                spiffe_id=svid_id,
                audiences=",".join(req.audiences)[:256],
                expires=wire.format_time(expires),
            )
            token = workload.issue_jwt_svid(
                self.cluster.workload,
                issuer=self.issuer,
                svid_id=svid_id,
                audiences=req.audiences,
                now=now,
                expires=expires,
            )
        return web.json_response(wire.JWTSVIDResponse(spiffe_id=svid_id, jwt=token).to_json())

    async def _svid_grant(
        self,
        caller: BotCaller,
        now: datetime,
        selector: wire.WorkloadIdentitySelector,
        requested: datetime | None,
        fields: dict[str, Any],
    ) -> tuple[str, datetime]:
        """The SPIFFE ID path the bot may have and the SVID's expiry; denied otherwise.

        The SVID lives at most :data:`workload.MAX_SVID_TTL_S` and never past the
        bot's own certificate.
        """
        bot, stored = await self._admit(caller, now, with_roles=True)
        granted = _granted(bot, bot.roles, stored, required=False)
        available = await self._read(list_workload_identities)
        chosen = choose_workload_identity(
            available, granted, bot_name=bot.name, name=selector.name, labels=selector.labels
        )
        fields["resource"] = f"workload_identity/{chosen.name}"
        not_after = min(caller.not_after, now + timedelta(seconds=workload.MAX_SVID_TTL_S))
        expires = ca.grant_expiry(requested, now, not_after=not_after)
        return chosen.spiffe_path(bot.name), expires

    # -- the MCP access proxy (mTLS, a bot's identity output) ------------------------------

    async def mcp_session(self, request: web.Request) -> web.Response:
        """``POST /v1/proxy/mcp/session``: may the proxy's MCP client use this app, and a JWT.

        The proxy's roles need the ``app_session``/``create`` rule. The client's
        certificate names a bot that exists and is not locked; the roles in it that its
        bot still holds decide (:func:`.mcp_access.check_session`).
        """
        with self._audit("proxy.mcp.session", request) as fields:
            now = self.clock()
            await self._service_caller(request, now, fields, mcp_access.SESSION_RULE_RESOURCE)
            req = wire.MCPSessionRequest.from_json(await _read_json(request))
            fields.update(resource=f"{KIND_APP}/{req.app[:253]}", app=req.app, allowed=False)
            client, roles = await self._mcp_client(req.client_cert, now, fields)
            stored = None
            if req.config_app is None:
                stored = await self._read(lambda conn: get_app(conn, req.app))
            app = mcp_access.resolve_app(req.app, req.config_app, stored)
            mcp_access.check_session(client, roles, app)
            fields["allowed"] = True
            expires, token = client.not_after, ""
            if req.jwt:
                claims = mcp_access.session_jwt_claims(
                    issuer=self.issuer, client=client, roles=roles, app=app, now=now
                )
                token = workload.sign_jwt(self.cluster.workload.signing_key, claims)
                expires = min(expires, datetime.fromtimestamp(claims["exp"], UTC))
            fields["expires"] = wire.format_time(expires)
        answer = wire.MCPSessionResponse(
            user=client.identity.username,
            bot=client.identity.bot_name,
            roles=tuple(role.to_json() for role in roles),
            app=app,
            expires=expires,
            jwt=token,
        )
        return web.json_response(answer.to_json())

    async def mcp_apps(self, request: web.Request) -> web.Response:
        """``POST /v1/proxy/mcp/apps``: the MCP apps the proxy's MCP client may reach."""
        with self._audit("proxy.mcp.apps", request) as fields:
            now = self.clock()
            await self._service_caller(request, now, fields, mcp_access.SESSION_RULE_RESOURCE)
            req = wire.MCPAppsRequest.from_json(await _read_json(request))
            fields["resource"] = f"{KIND_APP}/*"
            client, roles = await self._mcp_client(req.client_cert, now, fields)
            stored = await self._read(AppStore.read_all)
            apps = mcp_access.allowed_apps(client, roles, stored, req.config_apps)
        answer = wire.MCPAppsResponse(
            user=client.identity.username,
            roles=tuple(role.to_json() for role in roles),
            apps=apps,
        )
        return web.json_response(answer.to_json())

    async def tls_server_cert(self, request: web.Request) -> web.Response:
        """``POST /v1/proxy/tls-cert``: a TLS server certificate from the host CA.

        Granted by the ``host_cert``/``create`` rule, as SSH host certificates are.
        It never outlives the caller's certificate, its roles' ``max_session_ttl`` or 24h.
        """
        with self._audit("proxy.tls_cert", request) as fields:
            now = self.clock()
            fields["resource"] = "host_cert"
            caller, roles = await self._service_caller(request, now, fields, "host_cert")
            req = wire.TLSServerCertRequest.from_json(await _read_json(request))
            fields["dns_names"] = ",".join(n[:64] for n in req.dns_names)[:512]
            public_key = p256_public_key(req.public_key, "public_key")
            limit = _output_limit(caller, roles, now)
            expires = ca.grant_expiry(
                req.expires or min(limit, now + ca.MAX_CERT_TTL), now, not_after=limit
            )
            cert = ca.issue_tls_server_certificate(
                self.cluster.cas, public_key, names=req.dns_names, not_after=expires, now=now
            )
            fields["expires"] = wire.format_time(expires)
        answer = wire.TLSServerCertResponse(
            cert=cert.public_bytes(serialization.Encoding.PEM),
            host_ca=self.cluster.cas.host.cert_pem,
            user_ca=self.cluster.cas.user.cert_pem,
        )
        return web.json_response(answer.to_json())

    async def _service_caller(
        self, request: web.Request, now: datetime, fields: dict[str, Any], rule: str
    ) -> tuple[BotCaller, list[Role]]:
        """The calling service's identity and its roles, once they allow ``rule``/``create``."""
        caller = self._caller(request, now, fields, self.service_callers)
        bot, stored = await self._admit(caller, now, with_roles=True)
        roles = mcp_access.counted_roles(caller.identity.groups, bot, stored)
        if not rbac.check_rule(roles, rule, "create").allowed:
            what = {"host_cert": "host certificates"}.get(rule, rule.replace("_", " ") + "s")
            raise AccessDenied(f'bot "{bot.name}" may not create {what}')
        return caller, roles

    async def _mcp_client(
        self, pem: bytes, now: datetime, fields: dict[str, Any]
    ) -> tuple[BotCaller, list[Role]]:
        """The MCP client behind the proxy and the roles that count for it."""
        client = self.mcp_clients.check(mcp_access.client_certificate_der(pem), now)
        fields["user"] = client.identity.username
        bot, stored = await self._admit(client, now, with_roles=True)
        return client, mcp_access.counted_roles(client.identity.groups, bot, stored)

    def _caller(
        self,
        request: web.Request,
        now: datetime,
        fields: dict[str, Any],
        callers: VerifiedCallers | None = None,
    ) -> BotCaller:
        caller = (callers or self.callers).check(_peer_certificate(request), now)
        fields.update(
            bot=caller.identity.bot_name,
            instance=caller.identity.bot_instance_id,
            generation=caller.identity.generation,
        )
        return caller

    async def _read(self, fn: Callable[[_sql.Connection], T]) -> T:
        """``fn(conn)`` in one read transaction: on the event loop when it waits for nothing.

        A read of a few rows of local SQLite costs far less than a hop to a worker thread,
        and in a busy server each hop also passes the GIL back and forth. Whatever would
        wait (a lock held elsewhere, the network of PostgreSQL) raises StorageBusy
        instead, and ``fn`` runs again in a worker thread, where waiting blocks no one.
        """
        storage = self.cluster.storage
        try:
            return storage.read(fn, wait=False)
        except StorageBusy:
            return await asyncio.to_thread(storage.read, fn)

    async def _admit(
        self, caller: BotCaller, now: datetime, *, with_roles: bool
    ) -> tuple[BotRecord, dict[str, Role]]:
        """The caller's bot, once its instance is known and neither is locked, and its roles.

        One read transaction: the bot, the locks, the instance and (``with_roles``) the
        bot's stored roles by name. When the instance's ``last_seen_at`` is due (once a
        minute) it is recorded in a worker thread, and that write checks the locks again.
        """
        instance_id = caller.identity.bot_instance_id

        def read(conn: _sql.Connection) -> tuple[BotRecord, bool, dict[str, Role]]:
            bot = _existing_bot(conn, caller)
            due = admit_instance(conn, bot.name, instance_id, now)
            return bot, due, get_roles(conn, bot.roles) if with_roles else {}

        bot, due, stored = await self._read(read)
        if due:
            await asyncio.to_thread(
                self.cluster.storage.instances.record_seen, bot.name, instance_id, now
            )
        return bot, stored

    def _audit(self, event: str, request: web.Request) -> AbstractContextManager[dict[str, Any]]:
        return audit.audited_call(self.audit_log, event, remote=request.remote)

    def _audit_lock_created(
        self, exc: GenerationMismatch, instance_id: str, remote: str | None
    ) -> None:
        lock = exc.lock
        self.audit_log.record(
            audit.AuditEvent(
                time=lock.created_at,
                event="lock.created",
                success=True,
                code=0,
                actor=audit.bot_actor(lock.bot_name, instance_id),
                remote_addr=remote,
                resource=f"lock/{lock.id}",
                details={
                    **audit.lock_details(lock),
                    "stored_generation": exc.stored,
                    "presented_generation": exc.presented,
                },
            )
        )


#: Longest app / database service / user / name a route may carry.
_MAX_ROUTE_FIELD = 253


def _route_of(req: wire.ImpersonateRequest) -> TLSIdentity | None:
    """The RouteToApp / RouteToDatabase fields of ``req`` (None without a route).

    Only their shape is checked here; :func:`_check_route` decides whether the
    requested roles may reach the app or database.
    """
    values = (req.route_to_app, req.route_to_db_service, req.route_to_db_user, req.route_to_db_name)
    if not any(values):
        return None
    if any(len(v) > _MAX_ROUTE_FIELD for v in values):
        raise BadParameter(f"a route field is longer than {_MAX_ROUTE_FIELD} characters")
    if req.route_to_app and any(values[1:]):
        raise BadParameter("a certificate routes to an app or to a database, not both")
    if not req.route_to_app and not req.route_to_db_service:
        raise BadParameter("route_to_db_user and route_to_db_name need route_to_db_service")
    return TLSIdentity(
        username="",
        route_to_app=req.route_to_app,
        db_service=req.route_to_db_service,
        db_user=req.route_to_db_user,
        db_name=req.route_to_db_name,
    )


def _route_resource(route: TLSIdentity) -> str:
    """How the audit log names a route's target: ``app/NAME`` or ``db/NAME``."""
    if route.route_to_app:
        return f"{KIND_APP}/{route.route_to_app}"
    return f"{KIND_DB}/{route.db_service}"


def _route_target(conn: _sql.Connection, *, route: TLSIdentity) -> App | Database | None:
    """The stored app or database ``route`` names, or None, in a Storage transaction."""
    if route.route_to_app:
        return get_app(conn, route.route_to_app)
    return get_database(conn, route.db_service)


def _check_route(
    route: TLSIdentity, target: App | Database | None, roles: Sequence[Role], bot_name: str
) -> None:
    """NotFound unless ``target`` (what ``route`` names) exists; AccessDenied unless allowed."""
    if route.route_to_app:
        if not isinstance(target, App):
            raise NotFound(app_not_found(route.route_to_app))
        decision = rbac.check_app_access(roles, target.name, target.labels)
        what = f'app "{target.name}"'
    else:
        if not isinstance(target, Database):
            raise NotFound(database_not_found(route.db_service))
        decision = rbac.check_db_access(
            roles, target.name, target.labels, route.db_user, route.db_name
        )
        what = f'database "{target.name}"'
    if not decision.allowed:
        raise AccessDenied(f'bot "{bot_name}" may not access {what}: {decision.reason}')


def _output_limit(caller: BotCaller, granted: Sequence[Role], now: datetime) -> datetime:
    """The latest NotAfter of an output certificate.

    An output never outlives the bot identity that asked for it, nor the shortest
    ``max_session_ttl`` of the roles it holds.
    """
    ttl_limit = rbac.session_ttl_limit(granted)
    return caller.not_after if ttl_limit is None else min(caller.not_after, now + ttl_limit)


def _peer_certificate(request: web.Request) -> bytes | None:
    """The DER client certificate TLS verified for ``request``, or None."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return der or None


def _existing_bot(conn: _sql.Connection, caller: BotCaller) -> BotRecord:
    """The caller's bot, in a Storage transaction; AccessDenied when it was removed."""
    name = caller.identity.bot_name
    bot = get_bot(conn, name)
    if bot is None:
        raise AccessDenied(f'bot "{name}" no longer exists')
    return bot


def _granted(
    bot: BotRecord, names: tuple[str, ...], stored: Mapping[str, Role], *, required: bool
) -> list[Role]:
    """The roles ``names`` among the ``stored`` ones, in order.

    A missing role is an error when ``required`` (an output asking for it).
    Otherwise it grants nothing: a bot created before roles existed keeps
    renewing its own identity while the admin creates them.
    """
    missing = [name for name in names if name not in stored]
    if missing and required:
        raise AccessDenied(role_not_found(missing[0]))
    if missing:
        log.warning(
            'bot "%s" holds roles that do not exist and grant nothing: %s',
            bot.name,
            ", ".join(missing),
        )
    return [stored[name] for name in names if name in stored]


def create_app(
    cluster: Cluster,
    *,
    public_addr: str,
    clock: Clock = utc_now,
    join_limiter: SourceRateLimiter | None = None,
) -> web.Application:
    """The aiohttp application serving ``cluster``; ``public_addr`` is what find reports.

    ``join_limiter`` limits joins per source (default: ``ratelimit.DEFAULT_JOIN_RATE``).
    """
    api = AuthAPI(cluster, public_addr=public_addr, clock=clock, join_limiter=join_limiter)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_error_middleware])
    for prefix in ("", "/v1"):
        app.router.add_get(prefix + wire.PATH_FIND, api.find)
        app.router.add_get(prefix + wire.PATH_EXPORT, api.export)
        app.router.add_post(prefix + "/webapi/host/credentials", api.join)
    app.router.add_post(wire.PATH_RENEW, api.renew)
    app.router.add_post(wire.PATH_CERTS, api.certs)
    app.router.add_get(wire.PATH_CAS, api.cas)
    app.router.add_get(wire.PATH_OPENID_CONFIGURATION, api.openid_configuration)
    app.router.add_get(wire.PATH_JWKS, api.jwks)
    app.router.add_post(wire.PATH_X509_SVID, api.x509_svid)
    app.router.add_post(wire.PATH_JWT_SVID, api.jwt_svid)
    app.router.add_post(wire.PATH_HOST_CERT, api.host_cert)
    app.router.add_post(wire.PATH_MCP_SESSION, api.mcp_session)
    app.router.add_post(wire.PATH_MCP_APPS, api.mcp_apps)
    app.router.add_post(wire.PATH_TLS_SERVER_CERT, api.tls_server_cert)
    add_admin_routes(app, AdminAPI(cluster, clock, _read_json))

    async def close_jwks(_app: web.Application) -> None:
        await api.issuer_keys.close()

    app.on_cleanup.append(close_jwks)
    return app


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(wire.error_body(message), status=status, headers=headers)


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RateLimited as exc:
        return _json_error(exc.status, exc.message, {"Retry-After": str(exc.retry_after_s)})
    except AuthServiceError as exc:
        status, message = exc.status, exc.message
    except wire.WireError as exc:
        # WireError messages name the field, never its value.
        status, message = 400, str(exc)
    except web.HTTPException as exc:
        status, message = (
            exc.status,
            {
                404: "route not found",
                405: f"method {request.method} is not allowed on {request.path}",
            }.get(exc.status, exc.reason),
        )
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        status, message = 500, "internal server error"
    return _json_error(status, message)


async def _read_json(request: web.Request) -> object:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadParameter(f"request body is larger than {MAX_BODY_BYTES} bytes") from None
    try:
        return json.loads(raw)
    except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
        raise BadParameter("request body is not valid JSON") from None
