"""Bad input of every kind ends in one clear ERROR line, exit 1, no traceback, nothing written."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from tbot_py.identity.keys import generate_private_key
from tests.integration.conftest import AuthService, clean_env, error_lines, run_tbot, snapshot

SECRET = "0123456789abcdef0123456789abcdef"


def assert_one_clean_error(stderr: str, *expected: str) -> str:
    assert "Traceback" not in stderr
    assert SECRET not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tbot.yaml"
    path.write_text(body)
    return path


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "version: v2\nproxy_server: a:1\nservices: [\n  - type: identity\n"
    )
    done = run_tbot("start", "-c", str(config), "--oneshot")
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, f"{config}:", "invalid YAML")


def test_wrong_type_names_the_yaml_path_and_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "version: v2\nproxy_server: a:1\noneshot: true\nservices:\n"
        "  - type: identity\n    destination:\n      type: directory\n      path: [1, 2]\n",
    )
    done = run_tbot("start", "-c", str(config))
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, f"{config}:8:", "services[0].destination.path", "string")


def test_unknown_service_type_lists_the_supported_ones(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "version: v2\nproxy_server: a:1\nservices:\n  - type: teleport-magic\n"
    )
    done = run_tbot("start", "-c", str(config), "--oneshot")
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, f"{config}:4:", 'unknown service type "teleport-magic"')


def test_unknown_key_inside_a_service_is_an_error(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "version: v2\nproxy_server: a:1\nservices:\n  - type: identity\n"
        "    destnation: {type: memory}\n",
    )
    done = run_tbot("start", "-c", str(config), "--oneshot")
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, f"{config}:5:", "destnation")


def test_token_value_never_appears_in_a_config_error(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f"version: v2\nproxy_server: a:1\nonboarding:\n  token: {SECRET}\n  tokn: {SECRET}\n",
    )
    done = run_tbot("start", "-c", str(config), "--oneshot")
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, "tokn")


def test_missing_token_file_is_named_and_nothing_is_written(
    auth: AuthService, tmp_path: Path
) -> None:
    done = run_tbot(
        "start", "identity", "--proxy-server", auth.addr, "--ca-pin", auth.ca_pin,
        "--token", str(tmp_path / "no-such-token"), "--destination", str(tmp_path / "out"),
        "--storage", str(tmp_path / "storage"), "--oneshot",
    )  # fmt: skip
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, "token file", "no-such-token", "does not exist")
    assert snapshot(tmp_path / "out") == {}


def test_unreachable_server_is_a_connection_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and is now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_tbot(
        "start", "identity", "--proxy-server", f"127.0.0.1:{port}",
        "--ca-pin", "sha256:" + "a" * 64, "--destination", str(tmp_path / "out"),
        "--storage", "memory://", "--oneshot",
        env=clean_env(TELEPORT_BOT_TOKEN=SECRET),
    )  # fmt: skip
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, f"127.0.0.1:{port}", "cannot reach the auth service")


@contextmanager
def tcp_garbage_server() -> Iterator[int]:
    """A TCP server that answers anything with bytes that are neither TLS nor HTTP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"\x00garbage\xff" * 64)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "impostor.crt", tmp_path / "impostor.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextmanager
def https_server(tmp_path: Path, body: bytes, content_type: str) -> Iterator[tuple[int, Path]]:
    """An HTTPS server that answers every request 200 with ``body``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    cert, key = self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], cert
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_server_speaking_garbage_instead_of_tls(tmp_path: Path) -> None:
    with tcp_garbage_server() as port:
        done = run_tbot(
            "start", "identity", "--proxy-server", f"127.0.0.1:{port}", "--insecure",
            "--destination", str(tmp_path / "out"), "--storage", "memory://", "--oneshot",
            env=clean_env(TELEPORT_BOT_TOKEN=SECRET),
        )  # fmt: skip
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, "TLS handshake failed")
    assert snapshot(tmp_path / "out") == {}


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"<html>welcome</html>", "text/html", "not JSON"),
        (b'{"ssh": 12, "tls": "%%%"}', "application/json", "unexpected response"),
        (b"[1, 2, 3]", "application/json", "unexpected response"),
    ],
)
def test_https_server_answering_garbage(
    tmp_path: Path, body: bytes, content_type: str, expected: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "identity").write_text("previous identity")
    before = snapshot(out)
    with https_server(tmp_path, body, content_type) as (port, cert):
        done = run_tbot(
            "start", "identity", "--proxy-server", f"127.0.0.1:{port}", "--ca-path", str(cert),
            "--destination", str(out), "--storage", "memory://", "--oneshot",
            env=clean_env(TELEPORT_BOT_TOKEN=SECRET),
        )  # fmt: skip
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, f"127.0.0.1:{port}", expected)
    assert snapshot(out) == before


def test_destination_path_that_is_a_file(auth: AuthService, tmp_path: Path) -> None:
    token = auth.add_bot("filedest")
    target = tmp_path / "not-a-dir"
    target.write_text("keep me")
    done = run_tbot(
        "start", "identity", "--proxy-server", auth.addr, "--ca-pin", auth.ca_pin,
        "--destination", str(target), "--storage", str(tmp_path / "storage"), "--oneshot",
        env=clean_env(TELEPORT_BOT_TOKEN=token),
    )  # fmt: skip
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, str(target), "not a directory")
    assert target.read_text() == "keep me"
    # The failure came before any network call: the single-use token is still good.
    ok = run_tbot(
        "start", "identity", "--proxy-server", auth.addr, "--ca-pin", auth.ca_pin,
        "--destination", str(tmp_path / "out"), "--storage", str(tmp_path / "storage"),
        "--oneshot", env=clean_env(TELEPORT_BOT_TOKEN=token),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr


def test_no_config_and_no_address_are_clear_errors(tmp_path: Path) -> None:
    done = run_tbot("start", "--oneshot")
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, "no config file")
    done = run_tbot("start", "identity", "--destination", str(tmp_path), "--oneshot")
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, "proxy_server or auth_server")


@pytest.mark.parametrize("flag", ["--destination", "--storage"])
def test_kubernetes_secret_uri_is_not_supported_yet_and_burns_no_token(
    auth: AuthService, tmp_path: Path, flag: str
) -> None:
    token = auth.add_bot(f"k8s{flag.strip('-')}")
    uris = {"--destination": str(tmp_path / "out"), "--storage": str(tmp_path / "storage")}
    uris[flag] = "kubernetes-secret:///tbot-out"
    args = [
        "start", "identity", "--proxy-server", auth.addr, "--ca-pin", auth.ca_pin,
        "--destination", uris["--destination"], "--storage", uris["--storage"], "--oneshot",
    ]  # fmt: skip
    done = run_tbot(*args, env=clean_env(TELEPORT_BOT_TOKEN=token))
    assert done.returncode == 1
    assert_one_clean_error(done.stderr, flag, '"kubernetes-secret" is not supported yet')
    assert not (tmp_path / "out").exists()
    # The single-use token was not sent: it still joins.
    args[args.index(flag) + 1] = str(tmp_path / flag.strip("-"))
    done = run_tbot(*args, env=clean_env(TELEPORT_BOT_TOKEN=token))
    assert done.returncode == 0, done.stderr
