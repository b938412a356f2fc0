"""The cluster's certificate authorities and every certificate they issue.

Pure code: keys and ``now`` come from the caller, nothing here touches disk or
the network, so each certificate template is testable without sockets.

One ECDSA P-256 key per authority signs both its X.509 and its SSH
certificates. Teleport keeps separate SSH and TLS keys per CA; one key keeps the
data directory small, and the two signature formats cannot be confused (an SSH
certificate blob and a DER ``TBSCertificate`` never parse as each other).

Certificate contents follow teleport-protocol.md §5: the X.509 subject is a
:class:`~tbot_py.identity.tlsid.TLSIdentity`, the SSH certificate carries the
same facts as Teleport-style extensions.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import ssh
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tbot_py.authservice import _sshcert, _x509leaf
from tbot_py.authservice.errors import BadParameter
from tbot_py.client.wire import Certs
from tbot_py.identity import keys, tlsid
from tbot_py.identity.tlsid import TLSIdentity

CA_TYPES = ("user", "host", "db")
CA_VALIDITY = timedelta(days=3650)
#: NotBefore / valid_after are backdated by this much to absorb clock skew.
CLOCK_SKEW = timedelta(minutes=1)
DEFAULT_CERT_TTL = timedelta(hours=1)
MAX_CERT_TTL = timedelta(hours=24)
SERVER_CERT_TTL = timedelta(days=365)
#: Extended key usages of identity certificates (bots, outputs, admins).
IDENTITY_USAGES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)

#: SANs every server certificate carries, besides the listen and public hosts.
SERVER_DEFAULT_SANS = (
    "localhost",
    "127.0.0.1",
    "::1",
    "teleport.cluster.local",
    "*.teleport.cluster.local",
)


@dataclass(frozen=True)
class Authority:
    """One certificate authority: a P-256 key and its self-signed X.509 certificate."""

    type: str
    key: keys.PrivateKey
    cert: x509.Certificate

    # The public encodings are cached: every issued identity carries them.
    @cached_property
    def cert_pem(self) -> bytes:
        """The CA certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The CA private key as PKCS#8 PEM (a secret: only the data directory holds it)."""
        return keys.private_key_pem(self.key)

    @cached_property
    def ssh_public_key_line(self) -> bytes:
        """The CA's SSH public key as an authorized_keys line."""
        return keys.ssh_public_key_line(self.key.public_key())

    @cached_property
    def identity_leaf(self) -> _x509leaf.LeafTemplate:
        """What every identity certificate this CA signs repeats: issuer, extensions."""
        sample = _sign_leaf(
            self,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "template")]),
            self.key.public_key(),
            not_after=self.cert.not_valid_after_utc,
            now=self.cert.not_valid_before_utc + CLOCK_SKEW,
            usages=IDENTITY_USAGES,
        )
        return _x509leaf.LeafTemplate(sample)

    @cached_property
    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """The AuthorityKeyIdentifier extension of every leaf this CA signs."""
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    @classmethod
    def from_pem(cls, ca_type: str, key_pem: bytes, cert_pem: bytes) -> Authority:
        """Load an authority written by :attr:`key_pem` and :attr:`cert_pem`."""
        key = keys.load_private_key_pem(key_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        if not keys.same_public_key(key.public_key(), _ec_public_key(cert)):
            raise ValueError(f"{ca_type} CA key does not match its certificate")
        return cls(type=ca_type, key=key, cert=cert)


@dataclass(frozen=True)
class ClusterCAs:
    """The three authorities of one cluster."""

    cluster_name: str
    user: Authority
    host: Authority
    db: Authority

    @property
    def ca_pin(self) -> str:
        """The pin clients check on first contact: the host CA signs the server certificate."""
        return keys.ca_pin(self.host.cert)

    @cached_property
    def tls_ca_certs(self) -> tuple[bytes, ...]:
        """The TLS CAs sent with every issued identity: user CA, then host CA."""
        return (self.user.cert_pem, self.host.cert_pem)

    @cached_property
    def ssh_ca_keys(self) -> tuple[bytes, ...]:
        """The SSH CA keys sent with every issued identity: user CA, then host CA."""
        return (self.user.ssh_public_key_line, self.host.ssh_public_key_line)

    def authority(self, ca_type: str) -> Authority:
        """The authority of ``ca_type`` (one of :data:`CA_TYPES`)."""
        return {"user": self.user, "host": self.host, "db": self.db}[ca_type]


@dataclass(frozen=True)
class BotProfile:
    """What an issued certificate needs to know about a bot.

    ``logins`` are the SSH logins the certificate grants (from its roles);
    ``traits``, when set, are written to the certificate as Teleport does.
    """

    name: str
    roles: tuple[str, ...]
    logins: tuple[str, ...] = ()
    traits: Mapping[str, Sequence[str]] | None = None

    @property
    def username(self) -> str:
        """The bot's Teleport user name."""
        return bot_username(self.name)


def bot_username(bot_name: str) -> str:
    """Teleport names a bot's user (and its role) ``bot-<name>``."""
    return f"bot-{bot_name}"


def create_authority(ca_type: str, cluster_name: str, now: datetime) -> Authority:
    """A fresh self-signed CA of ``ca_type`` for ``cluster_name``, valid for ten years."""
    if ca_type not in (*CA_TYPES, "spiffe"):
        raise ValueError(f"unknown CA type {ca_type!r}")
    key = keys.generate_private_key()
    # The issuer O of every leaf is the cluster name; clients derive the cluster from it.
    # The SPIFFE CA gets its own CN so that no chain builder mistakes it for the user CA.
    common_name = f"{cluster_name} SPIFFE CA" if ca_type == "spiffe" else cluster_name
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial_128())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )
    if ca_type == "spiffe":
        # The SPIFFE CA names its trust domain (the cluster), as Teleport's does.
        trust_domain = x509.UniformResourceIdentifier(f"spiffe://{cluster_name}")
        cert = cert.add_extension(x509.SubjectAlternativeName([trust_domain]), critical=False)
    return Authority(type=ca_type, key=key, cert=cert.sign(key, hashes.SHA256()))


