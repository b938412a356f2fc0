"""The ID token (a JWT) an OIDC join method presents to the auth service, tbot.md §9.

Each method has one source: ``kubernetes`` a projected service account token file,
``gitlab`` a CI variable, ``github`` the Actions ID token endpoint, ``generic_oidc`` an
environment variable, a file or a command. The token is read afresh for every join, since
the platform rotates it. Errors are one line and never contain the ID token, nor the
Actions request token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
from collections.abc import Mapping, Sequence
from datetime import timedelta
from urllib.parse import quote, urlsplit

from tbot_py import __version__
from tbot_py.client._http1 import ConnectionPool, HTTPProtocolError, Response
from tbot_py.config._checks import read_text_file
from tbot_py.config.duration import format_duration
from tbot_py.config.schema import (
    DEFAULT_GITLAB_JWT_VAR,
    GenericOIDCOnboarding,
    Onboarding,
)
from tbot_py.errors import (
    AccessDenied,
    ClientError,
    ConfigError,
    ConnectionProblem,
    ProtocolError,
    ServerError,
    TrustError,
)

__all__ = [
    "DEFAULT_KUBERNETES_TOKEN_PATH",
    "GITHUB_REQUEST_TIMEOUT",
    "KUBERNETES_TOKEN_PATH_VAR",
    "kubernetes_token_path",
    "read_id_token",
]

KUBERNETES_TOKEN_PATH_VAR = "KUBERNETES_TOKEN_PATH"  # noqa: S105 (a variable name)
DEFAULT_KUBERNETES_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105
GITHUB_URL_VAR = "ACTIONS_ID_TOKEN_REQUEST_URL"
GITHUB_BEARER_VAR = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"
GITHUB_REQUEST_TIMEOUT = 30.0  # seconds, for each step of the request
#: An ID token is a few KiB; more output than this from a command is not one.
MAX_COMMAND_OUTPUT = 64 * 1024
_KILL_GRACE = 2.0  # seconds to wait for a killed command's process group to go
_MAX_MESSAGE = 200
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# Anything shaped like a JWT in text from elsewhere (stderr, an error body) is hidden.
_JWT_INSIDE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


async def read_id_token(
    onboarding: Onboarding, *, audience: str, environ: Mapping[str, str] | None = None
) -> str:
    """The ID token for ``onboarding.join_method``, stripped; ``environ`` defaults to os.environ.

    ``audience`` is what the token must be issued for (the cluster name): it is asked for from
    GitHub and named in the hints of errors. A source that is missing or yields something that
    is not a JWT is a ConfigError; a failed request to GitHub is a ClientError.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    method = onboarding.join_method
    if method == "kubernetes":
        path = kubernetes_token_path(onboarding, env)
        token = _read_file(path, "service account token file", "onboarding.kubernetes.token_path")
        return _require_jwt(token, f"the content of the service account token file {path}")
    if method == "gitlab":
        name = onboarding.gitlab.token_env_var_name if onboarding.gitlab else DEFAULT_GITLAB_JWT_VAR
        token = env.get(name, "").strip()
        if not token:
            raise ConfigError(
                f"environment variable {name} is not set; in .gitlab-ci.yml declare "
                f"id_tokens: {{{name}: {{aud: {audience}}}}}"
            )
        return _require_jwt(token, f"the value of environment variable {name}")
    if method == "github":
        return await _request_github_token(env, audience)
    if method == "generic_oidc" and onboarding.generic_oidc is not None:
        return await _read_generic(onboarding.generic_oidc, env)
    if method == "generic_oidc":
        raise ConfigError(
            "join method generic_oidc needs onboarding.generic_oidc with one of env, path "
            "or command",
            yaml_path="onboarding.generic_oidc",
        )
    raise ConfigError(
        f"join method {method} does not use an ID token", yaml_path="onboarding.join_method"
    )


def kubernetes_token_path(onboarding: Onboarding, environ: Mapping[str, str]) -> str:
    """``onboarding.kubernetes.token_path``, else ``$KUBERNETES_TOKEN_PATH``, else the default."""
    if onboarding.kubernetes is not None and onboarding.kubernetes.token_path is not None:
        return onboarding.kubernetes.token_path
    return environ.get(KUBERNETES_TOKEN_PATH_VAR) or DEFAULT_KUBERNETES_TOKEN_PATH


def _read_file(path: str, what: str, yaml_path: str) -> str:
    text, problem = read_text_file(path)
    token = (text or "").strip()
    if problem is None and not token:
        problem = "is empty"
    if problem is not None:
        raise ConfigError(f"{what} {path} {problem}", yaml_path=yaml_path)
    return token


def _require_jwt(token: str, source: str) -> str:
    """``token`` if it has the shape of a JWT; else an error naming ``source``, not the text."""
    if not _JWT.fullmatch(token):
        raise ConfigError(
            f"{source} is not a JWT (expected three base64url parts separated by dots)"
        )
    return token


