"""mTLS bot endpoints over real TLS: renew, impersonated certs, CAs, caller checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tbot_py.authservice import admin, ca
from tbot_py.authservice.errors import AccessDenied
from tbot_py.authservice.mtls import check_bot_certificate
from tbot_py.client import wire
from tbot_py.identity import keys
from tbot_py.identity.tlsid import TLSIdentity

from .conftest import AuthClient, Issued, theft_denial


def _identity_of(certs: wire.Certs) -> TLSIdentity:
    return TLSIdentity.from_subject(x509.load_pem_x509_certificate(certs.tls).subject)


def _impersonated(client: AuthClient, joined: Issued, **fields: object) -> Issued:
    resp, key = client.impersonate(joined, **fields)
    assert resp.status_code == 200, resp.text
    return client.save(key, wire.Certs.from_json(resp.json()))


# -- renew ------------------------------------------------------------------------------


def test_renew_increments_generation_and_keeps_the_instance(
    client: AuthClient, joined: Issued
) -> None:
    renewed = client.renewed(joined)
    assert renewed.identity.generation == 2
    assert renewed.identity.bot_instance_id == joined.identity.bot_instance_id
    assert renewed.identity.renewable
    assert keys.same_public_key(renewed.cert.public_key(), renewed.key.public_key())  # type: ignore[arg-type]
    again = client.renewed(renewed)
    assert again.identity.generation == 3
    stored = client.cluster.storage.instances.get("ci", joined.identity.bot_instance_id)
    assert stored is not None and stored.generation == 3


def test_renew_with_a_stale_generation_is_refused_and_locks_the_instance(
    client: AuthClient, joined: Issued
) -> None:
    client.renewed(joined)
    resp, _ = client.renew(joined)
    assert resp.status_code == 403
    message = wire.error_message(resp.json()) or ""
    instance = joined.identity.bot_instance_id
    assert message == theft_denial(message, bot="ci", instance=instance, stored=2, presented=1)


def test_renew_with_an_impersonated_cert_is_refused(client: AuthClient, joined: Issued) -> None:
    output = _impersonated(client, joined)
    resp, _ = client.renew(output)
    assert resp.status_code == 403
    assert "impersonated" in resp.text


def test_renew_without_a_client_cert_is_refused(client: AuthClient) -> None:
    req = wire.RenewRequest(
        keys=wire.PublicKeys(
            tls=keys.public_key_pem(keys.generate_private_key().public_key()), ssh=b""
        )
    )
    resp = client.request("POST", wire.PATH_RENEW, json=req.to_json())
    assert resp.status_code == 403
    assert resp.json() == {"error": {"message": "client certificate required"}}


def test_renew_for_a_removed_bot_is_refused(client: AuthClient, joined: Issued) -> None:
    admin.remove_bot(client.cluster, "ci")
    resp, _ = client.renew(joined)
    assert resp.status_code == 403
    assert wire.error_message(resp.json()) == 'bot "ci" no longer exists'


def test_renew_with_a_bad_body_keeps_the_generation(client: AuthClient, joined: Issued) -> None:
    resp = client.request("POST", wire.PATH_RENEW, identity=joined, content=b"nope")
    assert resp.status_code == 400
    assert client.renewed(joined).identity.generation == 2


def test_renew_expiry_is_capped_at_24_hours(client: AuthClient, joined: Issued) -> None:
    now = datetime.now(UTC)
    resp, _ = client.renew(joined, expires=now + timedelta(days=30))
    assert resp.status_code == 200
    cert = x509.load_pem_x509_certificate(wire.Certs.from_json(resp.json()).tls)
    assert cert.not_valid_after_utc <= now + timedelta(hours=24, seconds=5)


# -- impersonated certificates ----------------------------------------------------------


def test_certs_default_to_all_bot_roles_and_are_not_renewable(
    client: AuthClient, joined: Issued
) -> None:
    output = _impersonated(client, joined)
    ident = output.identity
    assert ident.groups == ("access", "dev")
    assert ident.impersonator == "bot-ci"
    assert not ident.renewable and ident.generation == 0
    assert ident.disallow_reissue
    assert ident.bot_instance_id == joined.identity.bot_instance_id
    assert ident.route_to_cluster == "tbot-py.local"
    assert output.certs.tls_ca_certs == client.cluster.cas.tls_ca_certs
    assert output.certs.ssh_ca_certs == client.cluster.cas.ssh_ca_keys


def test_certs_with_a_subset_of_roles_is_allowed(client: AuthClient, joined: Issued) -> None:
    output = _impersonated(
        client, joined, role_requests=("dev",), reissuable=True, route_to_cluster="leaf"
    )
    assert output.identity.groups == ("dev",)
    assert not output.identity.disallow_reissue
    assert output.identity.route_to_cluster == "leaf"


def test_certs_with_a_role_the_bot_lacks_is_refused(client: AuthClient, joined: Issued) -> None:
    resp, _ = client.impersonate(joined, role_requests=("dev", "admin"))
    assert resp.status_code == 403
    assert wire.error_message(resp.json()) == 'role "admin" is not allowed for bot "ci"'


def test_certs_never_outlive_the_calling_bot_identity(client: AuthClient, bot_token: str) -> None:
    short = client.join(bot_token, expires=datetime.now(UTC) + timedelta(minutes=10))
    output = _impersonated(client, short, expires=datetime.now(UTC) + timedelta(hours=5))
    assert output.cert.not_valid_after_utc == short.cert.not_valid_after_utc


def test_certs_with_an_impersonated_caller_is_refused(client: AuthClient, joined: Issued) -> None:
    output = _impersonated(client, joined, reissuable=True)
    resp, _ = client.impersonate(output)
    assert resp.status_code == 403


def test_certs_with_mismatched_keys_is_a_bad_parameter(client: AuthClient, joined: Issued) -> None:
    a, b = keys.generate_private_key(), keys.generate_private_key()
    req = wire.ImpersonateRequest(
        keys=wire.PublicKeys(
            tls=keys.public_key_pem(a.public_key()), ssh=keys.ssh_public_key_line(b.public_key())
        )
    )
    resp = client.request("POST", wire.PATH_CERTS, identity=joined, json=req.to_json())
    assert resp.status_code == 400


# -- CAs ----------------------------------------------------------------------------------


def test_cas_lists_host_user_and_database_authorities(client: AuthClient, joined: Issued) -> None:
    resp = client.request("GET", wire.PATH_CAS, identity=joined)
    assert resp.status_code == 200
    cas = {c.type: c for c in wire.cert_authorities_from_json(resp.json())}
    assert set(cas) == {"host", "user", "db"}
    cluster = client.cluster.cas
    assert cas["host"].tls_certs == (cluster.host.cert_pem,)
    assert cas["host"].ssh_public_keys == (cluster.host.ssh_public_key_line,)
    assert cas["user"].tls_certs == (cluster.user.cert_pem,)
    assert cas["user"].ssh_public_keys == (cluster.user.ssh_public_key_line,)
    assert cas["db"].tls_certs == (cluster.db.cert_pem,)
    assert cas["db"].ssh_public_keys == ()
    assert {c.cluster_name for c in cas.values()} == {"tbot-py.local"}


def test_cas_refuses_impersonated_certs(client: AuthClient, joined: Issued) -> None:
    output = _impersonated(client, joined)
    assert client.request("GET", wire.PATH_CAS, identity=output).status_code == 403


def test_cas_without_a_client_cert_is_refused(client: AuthClient) -> None:
    assert client.request("GET", wire.PATH_CAS).status_code == 403


# -- caller checks (pure, injected clock) -----------------------------------------------


def _der(issued: Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.DER)


def test_expired_caller_certificate_is_refused(client: AuthClient, joined: Issued) -> None:
    later = joined.cert.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(AccessDenied, match="expired"):
        check_bot_certificate(_der(joined), client.cluster.cas, later)


def test_caller_certificate_from_another_cluster_is_refused(
    client: AuthClient, joined: Issued
) -> None:
    other = ca.create_cluster_cas("tbot-py.local", datetime.now(UTC))
    with pytest.raises(AccessDenied, match="not issued by this cluster"):
        check_bot_certificate(_der(joined), other, datetime.now(UTC))


def test_caller_certificate_checks_accept_the_bot_identity(
    client: AuthClient, joined: Issued
) -> None:
    caller = check_bot_certificate(_der(joined), client.cluster.cas, datetime.now(UTC))
    assert caller.identity == joined.identity
    assert caller.not_after == joined.cert.not_valid_after_utc


def test_non_renewable_bot_certificate_passes_the_caller_check(client: AuthClient) -> None:
    """A delegated join's certificate is the bot's own, without the renewable flag.

    It may call the bot endpoints; ``/v1/bot/renew`` refuses it by itself
    (``test_api_oidc_join.py``).
    """
    now = datetime.now(UTC)
    key = keys.generate_private_key()
    # A bot-shaped subject without the renewable flag, signed by the real user CA.
    subject = TLSIdentity(username="bot-ci", groups=("r",), bot_name="ci", bot_instance_id="i")
    cert = ca._sign_leaf(
        client.cluster.cas.user,
        subject.to_subject(),
        key.public_key(),
        not_after=now + timedelta(hours=1),
        now=now,
        usages=(ExtendedKeyUsageOID.CLIENT_AUTH,),
    )
    caller = check_bot_certificate(
        cert.public_bytes(serialization.Encoding.DER), client.cluster.cas, now
    )
    assert (caller.identity.bot_name, caller.identity.renewable) == ("ci", False)
