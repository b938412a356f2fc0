"""Identity: validating what the auth service issued, and tbot's bot storage artifacts."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import ssh
from cryptography.x509.oid import NameOID

from tbot_py.authservice import admin, ca
from tbot_py.authservice.cluster import Cluster
from tbot_py.authservice.server import start_in_thread
from tbot_py.client import tls, wire
from tbot_py.client.http import AuthClient
from tbot_py.errors import IdentityError
from tbot_py.identity import keys
from tbot_py.identity.model import (
    ARTIFACT_KEY,
    ARTIFACT_PUBLIC_KEY,
    ARTIFACT_SSH_CAS,
    ARTIFACT_SSH_CERT,
    ARTIFACT_TLS_CAS,
    ARTIFACT_TLS_CERT,
    ARTIFACT_TOKEN_HASH,
    BOT_ARTIFACTS,
    Identity,
    split_pem_certs,
)
from tests.unit.conftest import create_login_roles

BOT = "model"
TOKEN_HASH = keys.token_hash("the-join-token")
REQUIRED = (ARTIFACT_KEY, ARTIFACT_SSH_CERT, ARTIFACT_TLS_CERT, ARTIFACT_TLS_CAS)


@dataclass(frozen=True)
class Joined:
    """A bot identity issued by a real auth service over a real token join."""

    cluster: Cluster
    key: keys.PrivateKey
    certs: wire.Certs


def _public_keys(key: keys.PrivateKey) -> wire.PublicKeys:
    public = key.public_key()
    return wire.PublicKeys(tls=keys.public_key_pem(public), ssh=keys.ssh_public_key_line(public))


@pytest.fixture(scope="module")
def joined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Joined]:
    data_dir = tmp_path_factory.mktemp("model") / "auth"
    with start_in_thread(data_dir) as service:
        create_login_roles(service.cluster, "dev")
        token = admin.add_bot(
            service.cluster, BOT, roles=("access", "dev"), logins=("root",)
        ).token.token
        key = keys.generate_private_key()
        ctx = tls.verified_context(service.cluster.cas.host.cert_pem.decode())

        async def join() -> wire.Certs:
            async with AuthClient(service.addr, ctx, timeout=5.0) as client:
                request = wire.RegisterUsingTokenRequest(token=token, keys=_public_keys(key))
                return await client.register_using_token(request)

        yield Joined(cluster=service.cluster, key=key, certs=asyncio.run(join()))


@pytest.fixture(scope="module")
def identity(joined: Joined) -> Identity:
    return Identity.from_certs(joined.key, joined.certs)


def _issue_for(cluster: Cluster, key: keys.PrivateKey) -> wire.Certs:
    """Another bot identity from the same cluster CAs, for ``key`` (no network needed)."""
    now = datetime.datetime.now(datetime.UTC)
    return ca.issue_bot_identity(
        cluster.cas,
        ca.BotProfile(name=BOT, roles=("access",), logins=("root",)),
        instance_id="00000000-0000-4000-8000-000000000000",
        generation=1,
        public_key=key.public_key(),
        expires=now + datetime.timedelta(hours=1),
        now=now,
    )


def _throwaway_ssh_cert(key: keys.PrivateKey, principals: list[bytes] | None) -> bytes:
    """An SSH user certificate for ``key`` signed by a CA nobody else knows."""
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(key.public_key())
        .serial(7)
        .type(ssh.SSHCertificateType.USER)
        .key_id(b"bot-model")
        .valid_after(now - 60)
        .valid_before(now + 3600)
    )
    builder = (
        builder.valid_for_all_principals()
        if principals is None
        else builder.valid_principals(principals)
    )
    return builder.sign(keys.generate_private_key()).public_bytes() + b"\n"


def _tls_cert_with_issuer(key: keys.PrivateKey, issuer: x509.Name) -> bytes:
    """A TLS certificate for ``key`` signed by a throwaway CA named ``issuer``."""
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bot-model")]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(keys.generate_private_key(), hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# -- from_certs -------------------------------------------------------------------------


def test_real_issued_identity_is_accepted_with_its_facts(
    joined: Joined, identity: Identity
) -> None:
    assert identity.cluster_name == joined.cluster.name
    assert identity.username == f"bot-{BOT}"
    assert identity.roles == ("access", "dev")
    assert identity.principals == ("root", "-teleport-internal-join")
    assert identity.tls_identity.renewable
    assert identity.tls_identity.generation == 1
    assert identity.tls_identity.bot_name == BOT
    assert keys.load_private_key_pem(identity.private_key_pem).private_numbers() == (
        joined.key.private_numbers()
    )
    assert identity.public_ssh_key == keys.ssh_public_key_line(joined.key.public_key())


def test_from_certs_keeps_the_cluster_cas_one_pem_and_one_line_each(
    joined: Joined, identity: Identity
) -> None:
    assert identity.tls_ca_pems == joined.cluster.cas.tls_ca_certs
    assert identity.ssh_ca_lines == tuple(
        line.strip() + b"\n" for line in joined.cluster.cas.ssh_ca_keys
    )
    assert all(line.count(b"\n") == 1 for line in identity.ssh_ca_lines)


def test_from_certs_splits_concatenated_ca_pems_and_terminates_the_ssh_line(
    joined: Joined,
) -> None:
    user_pem, host_pem = joined.cluster.cas.tls_ca_certs
    certs = wire.Certs(
        ssh=joined.certs.ssh.rstrip(b"\n"),
        tls=joined.certs.tls,
        tls_ca_certs=(user_pem + host_pem,),
        ssh_ca_certs=(b"  " + joined.cluster.cas.ssh_ca_keys[0].strip() + b"  \n\n",),
    )
    got = Identity.from_certs(joined.key, certs)
    assert got.ssh_cert == joined.certs.ssh.rstrip(b"\n") + b"\n"
    assert got.tls_ca_pems == (user_pem, host_pem)
    assert got.ssh_ca_lines == (joined.cluster.cas.ssh_ca_keys[0].strip() + b"\n",)


def test_is_valid_at_covers_not_before_up_to_but_excluding_not_after(identity: Identity) -> None:
    second = datetime.timedelta(seconds=1)
    assert identity.is_valid_at(identity.not_before)
    assert identity.is_valid_at(identity.not_after - second)
    assert not identity.is_valid_at(identity.not_after)
    assert not identity.is_valid_at(identity.not_before - second)


def test_key_that_does_not_match_the_tls_certificate_is_refused(joined: Joined) -> None:
    other = _issue_for(joined.cluster, keys.generate_private_key())
    certs = wire.Certs(ssh=joined.certs.ssh, tls=other.tls, tls_ca_certs=other.tls_ca_certs)
    with pytest.raises(IdentityError, match=r"^private key does not match the TLS certificate$"):
        Identity.from_certs(joined.key, certs)


def test_key_that_does_not_match_the_ssh_certificate_is_refused(joined: Joined) -> None:
    other = _issue_for(joined.cluster, keys.generate_private_key())
    certs = wire.Certs(ssh=other.ssh, tls=joined.certs.tls, tls_ca_certs=other.tls_ca_certs)
    with pytest.raises(IdentityError, match=r"^private key does not match the SSH certificate$"):
        Identity.from_certs(joined.key, certs)


def test_issued_certs_for_the_key_are_accepted_by_the_same_check(joined: Joined) -> None:
    # The control for the two tests above: the same construction with matching keys passes.
    key = keys.generate_private_key()
    other = _issue_for(joined.cluster, key)
    assert Identity.from_certs(key, other).roles == ("access",)


@pytest.mark.parametrize(
    "principals", [None, [b""], [b"root", b""]], ids=["none", "empty", "one-empty"]
)
def test_ssh_certificate_without_principals_is_refused(
    joined: Joined, principals: list[bytes] | None
) -> None:
    certs = wire.Certs(ssh=_throwaway_ssh_cert(joined.key, principals), tls=joined.certs.tls)
    with pytest.raises(IdentityError, match="SSH certificate has no principals"):
        Identity.from_certs(joined.key, certs)


def test_ssh_certificate_with_principals_from_another_ca_passes_the_principal_check(
    joined: Joined,
) -> None:
    # The control for the test above: the throwaway CA itself is not what is refused.
    certs = wire.Certs(ssh=_throwaway_ssh_cert(joined.key, [b"root"]), tls=joined.certs.tls)
    assert Identity.from_certs(joined.key, certs).principals == ("root",)


def test_plain_ssh_key_instead_of_a_certificate_is_refused(joined: Joined) -> None:
    certs = wire.Certs(ssh=keys.ssh_public_key_line(joined.key.public_key()), tls=joined.certs.tls)
    with pytest.raises(IdentityError, match="holds a plain key, not a certificate"):
        Identity.from_certs(joined.key, certs)


def test_tls_issuer_without_organization_is_refused(joined: Joined) -> None:
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-org-ca")])
    certs = wire.Certs(ssh=joined.certs.ssh, tls=_tls_cert_with_issuer(joined.key, issuer))
    with pytest.raises(IdentityError, match=r"issuer has no Organization \(cluster name\)"):
        Identity.from_certs(joined.key, certs)


def test_cluster_name_is_the_first_organization_of_the_issuer(joined: Joined) -> None:
    issuer = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "first.example.com"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "second.example.com"),
        ]
    )
    certs = wire.Certs(ssh=joined.certs.ssh, tls=_tls_cert_with_issuer(joined.key, issuer))
    assert Identity.from_certs(joined.key, certs).cluster_name == "first.example.com"


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("tls", b"not a certificate", "TLS certificate is not valid PEM"),
        ("ssh", b"ssh-ed25519-cert-v01@openssh.com AAAA\n", "SSH certificate is not valid"),
        (
            "tls_ca_certs",
            (b"-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n",),
            "a TLS CA certificate is not valid PEM",
        ),
    ],
)
def test_malformed_parts_are_an_identity_error(
    joined: Joined, field: str, value: object, problem: str
) -> None:
    parts = {"ssh": joined.certs.ssh, "tls": joined.certs.tls, "tls_ca_certs": ()}
    parts[field] = value  # type: ignore[assignment]
    with pytest.raises(IdentityError, match=problem):
        Identity.from_certs(joined.key, wire.Certs(**parts))  # type: ignore[arg-type]


# -- bot artifacts ----------------------------------------------------------------------


def test_bot_artifacts_round_trip(identity: Identity) -> None:
    files = identity.to_bot_artifacts(TOKEN_HASH)
    loaded = Identity.from_bot_artifacts(dict(files))
    assert loaded == (identity, TOKEN_HASH)


def test_bot_artifacts_are_tbots_eight_files_with_the_key_written_last(
    identity: Identity,
) -> None:
    files = identity.to_bot_artifacts(TOKEN_HASH)
    assert set(files) == set(BOT_ARTIFACTS)
    order = list(files)
    assert order[-1] == ARTIFACT_KEY
    assert order.index(ARTIFACT_TLS_CERT) < order.index(ARTIFACT_PUBLIC_KEY)
    assert order.index(ARTIFACT_SSH_CERT) < order.index(ARTIFACT_PUBLIC_KEY)
    assert files[ARTIFACT_KEY] == identity.private_key_pem
    assert files[ARTIFACT_PUBLIC_KEY] == identity.public_ssh_key
    assert files[ARTIFACT_TOKEN_HASH] == TOKEN_HASH.encode()


def test_ca_lists_are_joined_with_a_dollar_and_split_back(
    joined: Joined, identity: Identity
) -> None:
    user_pem, host_pem = joined.cluster.cas.tls_ca_certs
    files = identity.to_bot_artifacts(TOKEN_HASH)
    assert files[ARTIFACT_TLS_CAS] == user_pem + b"$" + host_pem
    assert files[ARTIFACT_SSH_CAS] == b"$".join(identity.ssh_ca_lines)
    assert files[ARTIFACT_SSH_CAS].count(b"$") == 1
    loaded = Identity.from_bot_artifacts(dict(files))
    assert loaded is not None
    assert loaded[0].tls_ca_pems == (user_pem, host_pem)
    assert loaded[0].ssh_ca_lines == identity.ssh_ca_lines


def test_ca_list_with_empty_parts_between_dollars_drops_them(identity: Identity) -> None:
    files: dict[str, bytes | None] = dict(identity.to_bot_artifacts(TOKEN_HASH))
    files[ARTIFACT_TLS_CAS] = b"$\n$" + b"$".join(identity.tls_ca_pems) + b"$"
    loaded = Identity.from_bot_artifacts(files)
    assert loaded is not None
    assert loaded[0].tls_ca_pems == identity.tls_ca_pems


@pytest.mark.parametrize("name", REQUIRED)
@pytest.mark.parametrize("value", [None, b""], ids=["missing", "empty"])
def test_missing_or_empty_required_file_means_nothing_is_stored(
    identity: Identity, name: str, value: bytes | None
) -> None:
    files: dict[str, bytes | None] = dict(identity.to_bot_artifacts(TOKEN_HASH))
    files[name] = value
    assert Identity.from_bot_artifacts(files) is None


def test_nothing_stored_at_all_loads_as_none() -> None:
    assert Identity.from_bot_artifacts({}) is None
    assert Identity.from_bot_artifacts(dict.fromkeys(BOT_ARTIFACTS)) is None


def test_optional_files_may_be_missing(identity: Identity) -> None:
    files: dict[str, bytes | None] = dict(identity.to_bot_artifacts(TOKEN_HASH))
    files[ARTIFACT_SSH_CAS] = None
    files[ARTIFACT_TOKEN_HASH] = None
    files[ARTIFACT_PUBLIC_KEY] = None
    loaded = Identity.from_bot_artifacts(files)
    assert loaded is not None
    stored, token_hash = loaded
    assert token_hash == ""
    assert stored.ssh_ca_lines == ()
    assert stored.tls_cert_pem == identity.tls_cert_pem


def test_token_hash_is_read_without_surrounding_whitespace(identity: Identity) -> None:
    files: dict[str, bytes | None] = dict(identity.to_bot_artifacts(TOKEN_HASH))
    files[ARTIFACT_TOKEN_HASH] = TOKEN_HASH.encode() + b"\n"
    loaded = Identity.from_bot_artifacts(files)
    assert loaded is not None
    assert loaded[1] == TOKEN_HASH


def test_stored_key_of_another_identity_is_an_identity_error(identity: Identity) -> None:
    files: dict[str, bytes | None] = dict(identity.to_bot_artifacts(TOKEN_HASH))
    files[ARTIFACT_KEY] = keys.private_key_pem(keys.generate_private_key())
    with pytest.raises(IdentityError, match="private key does not match the TLS certificate"):
        Identity.from_bot_artifacts(files)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (ARTIFACT_KEY, "private key is not a valid unencrypted PEM key"),
        (ARTIFACT_SSH_CERT, "SSH certificate is not valid"),
        (ARTIFACT_TLS_CERT, "TLS certificate is not valid PEM"),
    ],
)
def test_stored_junk_is_an_identity_error(identity: Identity, name: str, problem: str) -> None:
    files: dict[str, bytes | None] = dict(identity.to_bot_artifacts(TOKEN_HASH))
    files[name] = b"junk"
    with pytest.raises(IdentityError, match=problem):
        Identity.from_bot_artifacts(files)


def test_stored_tls_ca_list_with_a_broken_part_is_an_identity_error(identity: Identity) -> None:
    files: dict[str, bytes | None] = dict(identity.to_bot_artifacts(TOKEN_HASH))
    files[ARTIFACT_TLS_CAS] = identity.tls_ca_pems[0] + b"$not a pem"
    with pytest.raises(IdentityError, match="a TLS CA certificate is not valid PEM"):
        Identity.from_bot_artifacts(files)


def test_stored_token_hash_that_is_not_text_is_an_identity_error(identity: Identity) -> None:
    files: dict[str, bytes | None] = dict(identity.to_bot_artifacts(TOKEN_HASH))
    files[ARTIFACT_TOKEN_HASH] = b"\xff\xfe\x00junk"
    with pytest.raises(IdentityError):
        Identity.from_bot_artifacts(files)


# -- split_pem_certs --------------------------------------------------------------------


def test_split_pem_certs_returns_each_certificate_once(joined: Joined) -> None:
    user_pem, host_pem = joined.cluster.cas.tls_ca_certs
    data = b"# comment\n" + user_pem + b"\nnoise between\n" + host_pem.rstrip(b"\n")
    assert split_pem_certs(data) == (user_pem, host_pem)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"no pem here",
        b"-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nunterminated\n",
        b"-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n",
    ],
)
def test_split_pem_certs_finds_nothing_without_complete_certificate_blocks(data: bytes) -> None:
    assert split_pem_certs(data) == ()


def test_split_pem_certs_output_loads_with_cryptography(joined: Joined) -> None:
    blocks = split_pem_certs(b"".join(joined.cluster.cas.tls_ca_certs))
    names = [x509.load_pem_x509_certificate(b).subject for b in blocks]
    assert names == [joined.cluster.cas.user.cert.subject, joined.cluster.cas.host.cert.subject]
