"""The cluster's CAs in the shared database, for replicas on PostgreSQL.

With SQLite the CA keys are files in the data directory (:mod:`.cluster`).
With PostgreSQL every replica must sign with the same CAs, so their keys
(PKCS#8 PEM) and certificates live in the ``cert_authorities`` table. The
first replica to start creates them inside a write transaction, which holds
the database's write lock, and records the cluster name in the same
transaction: a replica starting at the same moment waits, then loads them.
The table's primary key on ``ca_type`` refuses a second set outright.
"""

from __future__ import annotations

from collections.abc import Callable

from tbot_py.authservice import _sql
from tbot_py.authservice.ca import CA_TYPES, Authority, ClusterCAs
from tbot_py.authservice.errors import AuthServiceError
from tbot_py.authservice.workload import SPIFFE_CA_TYPE, WorkloadKeys
from tbot_py.errors import IdentityError
from tbot_py.identity import keys

#: The ``meta`` key holding the cluster name; written last, it marks a complete cluster.
META_CLUSTER_NAME = "cluster_name"

#: ``meta`` rows holding the workload identity keys (PEM) in PostgreSQL.
WORKLOAD_META_KEYS = ("spiffe_ca_key", "spiffe_ca_cert", "jwt_key")

#: PostgreSQL only; created with the ``schema_version`` table.
CREATE_TABLE = """CREATE TABLE IF NOT EXISTS cert_authorities (
    ca_type  TEXT PRIMARY KEY CHECK (ca_type IN ('user', 'host', 'db')),
    key_pem  TEXT NOT NULL,   -- PKCS#8 PEM, unencrypted: protect the database like the keys
    cert_pem TEXT NOT NULL
)"""


class CAStore:
    """The cert_authorities table, used through ``Storage.cert_authorities``."""

    def __init__(self, transaction: _sql.Transaction) -> None:
        self._transaction = transaction

    def load_or_create(self, make: Callable[[], ClusterCAs] | None) -> ClusterCAs | None:
        """The cluster's CAs; created by ``make()`` and stored when there are none yet.

        Returns None when there is no cluster and ``make`` is None.
        """
        with self._transaction(write=True) as conn:
            row = conn.execute(
                "SELECT value FROM meta WHERE key = ?", (META_CLUSTER_NAME,)
            ).fetchone()
            if row is not None:
                return _load(conn, str(row[0]))
            if make is None:
                return None
            cas = make()
            # Leftovers of a start that failed before COMMIT cannot exist; this is belt and braces.
            conn.execute("DELETE FROM cert_authorities")
            for ca_type in CA_TYPES:
                authority = cas.authority(ca_type)
                conn.execute(
                    "INSERT INTO cert_authorities (ca_type, key_pem, cert_pem) VALUES (?, ?, ?)",
                    (ca_type, authority.key_pem.decode(), authority.cert_pem.decode()),
                )
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)", (META_CLUSTER_NAME, cas.cluster_name)
            )
        return cas

    def load_or_create_workload(self, make: Callable[[], WorkloadKeys]) -> WorkloadKeys:
        """The SPIFFE CA and JWT key; created by ``make()`` and stored when there are none yet.

        They live in ``meta`` rows (:data:`WORKLOAD_META_KEYS`), so a database made
        before workload identity existed gains them on the first start, without a
        schema change.
        """
        with self._transaction(write=True) as conn:
            stored = {
                str(key): str(value)
                for key, value in conn.execute(
                    "SELECT key, value FROM meta WHERE key IN (?, ?, ?)", WORKLOAD_META_KEYS
                )
            }
            if stored:
                return _load_workload(stored, str(_cluster_name(conn)))
            workload = make()
            values = (
                workload.spiffe.key_pem.decode(),
                workload.spiffe.cert_pem.decode(),
                keys.private_key_pem(workload.signing_key).decode(),
            )
            for key, value in zip(WORKLOAD_META_KEYS, values, strict=True):
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        return workload


def _cluster_name(conn: _sql.Connection) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (META_CLUSTER_NAME,)).fetchone()
    return "" if row is None else str(row[0])


def _load_workload(stored: dict[str, str], trust_domain: str) -> WorkloadKeys:
    key_name, cert_name, jwt_name = WORKLOAD_META_KEYS
    try:
        spiffe = Authority.from_pem(
            SPIFFE_CA_TYPE, stored[key_name].encode(), stored[cert_name].encode()
        )
        jwt_key = keys.load_private_key_pem(stored[jwt_name].encode())
    except (KeyError, ValueError, IdentityError):
        # Not chained: the error could quote key material.
        raise AuthServiceError(
            "the SPIFFE CA or JWT key in the database is missing or damaged; "
            "restore the database from a backup"
        ) from None
    return WorkloadKeys(trust_domain=trust_domain, spiffe=spiffe, jwt_keys=(jwt_key,))


def _load(conn: _sql.Connection, name: str) -> ClusterCAs:
    rows = {
        str(ca_type): (str(key_pem), str(cert_pem))
        for ca_type, key_pem, cert_pem in conn.execute(
            "SELECT ca_type, key_pem, cert_pem FROM cert_authorities"
        )
    }
    authorities: dict[str, Authority] = {}
    for ca_type in CA_TYPES:
        try:
            key_pem, cert_pem = rows[ca_type]
            authorities[ca_type] = Authority.from_pem(ca_type, key_pem.encode(), cert_pem.encode())
        except (KeyError, ValueError, IdentityError):
            # Not chained: the error could quote key material.
            raise AuthServiceError(
                f"the {ca_type} CA in the database is missing or damaged; "
                "restore the database from a backup"
            ) from None
    return ClusterCAs(
        cluster_name=name, user=authorities["user"], host=authorities["host"], db=authorities["db"]
    )
