"""Reading the ID token of each OIDC join method, from real files, processes and HTTPS."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tbot_py.bot.idtokens import DEFAULT_KUBERNETES_TOKEN_PATH, read_id_token
from tbot_py.client import tls
from tbot_py.client._http1 import ConnectionPool
from tbot_py.config.schema import Onboarding
from tbot_py.errors import AccessDenied, ClientError, ConfigError, ProtocolError, TrustError
from tbot_py.identity import keys

from ..client.scripted_server import self_signed_ca_pem

AUDIENCE = "tbot-py.local"
REQUEST_TOKEN = "gh-request-9d1f7c3a"


def make_jwt(subject: str) -> str:
    """A token with the shape of a JWT (no verification happens on the bot side)."""

    def part(doc: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part({'sub': subject})}.c2lnbmF0dXJl"


JWT = make_jwt("first")


def onboarding(method: str, **sections: Any) -> Onboarding:
    return Onboarding.model_validate({"join_method": method, "token": "deploy", **sections})


def read(ob: Onboarding, environ: Mapping[str, str]) -> str:
    return asyncio.run(read_id_token(ob, audience=AUDIENCE, environ=environ))


def read_error(ob: Onboarding, environ: Mapping[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        read(ob, environ)
    return info.value


# -- kubernetes ---------------------------------------------------------------------------------


def test_kubernetes_token_file_is_read_again_on_every_call(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(JWT + "\n")
    ob = onboarding("kubernetes", kubernetes={"token_path": str(token_file)})
    assert read(ob, {}) == JWT
    rotated = make_jwt("rotated")
    token_file.write_text(rotated)  # the kubelet rotates the projected token
    assert read(ob, {}) == rotated


def test_kubernetes_token_path_comes_from_the_environment_when_not_configured(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(JWT)
    assert read(onboarding("kubernetes"), {"KUBERNETES_TOKEN_PATH": str(token_file)}) == JWT


def test_kubernetes_configured_path_wins_over_the_environment(tmp_path: Path) -> None:
    (tmp_path / "configured").write_text(JWT)
    (tmp_path / "env").write_text(make_jwt("env"))
    ob = onboarding("kubernetes", kubernetes={"token_path": str(tmp_path / "configured")})
    assert read(ob, {"KUBERNETES_TOKEN_PATH": str(tmp_path / "env")}) == JWT


def test_kubernetes_default_path_is_named_when_missing() -> None:
    if os.path.exists(DEFAULT_KUBERNETES_TOKEN_PATH):
        pytest.skip("running inside a Kubernetes pod")
    err = read_error(onboarding("kubernetes"), {})
    assert err.yaml_path == "onboarding.kubernetes.token_path"
    assert err.message == (
        f"service account token file {DEFAULT_KUBERNETES_TOKEN_PATH} does not exist"
    )


def test_kubernetes_empty_token_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    err = read_error(onboarding("kubernetes"), {"KUBERNETES_TOKEN_PATH": str(tmp_path / "token")})
    assert str(err) == (
        f"onboarding.kubernetes.token_path: service account token file {tmp_path}/token is empty"
    )


def test_kubernetes_file_that_is_not_a_jwt_is_refused_without_echoing_it(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("secret-ish garbage")
    err = read_error(onboarding("kubernetes"), {"KUBERNETES_TOKEN_PATH": str(tmp_path / "token")})
    assert f"the content of the service account token file {tmp_path}/token is not a JWT" in str(
        err
    )
    assert "garbage" not in str(err)


# -- gitlab -------------------------------------------------------------------------------------


def test_gitlab_token_comes_from_tbot_gitlab_jwt() -> None:
    assert read(onboarding("gitlab"), {"TBOT_GITLAB_JWT": f" {JWT}\n"}) == JWT


def test_gitlab_variable_name_is_configurable() -> None:
    ob = onboarding("gitlab", gitlab={"token_env_var_name": "MY_JWT"})
    assert read(ob, {"MY_JWT": JWT, "TBOT_GITLAB_JWT": "unused"}) == JWT


def test_gitlab_missing_variable_says_how_to_declare_it() -> None:
    err = read_error(onboarding("gitlab"), {"TBOT_GITLAB_JWT": ""})
    assert str(err) == (
        "environment variable TBOT_GITLAB_JWT is not set; in .gitlab-ci.yml declare "
        "id_tokens: {TBOT_GITLAB_JWT: {aud: tbot-py.local}}"
    )


# -- generic_oidc -------------------------------------------------------------------------------


def test_generic_oidc_reads_an_environment_variable() -> None:
    assert (
        read(onboarding("generic_oidc", generic_oidc={"env": "IDP_JWT"}), {"IDP_JWT": JWT}) == JWT
    )


def test_generic_oidc_missing_variable_is_an_error_at_its_key() -> None:
    err = read_error(onboarding("generic_oidc", generic_oidc={"env": "IDP_JWT"}), {})
    assert str(err) == "onboarding.generic_oidc.env: environment variable IDP_JWT is not set"


def test_generic_oidc_reads_a_file(tmp_path: Path) -> None:
    (tmp_path / "jwt").write_text(JWT + "\n")
    ob = onboarding("generic_oidc", generic_oidc={"path": str(tmp_path / "jwt")})
    assert read(ob, {}) == JWT


def test_generic_oidc_missing_file_is_an_error_at_its_key(tmp_path: Path) -> None:
    ob = onboarding("generic_oidc", generic_oidc={"path": str(tmp_path / "nope")})
    err = read_error(ob, {})
    assert str(err) == (
        f"onboarding.generic_oidc.path: ID token file {tmp_path}/nope does not exist"
    )


def command(argv: list[str], timeout: str = "10s") -> Onboarding:
    return onboarding("generic_oidc", generic_oidc={"command": argv, "timeout": timeout})


PATH_ONLY = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def test_generic_oidc_command_output_is_the_token_and_sees_the_given_environment() -> None:
    ob = command(["sh", "-c", 'printf "%s\\n" "$IDP_JWT"'])
    assert read(ob, {**PATH_ONLY, "IDP_JWT": JWT}) == JWT


def test_generic_oidc_failing_command_reports_its_exit_code_and_last_error_line() -> None:
    ob = command(["sh", "-c", "echo first >&2; echo 'login required' >&2; exit 3"])
    err = read_error(ob, PATH_ONLY)
    assert str(err) == ("onboarding.generic_oidc.command: sh exited with code 3: login required")


def test_generic_oidc_error_output_never_shows_a_jwt() -> None:
    ob = command(["sh", "-c", f"echo 'bad token {JWT}' >&2; exit 1"])
    err = read_error(ob, PATH_ONLY)
    assert JWT not in str(err)
    assert "bad token <redacted JWT>" in str(err)


def test_generic_oidc_command_printing_garbage_is_refused_without_echoing_it() -> None:
    err = read_error(command(["sh", "-c", "echo hello world"]), PATH_ONLY)
    assert str(err) == (
        "the output of sh is not a JWT (expected three base64url parts separated by dots)"
    )


def test_generic_oidc_command_printing_nothing_is_an_error() -> None:
    err = read_error(command(["true"]), PATH_ONLY)
    assert err.message == "true printed nothing; expected the ID token"


def test_generic_oidc_command_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    err = read_error(command([str(tmp_path / "missing")]), PATH_ONLY)
    assert err.message == f"cannot run {tmp_path}/missing: No such file or directory"


def _process_is_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # killed, waiting for init to reap it


def test_generic_oidc_command_is_killed_with_its_children_after_the_timeout(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "pid"
    ob = command(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout="1s")
    err = read_error(ob, PATH_ONLY)
    assert str(err) == (
        "onboarding.generic_oidc.command: sh did not finish within 1s and was killed"
    )
    assert _process_is_gone(int(pid_file.read_text()))


# -- github -------------------------------------------------------------------------------------


def self_signed_cert() -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a throwaway self-signed CA valid for localhost."""
    key, cert_pem = self_signed_ca_pem("idtokens test")
    return cert_pem, keys.private_key_pem(key)


