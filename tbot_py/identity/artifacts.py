"""The files an ``identity`` output writes, rendered from an identity and the cluster's CAs.

Names and formats are tbot's exactly (tbot.md §2.2, §4). Rendering is pure:
bytes in, a name → bytes mapping out, so it is tested without sockets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tbot_py.client.wire import CertAuthority
from tbot_py.identity import openssh
from tbot_py.identity.identityfile import host_ca_line, render_identity_file
from tbot_py.identity.model import (
    ARTIFACT_KEY,
    ARTIFACT_PUBLIC_KEY,
    ARTIFACT_SSH_CERT,
    ARTIFACT_TLS_CERT,
    Identity,
)

ARTIFACT_IDENTITY = "identity"
HOST_CA_FILE = "teleport-host-ca.crt"
USER_CA_FILE = "teleport-user-ca.crt"
DATABASE_CA_FILE = "teleport-database-ca.crt"
_CA_FILES = {"host": HOST_CA_FILE, "user": USER_CA_FILE, "db": DATABASE_CA_FILE}


@dataclass(frozen=True)
class SSHConfigTarget:
    """Where ssh should find the proxy and the files, for ``ssh_config`` generation."""

    proxy_host: str
    proxy_port: int
    executable: str
    tls_routing: bool = False
    connection_upgrade: bool = False


def ca_pems(cas: Sequence[CertAuthority], ca_type: str) -> bytes:
    """The PEM TLS certificates of every CA of ``ca_type``, concatenated (tbot.md §4.2)."""
    return b"".join(pem for ca in cas if ca.type == ca_type for pem in ca.tls_certs)


def host_ca_keys(cas: Sequence[CertAuthority], cluster: str) -> list[bytes]:
    """The SSH public keys of the host CAs of ``cluster`` (several during a rotation)."""
    return [
        key
        for ca in cas
        if ca.type == "host" and ca.cluster_name == cluster
        for key in ca.ssh_public_keys
    ]


def identity_output_files(
    identity: Identity,
    cas: Sequence[CertAuthority],
    *,
    known_hosts: SSHConfigTarget | None,
    ssh_config_dir: str | None = None,
) -> dict[str, bytes]:
    """Render every artifact of an identity output, in the order they should be written.

    CA files come first and the private key last, then the identity file (which is
    self-contained) and the SSH client files. ``known_hosts`` is None when the
    output has ``ssh_config: off``; ``ssh_config_dir`` is set only for directory
    destinations, the only kind that gets an ``ssh_config``.
    """
    cluster = identity.cluster_name
    host_keys = host_ca_keys(cas, cluster)
    files: dict[str, bytes] = {name: ca_pems(cas, t) for t, name in _CA_FILES.items()}
    files[ARTIFACT_TLS_CERT] = identity.tls_cert_pem
    files[ARTIFACT_SSH_CERT] = identity.ssh_cert
    files[ARTIFACT_PUBLIC_KEY] = identity.public_ssh_key
    files[ARTIFACT_KEY] = identity.private_key_pem
    files[ARTIFACT_IDENTITY] = render_identity_file(
        private_key_pem=identity.private_key_pem,
        ssh_cert=identity.ssh_cert,
        tls_cert_pem=identity.tls_cert_pem,
        ssh_ca_lines=[host_ca_line(cluster, key) for key in host_keys],
        tls_ca_pems=identity.tls_ca_pems,
    )
    if known_hosts is None:
        return files
    files[openssh.KNOWN_HOSTS] = openssh.render_known_hosts(
        known_hosts.proxy_host, [(cluster, host_keys)]
    )
    if ssh_config_dir is None:
        return files
    t = known_hosts
    files[openssh.SSH_CONFIG] = openssh.render_ssh_config(
        proxy_host=t.proxy_host,
        proxy_port=t.proxy_port,
        cluster_names=[cluster],
        destination_dir=ssh_config_dir,
        executable=t.executable,
        tls_routing=t.tls_routing,
        connection_upgrade=t.connection_upgrade,
    )
    files[openssh.cluster_ssh_config_name(cluster)] = openssh.render_cluster_ssh_config(
        proxy_host=t.proxy_host,
        proxy_port=t.proxy_port,
        cluster_name=cluster,
        destination_dir=ssh_config_dir,
        executable=t.executable,
        tls_routing=t.tls_routing,
        connection_upgrade=t.connection_upgrade,
    )
    files[openssh.cluster_known_hosts_name(cluster)] = openssh.render_cluster_known_hosts(
        cluster, host_keys
    )
    return files
