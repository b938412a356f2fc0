"""The per-process memory of checked bot certificates: same answers, fewer signature checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tbot_py.authservice import app, ca, mtls
from tbot_py.authservice.errors import AccessDenied
from tbot_py.identity import keys

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
EXPIRES = NOW + timedelta(hours=1)


@pytest.fixture(scope="module")
def cas() -> ca.ClusterCAs:
    return ca.create_cluster_cas("example.test", NOW)


def _bot_cert_der(cas: ca.ClusterCAs, instance: str = "i-1") -> bytes:
    certs = ca.issue_bot_identity(
        cas,
        ca.BotProfile(name="ci", roles=("access",)),
        instance_id=instance,
        generation=1,
        public_key=keys.generate_private_key().public_key(),
        expires=EXPIRES,
        now=NOW,
    )
    return x509.load_pem_x509_certificate(certs.tls).public_bytes(serialization.Encoding.DER)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[bytes | None]:
    """Every certificate the real check is run on."""
    seen: list[bytes | None] = []

    def counting(der: bytes | None, cas: ca.ClusterCAs, now: datetime) -> mtls.BotCaller:
        seen.append(der)
        return mtls.check_bot_certificate(der, cas, now)

    monkeypatch.setattr(app, "check_bot_certificate", counting)
    return seen


def test_a_certificate_is_checked_once_while_it_stays_valid(
    cas: ca.ClusterCAs, checks: list[bytes | None]
) -> None:
    callers = app.VerifiedCallers(cas)
    der = _bot_cert_der(cas)
    first = callers.check(der, NOW)
    assert callers.check(der, NOW + timedelta(minutes=30)) == first
    assert first == mtls.check_bot_certificate(der, cas, NOW)
    assert checks == [der]


def test_a_remembered_certificate_is_refused_once_it_expires(
    cas: ca.ClusterCAs, checks: list[bytes | None]
) -> None:
    callers = app.VerifiedCallers(cas)
    der = _bot_cert_der(cas)
    callers.check(der, NOW)
    with pytest.raises(AccessDenied, match="expired"):
        callers.check(der, EXPIRES)
    assert len(checks) == 2


def test_a_clock_before_the_first_check_checks_again(
    cas: ca.ClusterCAs, checks: list[bytes | None]
) -> None:
    callers = app.VerifiedCallers(cas)
    der = _bot_cert_der(cas)
    callers.check(der, NOW)
    with pytest.raises(AccessDenied, match="not yet valid"):
        callers.check(der, NOW - timedelta(hours=1))
    assert len(checks) == 2


def test_refusals_are_not_remembered(cas: ca.ClusterCAs, checks: list[bytes | None]) -> None:
    callers = app.VerifiedCallers(cas)
    foreign = _bot_cert_der(ca.create_cluster_cas("other.test", NOW))
    for _ in range(2):
        with pytest.raises(AccessDenied, match="not issued by this cluster"):
            callers.check(foreign, NOW)
        with pytest.raises(AccessDenied, match="required"):
            callers.check(None, NOW)
    assert len(checks) == 4


def test_memory_is_bounded_and_forgets_the_oldest_first(
    cas: ca.ClusterCAs, checks: list[bytes | None]
) -> None:
    callers = app.VerifiedCallers(cas, size=2)
    a, b, c = (_bot_cert_der(cas, f"i-{n}") for n in range(3))
    for der in (a, b, c):
        callers.check(der, NOW)
    callers.check(c, NOW)  # remembered
    callers.check(a, NOW)  # forgotten: checked again
    assert checks == [a, b, c, a]
