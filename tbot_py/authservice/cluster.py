"""The auth service's data directory: CA keys, the state database and the init lock.

Layout with the default SQLite storage (directory 0700, every file 0600)::

    DIR/init.lock                 flock held while creating or loading the cluster
    DIR/state.db (+ -wal, -shm)   SQLite state, including the cluster name
    DIR/{user,host,db}_ca.key     CA private keys, PKCS#8 PEM
    DIR/{user,host,db}_ca.crt     CA certificates, PEM
    DIR/spiffe_ca.{key,crt}       SPIFFE CA (workload identity), created on first start
    DIR/jwt.key                   JWT-SVID signing key, PKCS#8 PEM, created on first start
    DIR/server.key                HTTPS server key, new on every start
    DIR/server.crt                HTTPS server certificate + host CA certificate

The first command to use a directory creates the cluster while holding an
exclusive flock on ``init.lock``, so two processes started together cannot
create two sets of CAs. The cluster name is written to the database last: a
directory without it was never completely initialised and is initialised again.

With ``--storage postgres://...`` the state and the CAs live in PostgreSQL,
shared by every replica (:mod:`.ca_store`), and the data directory holds only
this replica's ``server.key``, ``server.crt`` and the audit log.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tbot_py.authservice.ca import (
    CA_TYPES,
    Authority,
    ClusterCAs,
    create_cluster_cas,
    issue_server_certificate,
)
from tbot_py.authservice.ca_store import META_CLUSTER_NAME
from tbot_py.authservice.errors import AuthServiceError, BadParameter, ClusterNotInitialized
from tbot_py.authservice.storage import Storage, is_postgres_url
from tbot_py.authservice.workload import SPIFFE_CA_TYPE, WorkloadKeys, create_workload_keys
from tbot_py.destinations.fs import write_file_atomic
from tbot_py.errors import IdentityError
from tbot_py.identity import keys

DEFAULT_CLUSTER_NAME = "tbot-py.local"
STATE_DB = "state.db"
INIT_LOCK = "init.lock"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"
JWT_KEY = "jwt.key"

# A DNS-like name: it appears in host CA export lines and in certificate subjects.
_CLUSTER_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


class DataDirError(AuthServiceError):
    """The data directory cannot be used (damaged, unreadable)."""


@dataclass(frozen=True)
class Cluster:
    """An opened data directory: the cluster name, its CAs and its state."""

    data_dir: Path
    name: str
    cas: ClusterCAs
    storage: Storage
    workload: WorkloadKeys

    @property
    def ca_pin(self) -> str:
        """The CA pin clients use on first contact (the host CA's SPKI hash)."""
        return self.cas.ca_pin


@dataclass(frozen=True)
class ServerCredentials:
    """Where the freshly issued HTTPS server key and certificate chain were written."""

    cert_path: Path
    key_path: Path


def ca_key_path(data_dir: Path, ca_type: str) -> Path:
    """The private key file of CA ``ca_type``."""
    return data_dir / f"{ca_type}_ca.key"


def ca_cert_path(data_dir: Path, ca_type: str) -> Path:
    """The certificate file of CA ``ca_type``."""
    return data_dir / f"{ca_type}_ca.crt"


def open_cluster(
    data_dir: Path,
    *,
    cluster_name: str | None = None,
    create: bool = True,
    now: datetime | None = None,
    storage: str | None = None,
) -> Cluster:
    """Open the cluster in ``data_dir``, creating directory, CAs and database on first use.

    ``cluster_name`` (default :data:`DEFAULT_CLUSTER_NAME`) names a new
    cluster; for an existing one it must match. With ``create=False`` a
    directory without a cluster raises ClusterNotInitialized. ``storage``, a
    ``postgres://`` URL, keeps the state and the CAs in that database instead.
    """
    if cluster_name is not None:
        validate_cluster_name(cluster_name)
    if storage:
        return _open_shared_cluster(
            data_dir, storage, cluster_name=cluster_name, create=create, now=now
        )
    if not create and not (data_dir / STATE_DB).is_file():
        raise ClusterNotInitialized(_not_initialized(data_dir))
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _init_lock(data_dir):
        state = Storage.open(data_dir / STATE_DB)
        existing = state.get_meta(META_CLUSTER_NAME)
        if existing is None:
            if not create:
                raise ClusterNotInitialized(_not_initialized(data_dir))
            name = cluster_name or DEFAULT_CLUSTER_NAME
            cas = _create_cluster(data_dir, state, name, now or datetime.now(UTC))
        else:
            _check_cluster_name(str(data_dir), existing, cluster_name)
            cas = _load_cas(data_dir, existing)
        workload = _load_or_create_workload(data_dir, cas.cluster_name, now or datetime.now(UTC))
    return Cluster(
        data_dir=data_dir, name=cas.cluster_name, cas=cas, storage=state, workload=workload
    )


def _open_shared_cluster(
    data_dir: Path,
    url: str,
    *,
    cluster_name: str | None,
    create: bool,
    now: datetime | None,
) -> Cluster:
    if not is_postgres_url(url):
        raise BadParameter(
            f"invalid --storage {url.partition(':')[0]!r} URL: use postgres://USER@HOST:PORT/DB, "
            "or leave it out for SQLite in --data-dir"
        )
    state = Storage.open_postgres(url)
    name = cluster_name or DEFAULT_CLUSTER_NAME

    def make() -> ClusterCAs:
        return create_cluster_cas(name, now or datetime.now(UTC))

    cas = state.cert_authorities.load_or_create(make if create else None)
    if cas is None:
        raise ClusterNotInitialized(
            f"no cluster in {state.backend.location}; create one with 'tbot-py auth start'"
        )
    _check_cluster_name(state.backend.location, cas.cluster_name, cluster_name)
    workload = state.cert_authorities.load_or_create_workload(
        lambda: create_workload_keys(cas.cluster_name, now or datetime.now(UTC))
    )
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Cluster(
        data_dir=data_dir, name=cas.cluster_name, cas=cas, storage=state, workload=workload
    )


def _check_cluster_name(where: str, existing: str, wanted: str | None) -> None:
    if wanted is not None and wanted != existing:
        raise BadParameter(
            f"{where} already holds cluster {existing!r}, not {wanted!r}; "
            "drop --cluster-name or use another --data-dir"
        )


def read_ca_pin(data_dir: Path, storage: str | None = None) -> str:
    """The CA pin of an existing cluster; ClusterNotInitialized when there is none."""
    return open_cluster(data_dir, create=False, storage=storage).ca_pin


def validate_cluster_name(name: str) -> None:
    """Raise BadParameter unless ``name`` is a DNS-like cluster name."""
    if not _CLUSTER_NAME_RE.match(name):
        raise BadParameter(
            f"invalid cluster name {name!r}: use letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )


def write_server_credentials(
    cluster: Cluster, hosts: Iterable[str], now: datetime | None = None
) -> ServerCredentials:
    """Issue a fresh HTTPS server key and certificate for ``hosts`` and save them (0600).

    The certificate file holds the leaf followed by the host CA certificate,
    the chain the server presents.
    """
    now = now or datetime.now(UTC)
    key = keys.generate_private_key()
    cert = issue_server_certificate(cluster.cas, key.public_key(), hosts=hosts, now=now)
    creds = ServerCredentials(
        cert_path=cluster.data_dir / SERVER_CERT, key_path=cluster.data_dir / SERVER_KEY
    )
    with _init_lock(cluster.data_dir):
        write_private_file(creds.key_path, keys.private_key_pem(key))
        write_private_file(
            creds.cert_path,
            cert.public_bytes(serialization.Encoding.PEM) + cluster.cas.host.cert_pem,
        )
    return creds


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600, durable on return.

    Temp file, fsync, rename, fsync the directory, as for the daemon's credentials.
    """
    write_file_atomic(path, data)


def _create_cluster(data_dir: Path, storage: Storage, name: str, now: datetime) -> ClusterCAs:
    # The directory may have existed (an empty dir made by the admin); it holds CA keys now.
    os.chmod(data_dir, 0o700)
    cas = create_cluster_cas(name, now)
    for ca_type in CA_TYPES:
        authority = cas.authority(ca_type)
        write_private_file(ca_key_path(data_dir, ca_type), authority.key_pem)
        write_private_file(ca_cert_path(data_dir, ca_type), authority.cert_pem)
    # Last: its presence marks the directory as completely initialised.
    storage.set_meta(META_CLUSTER_NAME, name)
    return cas


def _load_cas(data_dir: Path, name: str) -> ClusterCAs:
    authorities: dict[str, Authority] = {}
    for ca_type in CA_TYPES:
        key_path, cert_path = ca_key_path(data_dir, ca_type), ca_cert_path(data_dir, ca_type)
        try:
            authorities[ca_type] = Authority.from_pem(
                ca_type, key_path.read_bytes(), cert_path.read_bytes()
            )
        except (OSError, ValueError, IdentityError) as exc:
            # None of these messages carries key material.
            raise DataDirError(
                f"cannot load the {ca_type} CA from {data_dir}: {exc}; "
                "restore the data directory from a backup"
            ) from None
    return ClusterCAs(
        cluster_name=name,
        user=authorities["user"],
        host=authorities["host"],
        db=authorities["db"],
    )


def _load_or_create_workload(data_dir: Path, trust_domain: str, now: datetime) -> WorkloadKeys:
    """The SPIFFE CA and JWT key files; made on the first start, also of an older directory.

    Called with the init lock held. The JWT key is written last: with it present, the
    SPIFFE CA is too.
    """
    spiffe_key, spiffe_cert = ca_key_path(data_dir, "spiffe"), ca_cert_path(data_dir, "spiffe")
    jwt_path = data_dir / JWT_KEY
    if not jwt_path.exists():
        workload = create_workload_keys(trust_domain, now)
        write_private_file(spiffe_key, workload.spiffe.key_pem)
        write_private_file(spiffe_cert, workload.spiffe.cert_pem)
        write_private_file(jwt_path, keys.private_key_pem(workload.signing_key))
        return workload
    try:
        spiffe = Authority.from_pem(
            SPIFFE_CA_TYPE, spiffe_key.read_bytes(), spiffe_cert.read_bytes()
        )
        jwt_key = keys.load_private_key_pem(jwt_path.read_bytes())
    except (OSError, ValueError, IdentityError) as exc:
        # None of these messages carries key material.
        raise DataDirError(
            f"cannot load the SPIFFE CA or JWT key from {data_dir}: {exc}; "
            "restore the data directory from a backup"
        ) from None
    return WorkloadKeys(trust_domain=trust_domain, spiffe=spiffe, jwt_keys=(jwt_key,))


def _not_initialized(data_dir: Path) -> str:
    return (
        f"no cluster in {data_dir}; create one with "
        f"'tbot-py auth start --data-dir {data_dir}' or 'tbot-py auth bots add'"
    )


@contextmanager
def _init_lock(data_dir: Path) -> Iterator[None]:
    fd = os.open(data_dir / INIT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
