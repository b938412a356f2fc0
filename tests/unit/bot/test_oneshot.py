"""run_oneshot against a real auth service: outputs, failure isolation, and token safety."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tbot_py.authservice.server import RunningAuthService
from tbot_py.bot.identity import load_stored_identity
from tbot_py.bot.oneshot import OneshotResult, OutputsFailed, run_oneshot
from tbot_py.config import BotConfig, load_config_text
from tbot_py.destinations import DirectoryDestination
from tbot_py.errors import AccessDenied, DestinationError
from tbot_py.identity import keys
from tests.expected import IDENTITY_FILES, artifact_names


def _output(name: str, path: Path, roles: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "type": "identity",
        "name": name,
        "roles": roles,
        "destination": {"type": "directory", "path": str(path)},
        **extra,
    }


def _config(
    service: RunningAuthService,
    token: str,
    storage: dict[str, Any],
    outputs: list[dict[str, Any]],
    *,
    addr: str | None = None,
) -> BotConfig:
    doc = {
        "version": "v2",
        "auth_server": addr or service.addr,
        "onboarding": {"token": token, "ca_pins": [service.ca_pin]},
        "storage": storage,
        "services": outputs,
        "oneshot": True,
    }
    return load_config_text(json.dumps(doc), "tbot.yaml")


def _run(config: BotConfig) -> OneshotResult:
    return asyncio.run(run_oneshot(config))


def _organizations(cert_path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- success ----------------------------------------------------------------------------


def test_oneshot_writes_two_outputs_each_with_its_own_roles(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    storage = {"type": "directory", "path": str(tmp_path / "storage")}
    config = _config(
        service,
        token,
        storage,
        [
            _output("dev-out", tmp_path / "dev", ["dev"]),
            _output("access-out", tmp_path / "access", ["access"]),
        ],
    )
    result = _run(config)

    assert [o.service for o in result.outputs] == ["dev-out", "access-out"]
    assert _organizations(tmp_path / "dev" / "tlscert") == ["dev"]
    assert _organizations(tmp_path / "access" / "tlscert") == ["access"]
    for out in ("dev", "access"):
        cert = x509.load_pem_x509_certificate((tmp_path / out / "tlscert").read_bytes())
        key = keys.load_private_key_pem((tmp_path / out / "key").read_bytes())
        assert keys.same_public_key(cert.public_key(), key.public_key())  # type: ignore[arg-type]
    assert result.bot_identity.tls_identity.generation == 1
    stored = load_stored_identity(DirectoryDestination(tmp_path / "storage"))
    assert stored == (result.bot_identity, keys.token_hash(token))


def test_directory_output_holds_tbots_files_and_the_ssh_client_files(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    config = _config(
        service,
        token,
        {"type": "memory"},
        [
            _output("with-ssh", tmp_path / "with-ssh", ["dev"]),
            _output("no-ssh", tmp_path / "no-ssh", ["dev"], ssh_config="off"),
        ],
    )
    result = _run(config)

    cluster = service.cluster_name
    ssh_files = {"known_hosts", "ssh_config", f"{cluster}.ssh_config", f"{cluster}.known_hosts"}
    assert artifact_names(tmp_path / "with-ssh") == IDENTITY_FILES | ssh_files
    assert artifact_names(tmp_path / "no-ssh") == IDENTITY_FILES
    assert set(result.outputs[0].files) == IDENTITY_FILES | ssh_files


def test_second_oneshot_with_directory_storage_renews_instead_of_joining(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    storage = {"type": "directory", "path": str(tmp_path / "storage")}
    outputs = [_output("out", tmp_path / "out", ["dev"])]
    first = _run(_config(service, token, storage, outputs))
    second = _run(_config(service, token, storage, outputs))
    assert second.bot_identity.tls_identity.generation == 2
    assert (
        second.bot_identity.tls_identity.bot_instance_id
        == first.bot_identity.tls_identity.bot_instance_id
    )


def test_memory_storage_warns_that_every_run_needs_a_fresh_token(
    service: RunningAuthService, token: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(service, token, {"type": "memory"}, [_output("o", tmp_path / "o", ["dev"])])
    with caplog.at_level(logging.WARNING, logger="tbot_py.bot"):
        _run(config)
    assert any("storage is in memory" in r.getMessage() for r in caplog.records)


# -- failures ---------------------------------------------------------------------------


def test_output_path_that_is_a_file_fails_in_init_and_the_token_stays_usable(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output directory should be\n")
    storage = {"type": "directory", "path": str(tmp_path / "storage")}
    bad = _config(
        service,
        token,
        storage,
        [_output("good", tmp_path / "good", ["dev"]), _output("bad", blocker, ["dev"])],
    )
    with pytest.raises(DestinationError) as err:
        _run(bad)
    assert err.value.path == str(blocker)
    assert "not a directory" in err.value.message
    assert load_stored_identity(DirectoryDestination(tmp_path / "storage")) is None
    assert not (tmp_path / "good" / "tlscert").exists()

    # The single-use token was not spent: the fixed config joins with it.
    fixed = _config(
        service,
        token,
        storage,
        [_output("good", tmp_path / "good", ["dev"]), _output("bad", tmp_path / "fixed", ["dev"])],
    )
    result = _run(fixed)
    assert result.bot_identity.tls_identity.generation == 1
    assert (tmp_path / "fixed" / "tlscert").is_file()


def test_output_that_cannot_be_prepared_fails_before_contacting_the_server(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    # Nothing listens at this address: reaching the network would be a ConnectionProblem.
    config = _config(
        service,
        token,
        {"type": "memory"},
        [_output("bad", blocker / "sub", ["dev"])],
        addr=f"127.0.0.1:{_closed_port()}",
    )
    with pytest.raises(DestinationError):
        _run(config)


def test_role_the_bot_lacks_fails_that_output_and_the_other_is_written(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    storage = {"type": "directory", "path": str(tmp_path / "storage")}
    config = _config(
        service,
        token,
        storage,
        [
            _output("dev-out", tmp_path / "dev", ["dev"]),
            _output("admin-out", tmp_path / "admin", ["admin"]),
        ],
    )
    with pytest.raises(OutputsFailed) as err:
        _run(config)

    [(name, exc)] = err.value.failures
    assert name == "admin-out"
    assert isinstance(exc, AccessDenied)
    assert 'role "admin" is not allowed' in str(exc)
    assert str(err.value).startswith("1 of 2 outputs failed: admin-out: ")
    assert token not in str(err.value)
    assert _organizations(tmp_path / "dev" / "tlscert") == ["dev"]
    assert not (tmp_path / "admin" / "tlscert").exists()
    # The bot identity was saved before the outputs ran.
    stored = load_stored_identity(DirectoryDestination(tmp_path / "storage"))
    assert stored is not None and stored[0].tls_identity.generation == 1


def test_single_failing_output_is_reported_by_name(
    service: RunningAuthService, token: str, tmp_path: Path
) -> None:
    config = _config(
        service, token, {"type": "memory"}, [_output("admin-out", tmp_path / "a", ["admin"])]
    )
    with pytest.raises(OutputsFailed) as err:
        _run(config)
    assert str(err.value).startswith("output admin-out: ")
    assert len(err.value.failures) == 1


def test_every_output_type_of_the_config_has_a_service_builder() -> None:
    """A new ``services:`` type must also be taught to ``build_services``."""
    import typing

    from tbot_py.bot import oneshot
    from tbot_py.config.schema import ServiceConfig

    union = typing.get_args(ServiceConfig)[0]
    assert set(typing.get_args(union)) == set(oneshot._BUILDERS)