def create_cluster_cas(cluster_name: str, now: datetime) -> ClusterCAs:
    """Fresh user, host and database authorities for a new cluster."""
    return ClusterCAs(
        cluster_name=cluster_name,
        user=create_authority("user", cluster_name, now),
        host=create_authority("host", cluster_name, now),
        db=create_authority("db", cluster_name, now),
    )


def grant_expiry(
    requested: datetime | None, now: datetime, *, not_after: datetime | None = None
) -> datetime:
    """The expiry to grant: ``requested`` (default now+1h), capped at now+24h and ``not_after``.

    Truncated to whole seconds, the precision of both certificate formats.
    Raises BadParameter when the request is not in the future.
    """
    if requested is not None and requested <= now:
        raise BadParameter("requested certificate expiry is not in the future")
    expires = min(requested or now + DEFAULT_CERT_TTL, now + MAX_CERT_TTL)
    if not_after is not None:
        expires = min(expires, not_after)
    expires = expires.replace(microsecond=0)
    if expires <= now:
        raise BadParameter("requested certificate expiry is not in the future")
    return expires


def bot_principals(bot: BotProfile, instance_id: str, *, internal_join: bool) -> tuple[str, ...]:
    """SSH logins of a bot certificate.

    The bot's logins, or a placeholder that matches no real account, so a
    certificate never means "any principal". The bot's own certificate adds
    Teleport's internal join login.
    """
    logins = bot.logins or (f"-teleport-nologin-{instance_id}",)
    return (*logins, tlsid.INTERNAL_JOIN_PRINCIPAL) if internal_join else logins