@dataclass
class FakeActions:
    """The GitHub Actions ID token endpoint: answers ``status``/``body``, records requests."""

    status: int = 200
    body: bytes = b""
    requests: list[web.Request] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        return web.Response(status=self.status, body=self.body, content_type="application/json")


@pytest.fixture
def server_cert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes]:
    """A server certificate the bot trusts through SSL_CERT_FILE."""
    cert_pem, key_pem = self_signed_cert()
    (tmp_path / "ca.pem").write_bytes(cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    return cert_pem, key_pem


def github_read(
    fake: FakeActions,
    cert: tuple[bytes, bytes],
    *,
    audience: str = AUDIENCE,
    environ: Mapping[str, str] | None = None,
) -> str | Exception:
    """What read_id_token returns (or raises) for a github join against ``fake``."""

    async def main() -> str | Exception:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_client_identity(ctx, *cert)
        app = web.Application()
        app.router.add_get("/_apis/idtoken", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = runner.addresses[0][1]
        env = environ or {
            "ACTIONS_ID_TOKEN_REQUEST_URL": f"https://localhost:{port}/_apis/idtoken?api-version=2.0",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
        }
        try:
            return await read_id_token(onboarding("github"), audience=audience, environ=env)
        except (ConfigError, ClientError) as exc:
            return exc
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_github_token_is_requested_with_the_audience_and_the_bearer_token(
    server_cert: tuple[bytes, bytes],
) -> None:
    fake = FakeActions(body=json.dumps({"value": JWT}).encode())
    assert github_read(fake, server_cert, audience="my cluster/1") == JWT
    [request] = fake.requests
    assert request.query["api-version"] == "2.0"
    assert request.query["audience"] == "my cluster/1"
    assert request.raw_path.endswith("?api-version=2.0&audience=my%20cluster%2F1")
    assert request.headers["Authorization"] == f"Bearer {REQUEST_TOKEN}"
    assert request.headers["Accept"] == "application/json"


def test_github_refusal_is_access_denied_without_the_request_token(
    server_cert: tuple[bytes, bytes],
) -> None:
    echo = {"message": f"token {REQUEST_TOKEN} may not request an ID token"}
    fake = FakeActions(status=403, body=json.dumps(echo).encode())
    err = github_read(fake, server_cert)
    assert isinstance(err, AccessDenied)
    assert err.status == 403
    assert (
        err.message
        == "the ID token request was refused: token <redacted> may not request an ID token"
    )
    assert REQUEST_TOKEN not in str(err)
    assert "api-version" not in str(err)  # the URL is shown without its query


def test_github_answer_that_is_not_json_is_a_protocol_error(
    server_cert: tuple[bytes, bytes],
) -> None:
    err = github_read(FakeActions(body=b"<html>oops</html>"), server_cert)
    assert isinstance(err, ProtocolError)
    assert 'not JSON of the form {"value": "<JWT>"}' in str(err)


def test_github_value_that_is_not_a_jwt_is_refused(server_cert: tuple[bytes, bytes]) -> None:
    err = github_read(FakeActions(body=b'{"value": "plain words"}'), server_cert)
    assert isinstance(err, ConfigError)
    assert "plain words" not in str(err)
    assert "the value from the GitHub Actions ID token endpoint is not a JWT" in str(err)


def test_github_server_outside_the_trusted_cas_is_a_trust_error(
    server_cert: tuple[bytes, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_ca, _ = self_signed_cert()
    (tmp_path / "other.pem").write_bytes(other_ca)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "other.pem"))
    fake = FakeActions(body=json.dumps({"value": JWT}).encode())
    assert isinstance(github_read(fake, server_cert), TrustError)
    assert fake.requests == []


@pytest.mark.parametrize(
    "missing", ["ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN"]
)
def test_github_without_id_token_permission_says_what_the_workflow_needs(missing: str) -> None:
    environ = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": "https://example.invalid/x",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
    }
    del environ[missing]
    err = read_error(onboarding("github"), environ)
    assert str(err) == (
        f"environment variable {missing} is not set: the GitHub Actions job needs "
        "permissions: id-token: write to request an ID token"
    )


def test_github_request_url_must_be_https() -> None:
    environ = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": "http://127.0.0.1:1/x",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
    }
    err = read_error(onboarding("github"), environ)
    assert err.message == "environment variable ACTIONS_ID_TOKEN_REQUEST_URL is not an https:// URL"


