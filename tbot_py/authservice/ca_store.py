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
from tbot_py.errors import IdentityError

#: The ``meta`` key holding the cluster name; written last, it marks a complete cluster.
META_CLUSTER_NAME = "cluster_name"

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
