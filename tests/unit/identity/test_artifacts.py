"""identity_output_files: tbot's exact artifact names, CA files by type, and a safe order."""

from __future__ import annotations

from pathlib import Path

import pytest

from tbot_py.client.wire import CertAuthority
from tbot_py.identity import keys
from tbot_py.identity.artifacts import (
    SSHConfigTarget,
    host_ca_keys,
    identity_output_files,
)
from tbot_py.identity.identityfile import host_ca_line, parse_identity_file
from tbot_py.identity.model import Identity

from .conftest import Material

CLUSTER = "bot-ci"  # the issuer Organization of the conftest's TLS certificate
ALWAYS = {
    "teleport-host-ca.crt",
    "teleport-user-ca.crt",
    "teleport-database-ca.crt",
    "tlscert",
    "key-cert.pub",
    "key.pub",
    "key",
    "identity",
}
KEY_FILES = ("tlscert", "key-cert.pub", "key.pub", "key")
CA_FILES = ("teleport-host-ca.crt", "teleport-user-ca.crt", "teleport-database-ca.crt")
TARGET = SSHConfigTarget(
    proxy_host="proxy.example.com", proxy_port=443, executable="/usr/local/bin/tbot-py"
)


def _ssh_key() -> bytes:
    return keys.ssh_public_key_line(keys.generate_private_key().public_key())


HOST_KEY_1 = _ssh_key()
HOST_KEY_2 = _ssh_key()  # a second host CA key, as during a rotation
USER_KEY = _ssh_key()
LEAF_HOST_KEY = _ssh_key()
CAS = (
    CertAuthority("host", CLUSTER, tls_certs=(b"HOST-1\n",), ssh_public_keys=(HOST_KEY_1,)),
    CertAuthority("user", CLUSTER, tls_certs=(b"USER-1\n",), ssh_public_keys=(USER_KEY,)),
    CertAuthority("db", CLUSTER, tls_certs=(b"DB-1\n",)),
    CertAuthority("host", CLUSTER, tls_certs=(b"HOST-2\n",), ssh_public_keys=(HOST_KEY_2,)),
    CertAuthority(
        "host", "leaf.example.com", tls_certs=(b"LEAF-HOST\n",), ssh_public_keys=(LEAF_HOST_KEY,)
    ),
    CertAuthority("jwt", CLUSTER, tls_certs=(b"JWT\n",)),
)


@pytest.fixture
def identity(material: Material) -> Identity:
    identity = Identity(
        private_key_pem=material.private_key_pem,
        ssh_cert=material.ssh_cert,
        tls_cert_pem=material.tls_cert_pem,
        tls_ca_pems=(material.tls_ca_pem,),
    )
    identity.validate()
    assert identity.cluster_name == CLUSTER
    return identity


def _blob(line: bytes) -> bytes:
    return line.split()[1]


# -- names ------------------------------------------------------------------------------


def test_without_ssh_config_only_the_identity_artifacts_are_written(identity: Identity) -> None:
    files = identity_output_files(identity, CAS, known_hosts=None)
    assert set(files) == ALWAYS


def test_without_ssh_config_a_directory_still_gets_no_ssh_files(identity: Identity) -> None:
    files = identity_output_files(identity, CAS, known_hosts=None, ssh_config_dir="/out")
    assert set(files) == ALWAYS


def test_known_hosts_is_added_for_non_directory_destinations(identity: Identity) -> None:
    files = identity_output_files(identity, CAS, known_hosts=TARGET)
    assert set(files) == ALWAYS | {"known_hosts"}


def test_directory_destinations_also_get_ssh_config_and_per_cluster_files(
    identity: Identity, tmp_path: Path
) -> None:
    files = identity_output_files(identity, CAS, known_hosts=TARGET, ssh_config_dir=str(tmp_path))
    assert set(files) == ALWAYS | {
        "known_hosts",
        "ssh_config",
        f"{CLUSTER}.ssh_config",
        f"{CLUSTER}.known_hosts",
    }


# -- contents ---------------------------------------------------------------------------