def issue_bot_identity(
    cas: ClusterCAs,
    bot: BotProfile,
    *,
    instance_id: str,
    generation: int,
    public_key: keys.PublicKey,
    expires: datetime,
    now: datetime,
    renewable: bool = True,
) -> Certs:
    """The bot's own identity (join and renew), for ``public_key``.

    Renewable after a ``token`` join; not after a delegated (OIDC) join, whose bot
    joins again with a fresh ID token instead of renewing.
    """
    identity = TLSIdentity(
        username=bot.username,
        groups=bot.roles,
        principals=bot_principals(bot, instance_id, internal_join=True),
        route_to_cluster=cas.cluster_name,
        teleport_cluster=cas.cluster_name,
        renewable=renewable,
        generation=generation,
        bot_name=bot.name,
        bot_instance_id=instance_id,
        traits=_traits(bot),
    )
    return _issue_user_identity(cas, identity, public_key, expires=expires, now=now)


def issue_impersonated_identity(
    cas: ClusterCAs,
    bot: BotProfile,
    *,
    instance_id: str,
    roles: Sequence[str],
    public_key: keys.PublicKey,
    expires: datetime,
    reissuable: bool,
    route_to_cluster: str,
    now: datetime,
    route: TLSIdentity | None = None,
) -> Certs:
    """A short-lived, non-renewable identity holding ``roles``, for an output.

    ``route`` carries only the app / database routing fields (RouteToApp,
    RouteToDatabase) to copy into the certificate's subject.
    """
    identity = TLSIdentity(
        username=bot.username,
        groups=tuple(roles),
        principals=bot_principals(bot, instance_id, internal_join=False),
        route_to_cluster=route_to_cluster or cas.cluster_name,
        teleport_cluster=cas.cluster_name,
        impersonator=bot.username,
        disallow_reissue=not reissuable,
        bot_name=bot.name,
        bot_instance_id=instance_id,
        traits=_traits(bot),
        route_to_app=route.route_to_app if route else "",
        db_service=route.db_service if route else "",
        db_user=route.db_user if route else "",
        db_name=route.db_name if route else "",
    )
    return _issue_user_identity(cas, identity, public_key, expires=expires, now=now)


#: The X.509 group (subject O) that lets a certificate call the admin API.
ADMIN_GROUP = "tbot-py-admin"
#: How long an admin identity written by ``auth start --write-admin-identity`` lasts.
ADMIN_IDENTITY_TTL = timedelta(hours=12)


def issue_admin_identity(
    cas: ClusterCAs, username: str, public_key: keys.PublicKey, *, now: datetime
) -> Certs:
    """A 12h admin identity for ``username``: group ``tbot-py-admin``, not renewable, no bot."""
    identity = TLSIdentity(
        username=username,
        groups=(ADMIN_GROUP,),
        principals=(username,),
        route_to_cluster=cas.cluster_name,
        teleport_cluster=cas.cluster_name,
    )
    expires = (now + ADMIN_IDENTITY_TTL).replace(microsecond=0)
    return _issue_user_identity(cas, identity, public_key, expires=expires, now=now)


def _traits(bot: BotProfile) -> dict[str, list[str]] | None:
    return None if bot.traits is None else {k: list(v) for k, v in bot.traits.items()}


def _issue_user_identity(
    cas: ClusterCAs,
    identity: TLSIdentity,
    public_key: keys.PublicKey,
    *,
    expires: datetime,
    now: datetime,
) -> Certs:
    tls_cert = cas.user.identity_leaf.sign(
        cas.user.key,
        subject=identity.to_subject(),
        public_key=public_key,
        serial=_serial_128(),
        not_before=now - CLOCK_SKEW,
        not_after=expires,
    )
    ssh_cert = _sign_ssh_user_cert(cas.user, identity, public_key, expires=expires, now=now)
    return Certs(
        ssh=ssh_cert,
        tls=_x509leaf.pem(tls_cert),
        tls_ca_certs=cas.tls_ca_certs,
        ssh_ca_certs=cas.ssh_ca_keys,
    )


