"""Trust on first contact against a real auth service: CA pins, a CA file, insecure."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from tbot_py.authservice.server import RunningAuthService
from tbot_py.client import wire
from tbot_py.client.http import AuthClient
from tbot_py.client.trust import first_contact_context, pinned_ca_pems
from tbot_py.errors import ConfigError, TrustError
from tbot_py.identity import keys

WRONG_PIN = "sha256:" + "ab" * 32


def _ping_with(service: RunningAuthService, ctx: ssl.SSLContext) -> wire.PingResponse:
    async def main() -> wire.PingResponse:
        async with AuthClient(service.addr, ctx, timeout=5.0) as client:
            return await client.ping()

    return asyncio.run(main())


def _context(
    service: RunningAuthService,
    *,
    ca_pins: tuple[str, ...] = (),
    ca_path: str | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    return asyncio.run(
        first_contact_context(service.addr, ca_pins=ca_pins, ca_path=ca_path, insecure=insecure)
    )


# -- CA pins ----------------------------------------------------------------------------


def test_pinned_ca_pems_returns_the_host_ca_matching_the_pin(service: RunningAuthService) -> None:
    pems = asyncio.run(pinned_ca_pems(service.addr, (service.ca_pin,)))
    assert pems == (service.cluster.cas.host.cert_pem,)
    assert keys.ca_pin(x509.load_pem_x509_certificate(pems[0])) == service.ca_pin


def test_pinned_ca_pems_accepts_a_pin_written_in_upper_case(service: RunningAuthService) -> None:
    pems = asyncio.run(pinned_ca_pems(service.addr, (service.ca_pin.upper(),)))
    assert pems == (service.cluster.cas.host.cert_pem,)


def test_pinned_ca_pems_keeps_the_match_among_several_pins(service: RunningAuthService) -> None:
    pems = asyncio.run(pinned_ca_pems(service.addr, (WRONG_PIN, service.ca_pin)))
    assert pems == (service.cluster.cas.host.cert_pem,)


def test_wrong_pin_is_a_trust_error_naming_the_pin_the_server_offered(
    service: RunningAuthService,
) -> None:
    with pytest.raises(TrustError) as err:
        asyncio.run(pinned_ca_pems(service.addr, (WRONG_PIN,)))
    assert f"server offered {service.ca_pin}" in err.value.message
    assert err.value.url == f"https://{service.addr}"


def test_pin_of_another_cluster_ca_is_refused(service: RunningAuthService) -> None:
    # The user CA is the cluster's too, but the server certificate is not signed by it.
    user_ca_pin = keys.ca_pin(service.cluster.cas.user.cert)
    with pytest.raises(TrustError):
        asyncio.run(pinned_ca_pems(service.addr, (user_ca_pin,)))


def test_context_from_a_pin_verifies_the_server(service: RunningAuthService) -> None:
    ctx = _context(service, ca_pins=(service.ca_pin,))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert _ping_with(service, ctx).cluster_name == service.cluster_name


def test_context_from_a_wrong_pin_is_never_built(service: RunningAuthService) -> None:
    with pytest.raises(TrustError):
        _context(service, ca_pins=(WRONG_PIN,))


# -- CA file ----------------------------------------------------------------------------


def test_context_from_a_ca_file_verifies_the_server(
    service: RunningAuthService, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(b"# the host CA\n" + service.cluster.cas.host.cert_pem)
    ctx = _context(service, ca_path=str(ca_file))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert _ping_with(service, ctx).cluster_name == service.cluster_name


def test_ca_file_from_another_ca_gives_a_context_that_refuses_the_server(
    service: RunningAuthService, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(service.cluster.cas.db.cert_pem)
    ctx = _context(service, ca_path=str(ca_file))
    with pytest.raises(TrustError):
        _ping_with(service, ctx)


def test_missing_ca_file_is_a_config_error_at_onboarding_ca_path(
    service: RunningAuthService, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as err:
        _context(service, ca_path=str(missing))
    assert err.value.yaml_path == "onboarding.ca_path"
    assert str(err.value) == f"onboarding.ca_path: CA file {missing} does not exist"


def test_ca_path_that_is_a_directory_is_a_config_error(
    service: RunningAuthService, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        _context(service, ca_path=str(tmp_path))
    assert err.value.yaml_path == "onboarding.ca_path"
    assert "cannot be read" in err.value.message


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"just some text\n",
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    ],
    ids=["empty", "text", "broken-pem"],
)
def test_ca_file_without_a_valid_certificate_is_a_config_error(
    service: RunningAuthService, tmp_path: Path, content: bytes
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        _context(service, ca_path=str(ca_file))
    assert err.value.yaml_path == "onboarding.ca_path"
    assert err.value.message == f"CA file {ca_file} holds no valid PEM certificate"


def test_ca_file_with_one_good_and_one_broken_certificate_is_refused(
    service: RunningAuthService, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    broken = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    ca_file.write_bytes(service.cluster.cas.host.cert_pem + broken)
    with pytest.raises(ConfigError, match="holds no valid PEM certificate"):
        _context(service, ca_path=str(ca_file))


# -- insecure and the system store ------------------------------------------------------


def test_insecure_context_skips_verification_and_logs_a_warning(
    service: RunningAuthService, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tbot_py.client"):
        ctx = _context(service, insecure=True)
    assert ctx.verify_mode == ssl.CERT_NONE
    assert not ctx.check_hostname
    assert _ping_with(service, ctx).cluster_name == service.cluster_name
    [record] = [r for r in caplog.records if r.name == "tbot_py.client"]
    assert record.levelno == logging.WARNING
    assert "insecure mode" in record.getMessage()
    assert service.addr in record.getMessage()


def test_without_pins_or_ca_file_the_system_store_refuses_a_private_ca(
    service: RunningAuthService,
) -> None:
    ctx = _context(service)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TrustError):
        _ping_with(service, ctx)
