"""RBAC on issuing, over real TLS: logins from roles, traits, and max_session_ttl."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.serialization import ssh
from cryptography.x509.oid import NameOID

from tbot_py.authservice import admin
from tbot_py.authservice.roles import LOGINS_TRAIT, RoleConditions, new_role
from tbot_py.client import wire
from tbot_py.identity import tlsid

from .conftest import AuthClient, Issued

WEB = new_role("web", allow=RoleConditions(logins=(LOGINS_TRAIT, "deploy")))
NO_ROOT = new_role("no-root", deny=RoleConditions(logins=("root",)))
ONE_HOUR = new_role("one-hour", max_session_ttl=timedelta(hours=1))


def _join_bot(
    client: AuthClient,
    roles: tuple[str, ...],
    *,
    logins: tuple[str, ...] = ("root",),
    expires: datetime | None = None,
) -> Issued:
    for role in (WEB, NO_ROOT, ONE_HOUR):
        if client.cluster.storage.roles.get(role.name) is None:
            admin.create_role(client.cluster, role)
    created = admin.add_bot(client.cluster, "rbac", roles=roles, logins=logins)
    return client.join(created.token.token, expires=expires)


def _output(client: AuthClient, joined: Issued, **fields: object) -> Issued:
    resp, key = client.impersonate(joined, **fields)
    assert resp.status_code == 200, resp.text
    return client.save(key, wire.Certs.from_json(resp.json()))


def _ssh_cert(issued: Issued) -> ssh.SSHCertificate:
    cert = ssh.load_ssh_public_identity(issued.certs.ssh)
    assert isinstance(cert, ssh.SSHCertificate)
    return cert


def test_principals_are_the_role_logins_with_the_bots_logins_expanded(
    client: AuthClient,
) -> None:
    joined = _join_bot(client, ("web", "editor"), logins=("root", "ubuntu"))
    output = _output(client, joined)
    assert output.identity.principals == ("root", "ubuntu", "deploy")
    assert _ssh_cert(output).valid_principals == [b"root", b"ubuntu", b"deploy"]
    # The bot's own certificate gets the same logins and keeps the internal join login.
    assert joined.identity.principals == ("root", "ubuntu", "deploy", "-teleport-internal-join")


def test_deny_logins_remove_a_login(client: AuthClient) -> None:
    joined = _join_bot(client, ("web", "no-root"))
    assert _output(client, joined).identity.principals == ("deploy",)
    # Only the roles in the certificate count: without no-root, root is back.
    assert _output(client, joined, role_requests=("web",)).identity.principals == (
        "root",
        "deploy",
    )


def test_roles_without_logins_get_the_unusable_placeholder_login(client: AuthClient) -> None:
    joined = _join_bot(client, ("editor", "web"))
    output = _output(client, joined, role_requests=("editor",))
    instance = joined.identity.bot_instance_id
    assert output.identity.principals == (f"-teleport-nologin-{instance}",)


def test_traits_are_in_the_x509_subject_and_the_ssh_extension(client: AuthClient) -> None:
    joined = _join_bot(client, ("access",), logins=("root", "ubuntu"))
    for issued in (joined, _output(client, joined)):
        [postal] = issued.cert.subject.get_attributes_for_oid(NameOID.POSTAL_CODE)
        assert json.loads(str(postal.value)) == {"logins": ["root", "ubuntu"]}
        assert issued.identity.traits == {"logins": ["root", "ubuntu"]}
        exts = _ssh_cert(issued).extensions
        assert exts[tlsid.SSH_EXT_TELEPORT_TRAITS.encode()] == str(postal.value).encode()
        assert json.loads(exts[b"teleport-roles"]) == {"roles": ["access"]}


def test_ttl_is_capped_by_the_shortest_max_session_ttl_of_the_certificates_roles(
    client: AuthClient,
) -> None:
    now = datetime.now(UTC)
    joined = _join_bot(client, ("access", "one-hour"), expires=now + timedelta(hours=12))
    assert joined.cert.not_valid_after_utc > now + timedelta(hours=11)  # not for the bot itself
    asked = now + timedelta(hours=10)
    capped = _output(client, joined, expires=asked).cert.not_valid_after_utc
    assert now + timedelta(minutes=59) < capped <= datetime.now(UTC) + timedelta(hours=1)
    # Without the one-hour role in the certificate, the 30h default does not bite.
    full = _output(client, joined, expires=asked, role_requests=("access",))
    assert full.cert.not_valid_after_utc == asked.replace(microsecond=0)


def test_an_output_for_a_role_that_does_not_exist_is_refused_but_the_bot_still_renews(
    client: AuthClient,
) -> None:
    joined = _join_bot(client, ("access",))
    # As a bot created before roles existed: it names a role nobody created.
    conn = sqlite3.connect(client.cluster.storage.path)
    with conn:
        conn.execute("UPDATE bots SET roles = '[\"access\", \"legacy\"]' WHERE name = 'rbac'")
    conn.close()
    resp, _ = client.impersonate(joined, role_requests=("legacy",))
    assert resp.status_code == 403
    assert wire.error_message(resp.json()) == (
        'role "legacy" not found; create it with tbot-py auth create -f role.yaml'
    )
    renewed = client.renewed(joined)
    assert renewed.identity.groups == ("access", "legacy")
    assert renewed.identity.principals == ("root", "-teleport-internal-join")


def test_role_changes_apply_to_the_next_certificate(client: AuthClient) -> None:
    joined = _join_bot(client, ("access",))
    assert _output(client, joined).identity.principals == ("root",)
    admin.create_role(client.cluster, new_role("access"), force=True)  # no logins any more
    instance = joined.identity.bot_instance_id
    assert _output(client, joined).identity.principals == (f"-teleport-nologin-{instance}",)
    admin.update_bot_roles(client.cluster, "rbac", add=("web",), remove=("access",))
    resp, _ = client.impersonate(joined, role_requests=("access",))
    assert resp.status_code == 403
    assert _output(client, joined, role_requests=("web",)).identity.principals == (
        "root",
        "deploy",
    )
