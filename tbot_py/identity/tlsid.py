"""Teleport's identity-in-a-certificate encoding, shared by the auth service and the daemon.

X.509: the subject DN carries the identity (``tlsca.Identity`` in Teleport).
CN is the user, O the roles, L the principals, STREET the route-to-cluster,
POSTALCODE the traits JSON, and private OIDs under 1.3.9999 the rest.

SSH: the certificate's key id is the user; extensions carry the same facts.

Both encodings live here so that the server that writes them and the client
that reads them can never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

# Private subject attribute OIDs (teleport-protocol.md §5.1).
OID_TELEPORT_CLUSTER = ObjectIdentifier("1.3.9999.1.7")
OID_RENEWABLE = ObjectIdentifier("1.3.9999.1.13")
OID_GENERATION = ObjectIdentifier("1.3.9999.1.14")
OID_IMPERSONATOR = ObjectIdentifier("1.3.9999.2.7")
OID_DISALLOW_REISSUE = ObjectIdentifier("1.3.9999.2.9")
OID_BOT_NAME = ObjectIdentifier("1.3.9999.2.18")
OID_BOT_INSTANCE_ID = ObjectIdentifier("1.3.9999.2.20")
# RouteToApp / RouteToDatabase (teleport-protocol.md, private OIDs).
OID_APP_NAME = ObjectIdentifier("1.3.9999.1.10")
OID_DB_SERVICE = ObjectIdentifier("1.3.9999.2.1")
OID_DB_USER = ObjectIdentifier("1.3.9999.2.3")
OID_DB_NAME = ObjectIdentifier("1.3.9999.2.4")

# SSH certificate extensions (teleport-protocol.md §5.2).
SSH_EXT_PERMIT_PTY = "permit-pty"
SSH_EXT_PERMIT_AGENT_FORWARDING = "permit-agent-forwarding"
SSH_EXT_PERMIT_PORT_FORWARDING = "permit-port-forwarding"
SSH_EXT_TELEPORT_ROLES = "teleport-roles"
SSH_EXT_TELEPORT_TRAITS = "teleport-traits"
SSH_EXT_ROUTE_TO_CLUSTER = "teleport-route-to-cluster"
SSH_EXT_RENEWABLE = "renewable"
SSH_EXT_GENERATION = "generation"
SSH_EXT_IMPERSONATOR = "impersonator"
SSH_EXT_DISALLOW_REISSUE = "disallow-reissue"
SSH_EXT_BOT_NAME = "bot-name@goteleport.com"
SSH_EXT_BOT_INSTANCE_ID = "bot-instance-id@goteleport.com"

#: The internal login every bot certificate carries, as in Teleport.
INTERNAL_JOIN_PRINCIPAL = "-teleport-internal-join"


@dataclass(frozen=True)
class TLSIdentity:
    """The identity facts a Teleport-style X.509 certificate carries in its subject."""

    username: str
    groups: tuple[str, ...] = ()
    principals: tuple[str, ...] = ()
    route_to_cluster: str = ""
    teleport_cluster: str = ""
    traits: dict[str, list[str]] | None = field(default=None, compare=False)
    renewable: bool = False
    generation: int = 0
    impersonator: str = ""
    disallow_reissue: bool = False
    bot_name: str = ""
    bot_instance_id: str = ""
    route_to_app: str = ""
    db_service: str = ""
    db_user: str = ""
    db_name: str = ""

    def to_subject(self) -> x509.Name:
        """Encode as an X.509 subject DN in Teleport's attribute layout."""
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, self.username)]
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in self.groups]
        attrs += [x509.NameAttribute(NameOID.LOCALITY_NAME, p) for p in self.principals]
        attrs.append(x509.NameAttribute(NameOID.STREET_ADDRESS, self.route_to_cluster))
        attrs.append(
            x509.NameAttribute(
                NameOID.POSTAL_CODE, json.dumps(self.traits, sort_keys=True, separators=(",", ":"))
            )
        )
        extra: list[tuple[ObjectIdentifier, str]] = []
        if self.teleport_cluster:
            extra.append((OID_TELEPORT_CLUSTER, self.teleport_cluster))
        if self.renewable:
            extra.append((OID_RENEWABLE, "true"))
        if self.generation:
            extra.append((OID_GENERATION, str(self.generation)))
        if self.impersonator:
            extra.append((OID_IMPERSONATOR, self.impersonator))
        if self.disallow_reissue:
            extra.append((OID_DISALLOW_REISSUE, "true"))
        if self.bot_name:
            extra.append((OID_BOT_NAME, self.bot_name))
        if self.bot_instance_id:
            extra.append((OID_BOT_INSTANCE_ID, self.bot_instance_id))
        for oid, value in (
            (OID_APP_NAME, self.route_to_app),
            (OID_DB_SERVICE, self.db_service),
            (OID_DB_USER, self.db_user),
            (OID_DB_NAME, self.db_name),
        ):
            if value:
                extra.append((oid, value))
        attrs += [x509.NameAttribute(oid, value) for oid, value in extra]
        return x509.Name(attrs)

    @classmethod
    def from_subject(cls, name: x509.Name) -> TLSIdentity:
        """Decode a subject DN written by :meth:`to_subject` (or by Teleport)."""

        def values(oid: ObjectIdentifier) -> list[str]:
            return [str(a.value) for a in name.get_attributes_for_oid(oid)]

        def one(oid: ObjectIdentifier) -> str:
            found = values(oid)
            return found[0] if found else ""

        traits_raw = one(NameOID.POSTAL_CODE)
        try:
            traits = json.loads(traits_raw) if traits_raw else None
        except ValueError:
            traits = None
        generation_raw = one(OID_GENERATION)
        return cls(
            username=one(NameOID.COMMON_NAME),
            groups=tuple(values(NameOID.ORGANIZATION_NAME)),
            principals=tuple(values(NameOID.LOCALITY_NAME)),
            route_to_cluster=one(NameOID.STREET_ADDRESS),
            teleport_cluster=one(OID_TELEPORT_CLUSTER),
            traits=traits if isinstance(traits, dict) else None,
            renewable=one(OID_RENEWABLE) == "true",
            generation=int(generation_raw) if generation_raw.isdigit() else 0,
            impersonator=one(OID_IMPERSONATOR),
            disallow_reissue=one(OID_DISALLOW_REISSUE) == "true",
            bot_name=one(OID_BOT_NAME),
            bot_instance_id=one(OID_BOT_INSTANCE_ID),
            route_to_app=one(OID_APP_NAME),
            db_service=one(OID_DB_SERVICE),
            db_user=one(OID_DB_USER),
            db_name=one(OID_DB_NAME),
        )


def cluster_name_of(cert: x509.Certificate) -> str:
    """The cluster name: the first Organization of the issuer (how tbot derives it)."""
    orgs = cert.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(orgs[0].value) if orgs else ""
