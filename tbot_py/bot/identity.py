"""The bot's own identity: load it from storage, then join or renew, then persist it.

The decision follows tbot (tbot.md §7.1-7.2):

- a stored identity whose ``tokenhash`` differs from the configured token is
  discarded, so handing the bot a new token forces a fresh join;
- an expired stored identity is discarded and the bot joins again (needs a token);
- a valid stored identity is renewed with a fresh key over mTLS;
- with a delegated join method (kubernetes, github, gitlab, generic_oidc) there is
  no renewal: the bot joins again with a fresh ID token every time, over mTLS with
  its current identity so that the auth service keeps its bot instance ID;
- with nothing stored and no token there is nothing to do: a clear error.

The new identity is written to storage *before* anything uses it: the server
has already advanced the generation counter, so an identity that is used but
not saved would lock the bot out after a crash.

A crash can also fall between the server's answer and that write. So the new
private key is persisted (``pending-key``) *before* the renewal is sent; after
a restart the renewal is retried with the same key, and the auth service
answers a retry (same presented generation, same new key) with the answer it
already gave instead of a generation-mismatch lockout.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tbot_py.client import tls, wire
from tbot_py.client.http import AuthClient
from tbot_py.client.trust import first_contact_context
from tbot_py.destinations.base import Destination
from tbot_py.errors import AccessDenied, ConfigError, IdentityError
from tbot_py.identity import keys
from tbot_py.identity.model import BOT_ARTIFACTS, Identity

log = logging.getLogger("tbot_py.bot")

Clock = Callable[[], datetime]
JOIN_METHOD_TOKEN = "token"  # noqa: S105 - a join method's name
#: Where the key of a renewal in flight is kept until its certificates are saved.
ARTIFACT_PENDING_KEY = "pending-key"


@dataclass(frozen=True)
class JoinParams:
    """What the bot needs to reach the cluster and prove itself on first contact."""

    addr: str
    token: str | None
    ca_pins: tuple[str, ...] = ()
    ca_path: str | None = None
    insecure: bool = False
    #: ``token`` joins renew; the delegated (OIDC) methods join again for every renewal.
    join_method: str = JOIN_METHOD_TOKEN
    #: For a delegated method: fetches the ID token (a JWT) for an audience (the cluster name).
    id_token: Callable[[str], Awaitable[str]] | None = field(default=None, compare=False)
    #: Why a configured token could not be read (a token file deleted after the first
    #: join is fine, as in tbot); raised only if a join is actually needed.
    token_problem: ConfigError | None = field(default=None, compare=False)


def fresh_public_keys(key: keys.PrivateKey) -> wire.PublicKeys:
    """The wire encoding of a new key: PKIX PEM for TLS and an authorized_keys line for SSH."""
    public = key.public_key()
    return wire.PublicKeys(tls=keys.public_key_pem(public), ssh=keys.ssh_public_key_line(public))


def load_stored_identity(storage: Destination) -> tuple[Identity, str] | None:
    """The stored bot identity and token hash, or None when storage holds none (or junk)."""
    files = storage.read_many(BOT_ARTIFACTS)
    try:
        return Identity.from_bot_artifacts(files)
    except IdentityError as exc:
        log.warning("ignoring the bot identity in %s: %s", storage.describe(), exc)
        return None


def save_identity(storage: Destination, identity: Identity, token_hash: str) -> None:
    """Persist the bot identity and clear any pending renewal key; durable on return."""
    files = identity.to_bot_artifacts(token_hash)
    files[ARTIFACT_PENDING_KEY] = b""
    storage.write_many(files)


def renewal_key(storage: Destination, current: Identity) -> keys.PrivateKey:
    """The key for the next renewal: the pending one if a renewal was cut short, else a new one.

    A new key is persisted before it is used, so a crash after the server answered
    can be retried with the same key. A pending key that already holds the current
    certificates (a crash after saving, before clearing it) is not reused.
    """
    pending = storage.read(ARTIFACT_PENDING_KEY)
    if pending:
        try:
            key = keys.load_private_key_pem(pending)
        except IdentityError:
            log.warning("ignoring an unreadable pending renewal key in %s", storage.describe())
        else:
            if not keys.same_public_key(key.public_key(), current.private_key.public_key()):
                log.info("retrying a renewal that was cut short, with its persisted key")
                return key
    key = keys.generate_private_key()
    storage.write(ARTIFACT_PENDING_KEY, keys.private_key_pem(key))
    return key


def describe(identity: Identity) -> str:
    """One log-friendly line about an identity, with what tbot logs. Holds no secret."""
    tid = identity.tls_identity
    return (
        f"{identity.username} (bot instance {tid.bot_instance_id or '-'}, "
        f"generation {tid.generation}, roles {','.join(identity.roles) or '-'}, "
        f"principals {','.join(identity.principals) or '-'}, "
        f"valid {identity.not_before:%Y-%m-%dT%H:%M:%SZ} to "
        f"{identity.not_after:%Y-%m-%dT%H:%M:%SZ})"
    )


async def join_with_token(
    params: JoinParams, token: str, ttl: timedelta, now: datetime
) -> Identity:
    """Trade the join token for a renewable bot identity."""
    ctx = await first_contact_context(
        params.addr, ca_pins=params.ca_pins, ca_path=params.ca_path, insecure=params.insecure
    )
    key = keys.generate_private_key()
    request = wire.RegisterUsingTokenRequest(
        token=token, keys=fresh_public_keys(key), expires=now + ttl
    )
    async with AuthClient(params.addr, ctx) as client:
        certs = await client.register_using_token(request)
    return Identity.from_certs(key, certs)


async def join_delegated(
    params: JoinParams, token: str, ttl: timedelta, now: datetime, current: Identity | None
) -> Identity:
    """Join with a delegated (OIDC) method: a fresh ID token for every join.

    With a ``current`` identity the join goes over mTLS with it, so the auth service
    keeps the bot instance ID (tbot.md §7.2). Without one (first join, or the stored
    identity expired) it is a first contact, trusted by the configured CA pins or path,
    and the auth service starts a new instance.
    """
    if params.id_token is None:
        raise ConfigError(
            f"join method {params.join_method} needs an ID token source",
            yaml_path="onboarding.join_method",
        )
    if current is not None:
        ctx = tls.mtls_context(current.tls_cert_pem, current.private_key_pem, current.tls_ca_pems)
    else:
        ctx = await first_contact_context(
            params.addr, ca_pins=params.ca_pins, ca_path=params.ca_path, insecure=params.insecure
        )
    key = keys.generate_private_key()
    async with AuthClient(params.addr, ctx) as client:
        cluster_name = current.cluster_name if current is not None else ""
        if not cluster_name:
            cluster_name = (await client.ping()).cluster_name
        id_token = await params.id_token(cluster_name)
        request = wire.RegisterUsingTokenRequest(
            token=token, keys=fresh_public_keys(key), expires=now + ttl, id_token=id_token
        )
        certs = await client.register_using_token(request)
    return Identity.from_certs(key, certs)


async def renew_identity(
    addr: str,
    current: Identity,
    key: keys.PrivateKey,
    ttl: timedelta,
    now: datetime,
    *,
    after_response: Callable[[], None] | None = None,
) -> Identity:
    """Renew a renewable identity for ``key``, authenticating with the current one.

    A new short-lived client is built for every renewal: the generation
    counter lives in the certificate, so the old connection must not be reused.
    ``after_response`` runs between the answer and anything else (crash tests).
    """
    ctx = tls.mtls_context(current.tls_cert_pem, current.private_key_pem, current.tls_ca_pems)
    request = wire.RenewRequest(keys=fresh_public_keys(key), expires=now + ttl)
    async with AuthClient(addr, ctx) as client:
        try:
            certs = await client.renew_bot(request)
        except AccessDenied as exc:
            exc.message += (
                "; the stored bot identity was refused. If it was copied or used by another "
                "process, issue a new token (tbot-py auth tokens add --bot NAME) and run again "
                "with it"
            )
            raise
    if after_response is not None:
        after_response()
    return Identity.from_certs(key, certs)


async def obtain_bot_identity(
    params: JoinParams,
    storage: Destination,
    ttl: timedelta,
    clock: Clock,
    after_response: Callable[[], None] | None = None,
) -> Identity:
    """Load, then join or renew, then save the bot identity. Returns the saved identity."""
    token = params.token
    token_hash = keys.token_hash(token) if token else ""
    stored = load_stored_identity(storage)
    now = clock()
    if stored is not None:
        identity, stored_hash = stored
        if token and not hmac.compare_digest(stored_hash, token_hash):
            log.info("the join token changed; discarding the stored identity and joining again")
            stored = None
        elif not identity.is_valid_at(now):
            log.info("the stored identity expired at %s; joining again", identity.not_after)
            stored = None
    if stored is None:
        if not token and params.token_problem is not None:
            raise params.token_problem
        if not token:
            raise ConfigError(
                f"no usable bot identity in {storage.describe()} and no join token configured; "
                "set onboarding.token or pass --token",
                yaml_path="onboarding.token",
            )
        if params.join_method != JOIN_METHOD_TOKEN:
            identity = await join_delegated(params, token, ttl, now, current=None)
        else:
            identity = await join_with_token(params, token, ttl, now)
        log.info(
            "joined the cluster %s (join method %s) as %s",
            identity.cluster_name,
            params.join_method,
            describe(identity),
        )
    elif params.join_method != JOIN_METHOD_TOKEN and token:
        identity = await join_delegated(params, token, ttl, now, current=stored[0])
        log.info("joined again (join method %s): %s", params.join_method, describe(identity))
    else:
        identity, token_hash = stored[0], stored[1]
        if not identity.tls_identity.renewable:
            raise ConfigError(
                f"the stored identity in {storage.describe()} is not renewable; "
                "configure a join token to join again",
                yaml_path="onboarding.token",
            )
        key = renewal_key(storage, identity)
        identity = await renew_identity(
            params.addr, identity, key, ttl, now, after_response=after_response
        )
        log.info("renewed the bot identity: %s", describe(identity))
    save_identity(storage, identity, token_hash)
    return identity
