"""Certificate templates of the auth service: pure, with an injected clock."""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import ssh
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tbot_py.authservice import ca
from tbot_py.authservice.errors import BadParameter
from tbot_py.identity import keys, tlsid
from tbot_py.identity.tlsid import TLSIdentity

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
BOT = ca.BotProfile(name="ci", roles=("access", "dev"), logins=("root", "ubuntu"))
INSTANCE = "2f0c5b8e-8a53-4c1f-9f0e-0a4d1c2b3e4f"


@pytest.fixture(scope="module")
def cas() -> ca.ClusterCAs:
    return ca.create_cluster_cas("example.test", NOW)


def _ssh_cert(line: bytes) -> ssh.SSHCertificate:
    cert = ssh.load_ssh_public_identity(line)
    assert isinstance(cert, ssh.SSHCertificate)
    return cert


def test_ca_certificates_are_self_signed_ten_year_p256_cas_named_after_the_cluster(
    cas: ca.ClusterCAs,
) -> None:
    for ca_type in ca.CA_TYPES:
        cert = cas.authority(ca_type).cert
        assert cert.subject == cert.issuer
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "example.test"
        assert tlsid.cluster_name_of(cert) == "example.test"
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign and usage.crl_sign and usage.digital_signature
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert cert.not_valid_before_utc == NOW - timedelta(minutes=1)
        assert cert.not_valid_after_utc == NOW + timedelta(days=3650)
        cert.verify_directly_issued_by(cert)


def test_authority_round_trips_through_pem_and_rejects_a_foreign_key(cas: ca.ClusterCAs) -> None:
    loaded = ca.Authority.from_pem("user", cas.user.key_pem, cas.user.cert_pem)
    assert loaded.cert == cas.user.cert
    with pytest.raises(ValueError, match="does not match"):
        ca.Authority.from_pem("user", cas.host.key_pem, cas.user.cert_pem)


def test_ca_pin_is_the_host_ca_spki_hash(cas: ca.ClusterCAs) -> None:
    assert cas.ca_pin == keys.ca_pin(cas.host.cert)
    assert cas.ca_pin.startswith("sha256:") and len(cas.ca_pin) == 7 + 64


def test_bot_identity_x509_carries_the_renewable_bot_identity(cas: ca.ClusterCAs) -> None:
    key = keys.generate_private_key()
    expires = NOW + timedelta(hours=1)
    certs = ca.issue_bot_identity(
        cas,
        BOT,
        instance_id=INSTANCE,
        generation=3,
        public_key=key.public_key(),
        expires=expires,
        now=NOW,
    )
    cert = x509.load_pem_x509_certificate(certs.tls)
    cert.verify_directly_issued_by(cas.user.cert)
    assert keys.same_public_key(cert.public_key(), key.public_key())  # type: ignore[arg-type]
    assert TLSIdentity.from_subject(cert.subject) == TLSIdentity(
        username="bot-ci",
        groups=("access", "dev"),
        principals=("root", "ubuntu", tlsid.INTERNAL_JOIN_PRINCIPAL),
        route_to_cluster="example.test",
        teleport_cluster="example.test",
        renewable=True,
        generation=3,
        bot_name="ci",
        bot_instance_id=INSTANCE,
    )
    assert tlsid.cluster_name_of(cert) == "example.test"
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert cert.not_valid_after_utc == expires
    assert 0 < cert.serial_number < 2**128
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = cas.user.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert certs.tls_ca_certs == (cas.user.cert_pem, cas.host.cert_pem)
    assert certs.ssh_ca_certs == (cas.user.ssh_public_key_line, cas.host.ssh_public_key_line)


def test_bot_identity_ssh_cert_has_teleport_extensions_and_is_signed_by_user_ca(
    cas: ca.ClusterCAs,
) -> None:
    key = keys.generate_private_key()
    expires = NOW + timedelta(hours=2)
    certs = ca.issue_bot_identity(
        cas,
        BOT,
        instance_id=INSTANCE,
        generation=1,
        public_key=key.public_key(),
        expires=expires,
        now=NOW,
    )
    cert = _ssh_cert(certs.ssh)
    cert.verify_cert_signature()
    assert keys.same_public_key(cert.signature_key(), cas.user.key.public_key())  # type: ignore[arg-type]
    assert keys.same_public_key(cert.public_key(), key.public_key())  # type: ignore[arg-type]
    assert cert.type == ssh.SSHCertificateType.USER
    assert cert.key_id == b"bot-ci"
    assert cert.valid_principals == [b"root", b"ubuntu", b"-teleport-internal-join"]
    assert cert.valid_after == int((NOW - timedelta(minutes=1)).timestamp())
    assert cert.valid_before == int(expires.timestamp())
    assert cert.extensions == {
        b"permit-pty": b"",
        b"permit-agent-forwarding": b"",
        b"permit-port-forwarding": b"",
        b"teleport-roles": b'{"roles":["access","dev"]}',
        b"teleport-route-to-cluster": b"example.test",
        b"bot-name@goteleport.com": b"ci",
        b"bot-instance-id@goteleport.com": INSTANCE.encode(),
        b"renewable": b"",
        b"generation": b"1",
    }
    assert certs.ssh.endswith(b"\n")