def ssh_extensions(identity: TLSIdentity) -> dict[str, str]:
    """The SSH certificate extensions carrying the same facts as ``identity``'s subject.

    Values are raw text; the SSH encoder wraps each non-empty value in an SSH
    string, as OpenSSH and Go do.
    """
    exts = {
        tlsid.SSH_EXT_PERMIT_PTY: "",
        tlsid.SSH_EXT_PERMIT_AGENT_FORWARDING: "",
        tlsid.SSH_EXT_PERMIT_PORT_FORWARDING: "",
        tlsid.SSH_EXT_TELEPORT_ROLES: json.dumps(
            {"roles": list(identity.groups)}, separators=(",", ":")
        ),
        tlsid.SSH_EXT_ROUTE_TO_CLUSTER: identity.route_to_cluster,
    }
    if identity.traits is not None:
        # The same JSON as the X.509 POSTALCODE attribute.
        exts[tlsid.SSH_EXT_TELEPORT_TRAITS] = json.dumps(
            identity.traits, sort_keys=True, separators=(",", ":")
        )
    if identity.bot_name:
        exts[tlsid.SSH_EXT_BOT_NAME] = identity.bot_name
    if identity.bot_instance_id:
        exts[tlsid.SSH_EXT_BOT_INSTANCE_ID] = identity.bot_instance_id
    if identity.renewable:
        exts[tlsid.SSH_EXT_RENEWABLE] = ""
    if identity.generation:
        exts[tlsid.SSH_EXT_GENERATION] = str(identity.generation)
    if identity.impersonator:
        exts[tlsid.SSH_EXT_IMPERSONATOR] = identity.impersonator
    if identity.disallow_reissue:
        exts[tlsid.SSH_EXT_DISALLOW_REISSUE] = ""
    return exts


def _sign_ssh_user_cert(
    ca: Authority,
    identity: TLSIdentity,
    public_key: keys.PublicKey,
    *,
    expires: datetime,
    now: datetime,
) -> bytes:
    line = _sshcert.sign_user_certificate(
        ca.key,
        public_key,
        serial=secrets.randbits(64),
        key_id=identity.username.encode(),
        principals=[p.encode() for p in identity.principals],
        valid_after=int((now - CLOCK_SKEW).timestamp()),
        valid_before=int(expires.timestamp()),
        extensions={k.encode(): v.encode() for k, v in ssh_extensions(identity).items()},
    )
    return line + b"\n"


#: A host certificate principal: a host name, address or alias, as clients dial it.
_HOST_PRINCIPAL_RE = re.compile(r"[!-+\--~]{1,253}")
MAX_HOST_PRINCIPALS = 64


def issue_ssh_host_certificate(
    cas: ClusterCAs,
    public_ssh_key: bytes,
    *,
    key_id: str,
    principals: Sequence[str],
    expires: datetime,
    now: datetime,
) -> bytes:
    """An SSH host certificate for an authorized_keys line, signed by the host CA.

    Valid for exactly ``principals`` (the names clients dial), backdated by the clock
    skew, no extensions (host certificates carry none). BadParameter for a bad key.
    """
    if len(principals) > MAX_HOST_PRINCIPALS:
        raise BadParameter(f"at most {MAX_HOST_PRINCIPALS} principals per host certificate")
    for principal in principals:
        if not _HOST_PRINCIPAL_RE.fullmatch(principal):
            raise BadParameter(
                "a host principal must be 1-253 printable characters without spaces or commas"
            )
    try:
        public_key = serialization.load_ssh_public_key(public_ssh_key.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadParameter("public_ssh_key is not an authorized_keys line") from None
    if not isinstance(public_key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise BadParameter("public_ssh_key must be an ECDSA or Ed25519 key")
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(public_key)
        .serial(secrets.randbits(64))
        .type(ssh.SSHCertificateType.HOST)
        .key_id(key_id.encode())
        .valid_principals([p.encode() for p in principals])
        .valid_after(int((now - CLOCK_SKEW).timestamp()))
        .valid_before(int(expires.timestamp()))
    )
    return builder.sign(cas.host.key).public_bytes() + b"\n"


def issue_server_certificate(
    cas: ClusterCAs,
    public_key: keys.PublicKey,
    *,
    hosts: Iterable[str],
    now: datetime,
) -> x509.Certificate:
    """The HTTPS server certificate, signed by the host CA, for ``hosts`` plus the defaults."""
    sans = _subject_alt_names([*hosts, *SERVER_DEFAULT_SANS])
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cas.cluster_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Auth"),
        ]
    )
    return _sign_leaf(
        cas.host,
        subject,
        public_key,
        not_after=now + SERVER_CERT_TTL,
        now=now,
        usages=(ExtendedKeyUsageOID.SERVER_AUTH,),
        sans=sans,
    )


