"""Against certbot: the Python peer doing the same job shape.

Both obtain a certificate for a fresh key from a local CA and write it to a directory,
starting from nothing: certbot registers a new ACME account and completes an order against
pebble (Let's Encrypt's test CA, from Debian); tbot-py joins a local auth service with a new
single-use token (a cold one-shot). Each round runs certbot, ours, then ``certbot --version``
(certbot's start-up floor), so load drift hits all alike.

Pebble is made as fast as it can be so that certbot is not slowed by the CA:
``PEBBLE_VA_ALWAYS_VALID=1`` (no real HTTP-01 request), ``PEBBLE_VA_NOSLEEP=1`` (no random
0-15 s sleep before validating) and ``PEBBLE_WFE_NONCEREJECT=0`` (no deliberately rejected
nonces, which certbot would retry). Debian's pebble ships no test certificates, so this
module makes a throwaway CA and a 127.0.0.1 certificate for pebble's HTTPS listener and
points certbot at that CA with ``REQUESTS_CA_BUNDLE``.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import (
    Context,
    Row,
    Stats,
    auth_service,
    clean_env,
    free_port,
    need,
    stop_process,
)
from oneshot import Bot, Measured, measure, python_env, verify_identity

NAME = "certbot peer"
TARGET = 8.0  # certbot's time / ours >= 8
# certbot's own fixed waits: 1 s before it first polls the authorization
# (certbot/_internal/auth_handler.py) and 1 s before it first polls the order
# (acme/client.py finalize_order), however fast the CA answers.
CERTBOT_FIXED_SLEEP_MS = 2000.0
PEBBLE_ENV = {
    "PEBBLE_VA_ALWAYS_VALID": "1",
    "PEBBLE_VA_NOSLEEP": "1",
    "PEBBLE_WFE_NONCEREJECT": "0",
}


def write_tls_files(directory: Path) -> Path:
    """A throwaway CA and a 127.0.0.1 server certificate for pebble; returns the CA's path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("bench pebble CA"))
        .issuer_name(name("bench pebble CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "cert.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / "ca.pem"


@contextmanager
def pebble(directory: Path, http_port: int) -> Iterator[str]:
    """Run pebble on free loopback ports until exit; yields its ACME directory URL."""
    listen, management, tls_port = free_port(), free_port(), free_port()
    config = directory / "pebble-config.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{listen}",
                    "managementListenAddress": f"127.0.0.1:{management}",
                    "certificate": str(directory / "cert.pem"),
                    "privateKey": str(directory / "key.pem"),
                    "httpPort": http_port,
                    "tlsPort": tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            },
            indent=1,
        )
    )
    log = (directory / "pebble.log").open("wb")
    process = subprocess.Popen(
        [need("pebble", "pebble"), "-config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=clean_env(**PEBBLE_ENV),
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (directory / "pebble.log").read_text()[-800:]
                    raise RuntimeError(f"pebble did not start listening: {tail}") from None
                time.sleep(0.05)
        yield f"https://127.0.0.1:{listen}/dir"
    finally:
        stop_process(process)
        log.close()


def certbot_argv(server: str, http_port: int, run: Path, domain: str) -> list[str]:
    """``certbot certonly`` from an empty state: a new account, one order, one certificate."""
    return [
        need("certbot", "certbot"), "certonly", "--standalone", "--non-interactive",
        "--agree-tos", "--register-unsafely-without-email",
        "--server", server,
        "--http-01-port", str(http_port), "--http-01-address", "127.0.0.1",
        "--key-type", "ecdsa", "--elliptic-curve", "secp256r1",  # as ours: ECDSA P-256
        "--config-dir", str(run / "config"), "--work-dir", str(run / "work"),
        "--logs-dir", str(run / "logs"),
        "-d", domain,
    ]  # fmt: skip


def verify_certbot(run: Path, domain: str) -> None:
    """Raise unless certbot wrote a fullchain.pem for ``domain``."""
    from cryptography import x509

    fullchain = run / "config" / "live" / domain / "fullchain.pem"
    if not fullchain.is_file():
        raise RuntimeError(f"certbot wrote no {fullchain}")
    cert = x509.load_pem_x509_certificates(fullchain.read_bytes())[0]
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if domain not in names.get_values_for_type(x509.DNSName):
        raise RuntimeError(f"{fullchain} is not for {domain}")


def run(ctx: Context) -> list[Row]:
    http_port = free_port()
    ca = write_tls_files(ctx.work / "pebble")
    certbot_env = python_env(ctx.work, REQUESTS_CA_BUNDLE=str(ca), NO_PROXY="127.0.0.1,localhost")
    theirs: list[Measured] = []
    ours: list[Measured] = []
    startup: list[Measured] = []
    with pebble(ctx.work / "pebble", http_port) as server, auth_service(ctx.work / "auth") as auth:
        bot = Bot(auth, ctx.work)
        rounds = ctx.reps(7, 3)
        ctx.log(f"   timing {ctx.warmup} warm-up + {rounds} rounds of certbot/ours ({server})")
        for round_ in range(ctx.warmup + rounds):
            run_dir = ctx.work / f"certbot-{round_}"
            domain = f"r{round_}-{secrets.token_hex(4)}.bench.example.com"
            certbot = measure(certbot_argv(server, http_port, run_dir, domain), certbot_env)
            verify_certbot(run_dir, domain)
            argv, env, out = bot.cold()
            cold = measure(argv, env)
            verify_identity(out)
            # certbot's floor: its interpreter, imports and argument parsing, no ACME at all.
            version = measure([need("certbot", "certbot"), "--version"], certbot_env)
            if round_ >= ctx.warmup:
                theirs.append(certbot)
                ours.append(cold)
                startup.append(version)
    t, o, v = (Stats.of([m.wall_ms for m in ms]) for ms in (theirs, ours, startup))
    t_cpu, o_cpu, v_cpu = (Stats.of([m.cpu_ms for m in ms]) for ms in (theirs, ours, startup))
    ratio = t.median / o.median
    paired = [c.wall_ms / w.wall_ms for c, w in zip(theirs, ours, strict=True)]
    without_sleeps = (t.median - CERTBOT_FIXED_SLEEP_MS) / o.median
    flags = " ".join(certbot_argv("URL", http_port, Path("TMP"), "NAME")[1:]).replace(
        str(http_port), "PORT"
    )
    setup = (
        f"pebble {', '.join(f'{k}={v}' for k, v in PEBBLE_ENV.items())} on 127.0.0.1 with a "
        f"throwaway CA trusted via REQUESTS_CA_BUNDLE (and NO_PROXY=127.0.0.1,localhost); "
        f"certbot {flags}, bytecode cached for both as for ours (PYTHONPYCACHEPREFIX), with fresh "
        "config/work/logs dirs and a new name each run (so a new account and order every "
        "time, as ours starts from fresh storage and a new token); fullchain.pem checked "
        "after every certbot run, the identity verified after every one of ours"
    )
    return [
        Row(
            NAME, "cold one-shot vs certbot certonly", o.median, "ms", ours_text=o.text("ms"),
            peer="certbot certonly (pebble)", peer_value=t.median,
            peer_text=f"certbot {t.text('ms')}", ratio=ratio,
            ratio_text="certbot/ours, higher is better", target=f">= {TARGET:g}x",
            passed=ratio >= TARGET,
            notes=f"{setup}; per-round ratios median {statistics.median(paired):.1f}x "
            f"(min {min(paired):.1f}, max {max(paired):.1f})",
        ),
        Row(
            NAME, "same, certbot minus its 2 s of fixed polling sleeps", o.median, "ms",
            peer="certbot certonly - 2 s", peer_value=t.median - CERTBOT_FIXED_SLEEP_MS,
            ratio=without_sleeps, ratio_text="(certbot - 2 s)/ours", passed=None,
            notes="certbot sleeps 1 s before polling the authorization and 1 s before polling "
            "the order however fast the CA is (its log shows both, and about 0.5 s more "
            "stopping its standalone HTTP server, which is not subtracted here); this row shows "
            "the ratio without the 2 s",
        ),
        Row(
            NAME, "CPU time (user+system) of the same runs", o_cpu.median, "ms",
            ours_text=o_cpu.text("ms", 0), peer="certbot certonly (pebble)",
            peer_value=t_cpu.median, peer_text=f"certbot {t_cpu.text('ms', 0)}",
            ratio=t_cpu.median / o_cpu.median, ratio_text="certbot/ours", passed=None,
            notes="what each process itself computed, sleeps and waits excluded (the CA's and "
            "the auth service's work is in their own processes, not counted); other load moves "
            "it far less than wall time",
        ),
        Row(
            NAME, "certbot's start-up floor", None, "ms", peer="certbot --version",
            peer_value=v.median, peer_text=f"certbot --version {v.text('ms')}, CPU "
            f"{v_cpu.text('ms', 0)}", passed=None,
            notes="certbot's interpreter start, imports and argument parsing alone, timed in "
            "the same rounds",
        ),
    ]  # fmt: skip