def _safe_text(text: str, *secrets: str) -> str:
    """External text for an error: one line, at most 200 characters, secrets and JWTs hidden."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    text = " ".join(_JWT_INSIDE.sub("<redacted JWT>", text).split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


# --- generic_oidc -------------------------------------------------------------------------


async def _read_generic(config: GenericOIDCOnboarding, env: Mapping[str, str]) -> str:
    if config.env is not None:
        token = env.get(config.env, "").strip()
        if not token:
            raise ConfigError(
                f"environment variable {config.env} is not set",
                yaml_path="onboarding.generic_oidc.env",
            )
        return _require_jwt(token, f"the value of environment variable {config.env}")
    if config.path is not None:
        token = _read_file(config.path, "ID token file", "onboarding.generic_oidc.path")
        return _require_jwt(token, f"the content of the ID token file {config.path}")
    assert config.command is not None  # the schema requires exactly one source
    token = await _run_command(config.command, config.timeout, env)
    return _require_jwt(token, f"the output of {config.command[0]}")


async def _run_command(argv: Sequence[str], timeout: timedelta, env: Mapping[str, str]) -> str:
    """The stripped standard output of ``argv``, run without a shell in its own process group."""
    where = "onboarding.generic_oidc.command"
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            start_new_session=True,  # so that a timeout kills what it started too
        )
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot run {argv[0]}: {reason}", yaml_path=where) from None
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(timeout.total_seconds()):
            out, err, code = await asyncio.gather(
                _read_capped(proc.stdout), _read_capped(proc.stderr), proc.wait()
            )
    except TimeoutError:
        await _kill_group(proc)
        raise ConfigError(
            f"{argv[0]} did not finish within {format_duration(timeout)} and was killed",
            yaml_path=where,
        ) from None
    except BaseException:
        await _kill_group(proc)
        raise
    if code != 0:
        lines = err.decode("utf-8", errors="replace").strip().splitlines()
        last = f": {_safe_text(lines[-1])}" if lines else " (no error output)"
        raise ConfigError(f"{argv[0]} exited with code {code}{last}", yaml_path=where)
    if len(out) > MAX_COMMAND_OUTPUT:
        raise ConfigError(
            f"{argv[0]} printed more than {MAX_COMMAND_OUTPUT // 1024} KiB; "
            "expected only the ID token",
            yaml_path=where,
        )
    token = out.decode("utf-8", errors="replace").strip()
    if not token:
        raise ConfigError(f"{argv[0]} printed nothing; expected the ID token", yaml_path=where)
    return token


async def _read_capped(stream: asyncio.StreamReader) -> bytes:
    """Everything from ``stream``, keeping one byte past the limit so overflow shows."""
    data = bytearray()
    while chunk := await stream.read(64 * 1024):
        room = MAX_COMMAND_OUTPUT + 1 - len(data)
        data += chunk[: max(room, 0)]  # the rest is read and dropped so the command never blocks
    return bytes(data)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    # Reap it; a descendant that left the group may keep the pipes open, so do not wait long.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_KILL_GRACE):
            await proc.wait()


# --- github -------------------------------------------------------------------------------


async def _request_github_token(env: Mapping[str, str], audience: str) -> str:
    url = env.get(GITHUB_URL_VAR, "").strip()
    bearer = env.get(GITHUB_BEARER_VAR, "").strip()
    if not url or not bearer:
        missing = GITHUB_URL_VAR if not url else GITHUB_BEARER_VAR
        raise ConfigError(
            f"environment variable {missing} is not set: the GitHub Actions job needs "
            "permissions: id-token: write to request an ID token"
        )
    if not (bearer.isascii() and bearer.isprintable()):
        raise ConfigError(
            f"environment variable {GITHUB_BEARER_VAR} holds characters not allowed in HTTP"
        )
    parts = urlsplit(url)
    try:
        port = parts.port or 443
    except ValueError:
        port = 0
    host = parts.hostname or ""
    if parts.scheme != "https" or not host or not port:
        raise ConfigError(f"environment variable {GITHUB_URL_VAR} is not an https:// URL")
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    shown = f"https://{addr.removesuffix(':443')}{parts.path}"  # no query, no user info
    query = f"{parts.query}&" if parts.query else ""
    target = f"{parts.path or '/'}?{query}audience={quote(audience, safe='')}"
    headers = {"Authorization": f"Bearer {bearer}", "Accept": "application/json"}
    pool = ConnectionPool(
        addr,
        ssl.create_default_context(),
        timeout=GITHUB_REQUEST_TIMEOUT,
        user_agent=f"tbot-py/{__version__}",
    )
    try:
        response = await pool.request("GET", target, headers=headers)
    except (OSError, HTTPProtocolError) as exc:
        raise _transport_error(exc, shown) from None
    finally:
        await pool.close()
    if response.status != 200:
        raise _status_error(response, shown, bearer)
    try:
        doc = json.loads(response.body)
    except ValueError:
        doc = None
    value = doc.get("value") if isinstance(doc, dict) else None
    if not isinstance(value, str):
        raise ProtocolError(
            'the ID token answer is not JSON of the form {"value": "<JWT>"}', url=shown
        )
    return _require_jwt(value.strip(), "the value from the GitHub Actions ID token endpoint")


def _transport_error(exc: OSError | HTTPProtocolError, url: str) -> ClientError:
    """Like the auth client's classification, worded for the GitHub Actions endpoint."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        return TrustError(f"cannot verify the server's TLS certificate ({reason})", url=url)
    if isinstance(exc, ssl.SSLError):
        return ProtocolError(f"TLS handshake failed ({exc.reason or exc})", url=url)
    if isinstance(exc, TimeoutError):
        return ConnectionProblem(
            "timed out waiting for the GitHub Actions ID token endpoint", url=url
        )
    if isinstance(exc, HTTPProtocolError):
        return ProtocolError(f"server broke the HTTP protocol: {_safe_text(str(exc))}", url=url)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return ConnectionProblem(
        f"cannot reach the GitHub Actions ID token endpoint: {_safe_text(reason)}", url=url
    )


def _status_error(response: Response, url: str, bearer: str) -> ClientError:
    status = response.status
    text = response.body.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    message = doc.get("message") if isinstance(doc, dict) else None
    if not isinstance(message, str):
        message = text.splitlines()[0] if text else "no message"
    kind: type[ClientError] = ClientError
    if status in (401, 403):
        kind = AccessDenied
    elif status >= 500:
        kind = ServerError
    return kind(
        f"the ID token request was refused: {_safe_text(message, bearer)}", url=url, status=status
    )