def test_bot_without_logins_gets_an_unusable_placeholder_login(cas: ca.ClusterCAs) -> None:
    bot = ca.BotProfile(name="ci", roles=("access",))
    assert ca.bot_principals(bot, INSTANCE, internal_join=False) == (
        f"-teleport-nologin-{INSTANCE}",
    )
    assert ca.bot_principals(bot, INSTANCE, internal_join=True) == (
        f"-teleport-nologin-{INSTANCE}",
        tlsid.INTERNAL_JOIN_PRINCIPAL,
    )


@pytest.mark.parametrize("reissuable", [False, True])
def test_impersonated_identity_is_not_renewable_and_names_its_impersonator(
    cas: ca.ClusterCAs, reissuable: bool
) -> None:
    key = keys.generate_private_key()
    certs = ca.issue_impersonated_identity(
        cas,
        BOT,
        instance_id=INSTANCE,
        roles=("dev",),
        public_key=key.public_key(),
        expires=NOW + timedelta(minutes=20),
        reissuable=reissuable,
        route_to_cluster="",
        now=NOW,
    )
    ident = TLSIdentity.from_subject(x509.load_pem_x509_certificate(certs.tls).subject)
    assert ident.username == "bot-ci"
    assert ident.groups == ("dev",)
    assert ident.principals == ("root", "ubuntu")
    assert ident.impersonator == "bot-ci"
    assert not ident.renewable and ident.generation == 0
    assert ident.disallow_reissue is not reissuable
    assert ident.route_to_cluster == "example.test"
    assert (ident.bot_name, ident.bot_instance_id) == ("ci", INSTANCE)
    exts = _ssh_cert(certs.ssh).extensions
    assert exts[b"impersonator"] == b"bot-ci"
    assert (b"disallow-reissue" in exts) is not reissuable
    assert b"renewable" not in exts and b"generation" not in exts
    assert exts[b"teleport-roles"] == b'{"roles":["dev"]}'


def test_grant_expiry_defaults_to_one_hour() -> None:
    assert ca.grant_expiry(None, NOW) == NOW + timedelta(hours=1)


def test_grant_expiry_caps_at_24_hours_and_at_not_after() -> None:
    assert ca.grant_expiry(NOW + timedelta(days=3), NOW) == NOW + timedelta(hours=24)
    limit = NOW + timedelta(minutes=5)
    assert ca.grant_expiry(NOW + timedelta(hours=1), NOW, not_after=limit) == limit


def test_grant_expiry_truncates_to_whole_seconds() -> None:
    requested = NOW + timedelta(minutes=30, microseconds=999_999)
    assert ca.grant_expiry(requested, NOW) == NOW + timedelta(minutes=30)


@pytest.mark.parametrize("delta", [timedelta(0), timedelta(seconds=-1)])
def test_grant_expiry_refuses_an_expiry_not_in_the_future(delta: timedelta) -> None:
    with pytest.raises(BadParameter, match="not in the future"):
        ca.grant_expiry(NOW + delta, NOW)


def test_server_certificate_is_signed_by_host_ca_for_listen_public_and_default_names(
    cas: ca.ClusterCAs,
) -> None:
    key = keys.generate_private_key()
    cert = ca.issue_server_certificate(
        cas, key.public_key(), hosts=["10.1.2.3", "auth.example.test", "myhost"], now=NOW
    )
    cert.verify_directly_issued_by(cas.host.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert dns >= {
        "auth.example.test",
        "myhost",
        "localhost",
        "teleport.cluster.local",
        "*.teleport.cluster.local",
    }
    assert ips == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_export_formats_follow_teleport(cas: ca.ClusterCAs) -> None:
    host_key = cas.host.ssh_public_key_line.decode().strip()
    user_key = cas.user.ssh_public_key_line.decode().strip()
    host_line = f"@cert-authority example.test,*.example.test {host_key} type=host\n"
    user_line = f"cert-authority {user_key} clustername=example.test&type=user\n"
    assert ca.export_authority(cas, "host").decode() == host_line
    assert ca.export_authority(cas, "user").decode() == user_line
    assert ca.export_authority(cas, "").decode() == host_line + user_line
    assert ca.export_authority(cas, "tls") == cas.host.cert_pem
    assert ca.export_authority(cas, "tls-host") == cas.host.cert_pem
    assert ca.export_authority(cas, "tls-user") == cas.user.cert_pem
    assert ca.export_authority(cas, "db") == cas.db.cert_pem


def test_export_of_an_unknown_type_is_a_bad_parameter(cas: ca.ClusterCAs) -> None:
    with pytest.raises(BadParameter, match="unsupported export type"):
        ca.export_authority(cas, "windows")


def test_teleport_roles_extension_is_compact_json(cas: ca.ClusterCAs) -> None:
    ident = TLSIdentity(username="bot-x", groups=("a", "b"), route_to_cluster="c")
    assert json.loads(ca.ssh_extensions(ident)["teleport-roles"]) == {"roles": ["a", "b"]}
    assert " " not in ca.ssh_extensions(ident)["teleport-roles"]