# -- other methods ------------------------------------------------------------------------------


def test_token_join_has_no_id_token() -> None:
    err = read_error(Onboarding.model_validate({"token": "abc"}), {})
    assert str(err) == "onboarding.join_method: join method token does not use an ID token"


def test_github_request_token_that_could_split_the_request_is_refused() -> None:
    environ = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": "https://127.0.0.1:1/x",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": f"{REQUEST_TOKEN}\r\nX-Evil: 1",
    }
    err = read_error(onboarding("github"), environ)
    assert err.message == (
        "environment variable ACTIONS_ID_TOKEN_REQUEST_TOKEN holds characters not allowed in HTTP"
    )
    assert REQUEST_TOKEN not in str(err)


@pytest.mark.parametrize(
    "headers", [{"Authorization": "Bearer a\r\nX-Evil: 1"}, {"Bad Name": "x"}, {"X": "caf\u00e9"}]
)
def test_http_client_refuses_extra_headers_that_could_split_the_request(
    headers: dict[str, str],
) -> None:
    async def main() -> None:
        pool = ConnectionPool(
            "127.0.0.1:1", ssl.create_default_context(), timeout=1, user_agent="t"
        )
        try:
            await pool.request("GET", "/", headers=headers)
        finally:
            await pool.close()

    with pytest.raises(ValueError, match="has a name or value that is not allowed") as info:
        asyncio.run(main())
    assert "Evil" not in str(info.value)