#: A DNS name a TLS server certificate may carry: labels of letters, digits and '-',
#: the first of which may be ``*``.
_SERVER_DNS_NAME_RE = re.compile(
    r"(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def issue_tls_server_certificate(
    cas: ClusterCAs,
    public_key: keys.PublicKey,
    *,
    names: Sequence[str],
    not_after: datetime,
    now: datetime,
) -> x509.Certificate:
    """A service's TLS server certificate (the MCP access proxy's), signed by the host CA.

    Valid for exactly ``names`` (DNS names or IP addresses; the first is the subject
    CN) and for serverAuth only. BadParameter for a name that is neither.
    """
    for name in names:
        if _is_ip_address(name):
            continue
        if len(name) > 253 or not _SERVER_DNS_NAME_RE.fullmatch(name):
            raise BadParameter(
                f"{name[:64]!r} is neither a DNS name nor an IP address; "
                "a server certificate names hosts as clients dial them"
            )
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cas.cluster_name),
        ]
    )
    return _sign_leaf(
        cas.host,
        subject,
        public_key,
        not_after=not_after,
        now=now,
        usages=(ExtendedKeyUsageOID.SERVER_AUTH,),
        sans=_subject_alt_names(names),
    )


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """IP address SANs for addresses, DNS name SANs for the rest; no duplicates or blanks."""
    return [
        x509.IPAddress(ipaddress.ip_address(host)) if _is_ip_address(host) else x509.DNSName(host)
        for host in dict.fromkeys(hosts)
        if host
    ]


def _sign_leaf(
    ca: Authority,
    subject: x509.Name,
    public_key: keys.PublicKey,
    *,
    not_after: datetime,
    now: datetime,
    usages: Sequence[x509.ObjectIdentifier],
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(_serial_128())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(ca.authority_key_identifier, critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


#: Signs a leaf with any authority; the SPIFFE CA (:mod:`.workload`) issues X.509 SVIDs with it.
sign_leaf = _sign_leaf


EXPORT_TYPES = ("", "user", "host", "tls", "tls-host", "tls-user", "db")


def export_authority(cas: ClusterCAs, export_type: str) -> bytes:
    """``GET /webapi/auth/export?type=<export_type>`` output (teleport-protocol.md §6).

    Raises BadParameter for an unknown type.
    """
    cluster = cas.cluster_name
    host_line = (
        f"@cert-authority {cluster},*.{cluster} {_bare_ssh_key(cas.host)} type=host\n".encode()
    )
    user_line = (
        f"cert-authority {_bare_ssh_key(cas.user)} clustername={cluster}&type=user\n".encode()
    )
    exports = {
        "": host_line + user_line,
        "user": user_line,
        "host": host_line,
        "tls": cas.host.cert_pem,
        "tls-host": cas.host.cert_pem,
        "tls-user": cas.user.cert_pem,
        "db": cas.db.cert_pem,
    }
    if export_type not in exports:
        raise BadParameter(
            f"unsupported export type {export_type[:64]!r}; use one of: "
            + ", ".join(t for t in EXPORT_TYPES if t)
        )
    return exports[export_type]


def _bare_ssh_key(ca: Authority) -> str:
    """``<type> <base64>`` of the CA's SSH key, without comment or newline."""
    return ca.ssh_public_key_line.decode().strip()


def _ec_public_key(cert: x509.Certificate) -> keys.PublicKey:
    key = cert.public_key()
    if not isinstance(key, keys.PublicKey):
        raise ValueError("certificate does not hold an ECDSA key")
    return key


def _serial_128() -> int:
    """A random positive serial number of up to 128 bits."""
    return 1 + secrets.randbelow(2**128 - 1)