def test_ca_files_hold_every_ca_of_their_type(identity: Identity) -> None:
    files = identity_output_files(identity, CAS, known_hosts=None)
    assert files["teleport-host-ca.crt"] == b"HOST-1\nHOST-2\nLEAF-HOST\n"
    assert files["teleport-user-ca.crt"] == b"USER-1\n"
    assert files["teleport-database-ca.crt"] == b"DB-1\n"
    assert not any(b"JWT" in files[name] for name in CA_FILES)


def test_ca_file_of_a_type_the_cluster_did_not_send_is_empty(identity: Identity) -> None:
    files = identity_output_files(identity, [CAS[0]], known_hosts=None)
    assert files["teleport-host-ca.crt"] == b"HOST-1\n"
    assert files["teleport-user-ca.crt"] == b""
    assert files["teleport-database-ca.crt"] == b""


def test_identity_artifacts_are_the_identitys_own_bytes(identity: Identity) -> None:
    files = identity_output_files(identity, CAS, known_hosts=None)
    assert files["tlscert"] == identity.tls_cert_pem
    assert files["key-cert.pub"] == identity.ssh_cert
    assert files["key.pub"] == identity.public_ssh_key
    assert files["key"] == identity.private_key_pem


def test_identity_file_holds_the_credentials_and_only_this_clusters_host_cas(
    identity: Identity,
) -> None:
    files = identity_output_files(identity, CAS, known_hosts=None)
    parsed = parse_identity_file(files["identity"])
    assert parsed.private_key_pem == identity.private_key_pem
    assert parsed.ssh_cert == identity.ssh_cert
    assert parsed.tls_cert_pem == identity.tls_cert_pem
    assert parsed.tls_ca_pems == identity.tls_ca_pems
    assert parsed.ssh_ca_lines == (
        host_ca_line(CLUSTER, HOST_KEY_1),
        host_ca_line(CLUSTER, HOST_KEY_2),
    )


def test_known_hosts_trusts_this_clusters_host_cas_for_the_proxy(identity: Identity) -> None:
    known_hosts = identity_output_files(identity, CAS, known_hosts=TARGET)["known_hosts"]
    lines = known_hosts.splitlines()
    assert [line.split()[:2] for line in lines] == [
        [b"@cert-authority", f"proxy.example.com,{CLUSTER},*.{CLUSTER}".encode()]
    ] * 2
    assert [line.split()[3] for line in lines] == [_blob(HOST_KEY_1), _blob(HOST_KEY_2)]
    assert _blob(USER_KEY) not in known_hosts
    assert _blob(LEAF_HOST_KEY) not in known_hosts


def test_ssh_config_points_at_the_destination_directory(identity: Identity, tmp_path: Path) -> None:
    files = identity_output_files(identity, CAS, known_hosts=TARGET, ssh_config_dir=str(tmp_path))
    config = files["ssh_config"].decode()
    assert f'IdentityFile "{tmp_path}/key"' in config
    assert f'CertificateFile "{tmp_path}/key-cert.pub"' in config
    assert f'UserKnownHostsFile "{tmp_path}/known_hosts"' in config
    assert f"Host *.{CLUSTER} proxy.example.com" in config
    cluster_config = files[f"{CLUSTER}.ssh_config"].decode()
    assert f'UserKnownHostsFile "{tmp_path}/{CLUSTER}.known_hosts"' in cluster_config
    cluster_known_hosts = files[f"{CLUSTER}.known_hosts"]
    assert _blob(HOST_KEY_1) in cluster_known_hosts
    assert _blob(LEAF_HOST_KEY) not in cluster_known_hosts


# -- order ------------------------------------------------------------------------------


def test_ca_files_come_first_and_the_key_last_among_key_files(
    identity: Identity, tmp_path: Path
) -> None:
    files = identity_output_files(identity, CAS, known_hosts=TARGET, ssh_config_dir=str(tmp_path))
    order = list(files)
    assert order[:3] == list(CA_FILES)
    key_positions = [order.index(name) for name in KEY_FILES]
    assert max(key_positions) == order.index("key")
    assert all(order.index(ca) < min(key_positions) for ca in CA_FILES)


def test_host_ca_keys_picks_host_cas_of_the_named_cluster() -> None:
    assert host_ca_keys(CAS, CLUSTER) == [HOST_KEY_1, HOST_KEY_2]
    assert host_ca_keys(CAS, "leaf.example.com") == [LEAF_HOST_KEY]
    assert host_ca_keys(CAS, "unknown.example.com") == []
