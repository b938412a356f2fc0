"""Issuance throughput: our auth service against cfssl (Go), and the signing floor.

Both servers are driven by one load generator (``bench/_loadgen.py``: worker processes
of blocking TLS sockets in threads, pre-encoded requests) at the same concurrency, with
ECDSA P-256 everywhere (CAs, server certificates, client certificates, requested keys),
over TLS on 127.0.0.1 with client certificates (mTLS) for both:

* ours: ``POST /v1/bot/certs`` (the impersonated identity an identity output asks for;
  one X.509 and one SSH certificate per request), authenticated by the bot certificate
  of a real token join (``tbot-py start identity --oneshot``). Not ``/v1/bot/renew``:
  renewal advances the bot's generation and is single-flight per bot. Measured with
  ``auth start --workers <cores>`` (the headline) and with the default single process.
* cfssl: ``cfssl serve`` (Debian golang-cfssl) with ``-mutual-tls-ca``,
  ``POST /api/v1/cfssl/sign`` with a P-256 CSR (one X.509 certificate per request).

Each request carries a different key from a pre-generated pool, so no key generation is
measured. Two cases: a new TLS connection per request (full handshake, no resumption) and
one keep-alive connection per generator thread. Windows rotate between the servers so
the drift of this shared machine hits all alike. The generator shares the cores with the
server under test; that is fair only because it is the same generator for both, and its
CPU time per request is reported, as is the server's (and how many cores it kept busy:
well under the machine's means the server waits, e.g. on the disk, rather than computes).

The floor: issuances per second in one process with ``cryptography`` and the service's own
certificate code (no HTTP, TLS or storage), and our throughput as a fraction of it.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    TBOT,
    Context,
    Row,
    Stats,
    auth_service,
    clean_env,
    free_port,
    need,
    stop_process,
)

NAME = "issuance"
TARGET_RATIO = 1.0
CONCURRENCY = 8  # requests in flight: GENERATORS processes x threads each
GENERATORS = 2
WORKERS = os.cpu_count() or 2  # ours: auth start --workers, one per core
KEY_POOL = 2048
WARMUP_S = 0.5
FLOOR_ROUNDS = 5
LOADGEN = str(Path(__file__).resolve().parent / "_loadgen.py")
CASES = (("new", "new connection per request"), ("keep", "keep-alive"))


# -- requests ---------------------------------------------------------------------------


def _http_request(host: str, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


def _write_requests(path: Path, requests: list[bytes]) -> None:
    path.write_bytes(b"".join(base64.b64encode(r) + b"\n" for r in requests))


def _our_requests(host: str, n: int) -> list[bytes]:
    """``POST /v1/bot/certs`` bodies, each for a fresh P-256 key, as the identity output sends."""
    from tbot_py.bot.identity import fresh_public_keys
    from tbot_py.client import wire
    from tbot_py.identity import keys

    expires = datetime.now(UTC) + timedelta(hours=1)
    out = []
    for _ in range(n):
        req = wire.ImpersonateRequest(
            keys=fresh_public_keys(keys.generate_private_key()), expires=expires
        )
        out.append(_http_request(host, wire.PATH_CERTS, json.dumps(req.to_json()).encode()))
    return out


def _cfssl_requests(host: str, n: int) -> list[bytes]:
    """``POST /api/v1/cfssl/sign`` bodies, each a CSR for a fresh P-256 key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, f"bench-leaf-{i}"),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "access"),
                    ]
                )
            )
            .sign(key, hashes.SHA256())
        )
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        body = json.dumps({"certificate_request": pem}).encode()
        out.append(_http_request(host, "/api/v1/cfssl/sign", body))
    return out


# -- servers ----------------------------------------------------------------------------


@dataclass
class Server:
    """A server under test: its process, how the generator reaches it, and its results."""

    label: str
    pid: int
    job: dict[str, Any]  # the target part of a generator job
    windows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _our_server(ctx: Context, stack: ExitStack, workers: int) -> Server:
    from tbot_py.identity.model import split_pem_certs

    work = ctx.work / f"ours-{workers}"
    work.mkdir()
    auth = stack.enter_context(auth_service(work / "auth", "--workers", str(workers)))
    token = auth.add_bot("bench", roles="access")
    storage, out = work / "bot", work / "out"
    subprocess.run(
        [TBOT, "start", "identity", "--oneshot", "--auth-server", auth.addr,
         "--ca-pin", auth.ca_pin, "--storage", str(storage), "--destination", str(out)],
        env=clean_env(TELEPORT_BOT_TOKEN=token), capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    host, _, port = auth.addr.rpartition(":")
    tls = work / "tls"
    tls.mkdir()
    # The bot's own identity, from its storage: the key and certificate it renews with.
    (tls / "client.pem").write_bytes((storage / "tlscert").read_bytes())
    (tls / "client-key.pem").write_bytes((storage / "key").read_bytes())
    cas = split_pem_certs((storage / "tlscacerts").read_bytes())  # stored with a "$" separator
    (tls / "ca.pem").write_bytes(b"".join(cas))
    _write_requests(tls / "requests", _our_requests(auth.addr, KEY_POOL))
    job = {
        "host": host,
        "port": int(port),
        "ca": str(tls / "ca.pem"),
        "cert": str(tls / "client.pem"),
        "key": str(tls / "client-key.pem"),
        "requests": str(tls / "requests"),
        "expect": '"tls"',
    }
    return Server(f"tbot-py/{workers}w", auth.process.pid, job)


def _cfssl(cfssl: str, *args: str, cwd: Path) -> None:
    made = subprocess.run(
        [cfssl, *args], cwd=cwd, capture_output=True, check=True, timeout=60
    ).stdout
    bundle = json.loads(made)
    name = args[-1].removesuffix(".json")
    (cwd / f"{name}.pem").write_text(bundle["cert"])
    (cwd / f"{name}-key.pem").write_text(bundle["key"])


def _cfssl_server(ctx: Context, stack: ExitStack) -> Server:
    cfssl = need("cfssl", "golang-cfssl")
    d = ctx.work / "cfssl"
    d.mkdir()
    p256 = {"algo": "ecdsa", "size": 256}
    specs = {
        "ca.json": {"CN": "bench CA", "key": p256, "names": [{"O": "bench"}]},
        "server.json": {"CN": "127.0.0.1", "hosts": ["127.0.0.1", "localhost"], "key": p256},
        "client.json": {"CN": "bench-client", "key": p256},
    }
    for name, spec in specs.items():
        (d / name).write_text(json.dumps(spec))
    _cfssl(cfssl, "gencert", "-initca", "ca.json", cwd=d)
    for name in ("server.json", "client.json"):
        _cfssl(cfssl, "gencert", "-ca", "ca.pem", "-ca-key", "ca-key.pem", name, cwd=d)
    port = free_port()
    log = stack.enter_context((d / "serve.log").open("wb"))
    process = subprocess.Popen(
        [cfssl, "serve", "-address", "127.0.0.1", "-port", str(port),
         "-ca", "ca.pem", "-ca-key", "ca-key.pem", "-tls-cert", "server.pem",
         "-tls-key", "server-key.pem", "-mutual-tls-ca", "ca.pem", "-loglevel", "3"],
        cwd=d, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    stack.callback(_stop, process)
    _write_requests(d / "requests", _cfssl_requests(f"127.0.0.1:{port}", KEY_POOL))
    job = {
        "host": "127.0.0.1",
        "port": port,
        "ca": str(d / "ca.pem"),
        "cert": str(d / "client.pem"),
        "key": str(d / "client-key.pem"),
        "requests": str(d / "requests"),
        "expect": '"success":true',
    }
    _wait_listening(port, process)
    return Server("cfssl", process.pid, job)


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"cfssl serve exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("cfssl serve did not start listening")


def _stop(process: subprocess.Popen[bytes]) -> None:
    stop_process(process)


def _tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its direct children (all threads), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


# -- the generator ----------------------------------------------------------------------


@contextmanager
def _generators(n: int) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [
        subprocess.Popen(
            [PYTHON, LOADGEN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _window(
    gens: list[subprocess.Popen[str]], server: Server, mode: str, seconds: float
) -> dict[str, Any]:
    """One measured window against ``server``: requests/s, latencies, CPU of both sides."""
    threads = CONCURRENCY // len(gens)
    start = time.time() + 0.1
    measure, end = start + WARMUP_S, start + WARMUP_S + seconds
    for i, gen in enumerate(gens):
        job = dict(server.job, mode=mode, threads=threads, offset=i * threads, stride=len(gens))
        job.update(start=start, measure=measure, end=end)
        assert gen.stdin is not None
        gen.stdin.write(json.dumps(job) + "\n")
        gen.stdin.flush()
    time.sleep(max(0.0, measure - time.time()))
    cpu0 = _tree_cpu_s(server.pid)
    time.sleep(max(0.0, end - time.time()))
    cpu1 = _tree_cpu_s(server.pid)
    results = []
    for gen in gens:
        assert gen.stdout is not None
        line = gen.stdout.readline()
        if not line:
            raise RuntimeError("a load generator process died")
        results.append(json.loads(line))
    ok = sum(r["ok"] for r in results)
    errors = sum(r["errors"] for r in results)
    if errors and not ok:
        first = next(r["first_error"] for r in results if r["first_error"])
        raise RuntimeError(f"{server.label}: every request failed, e.g. {first}")
    return {
        "rps": ok / seconds,
        "ok": ok,
        "errors": errors,
        "latencies": [x for r in results for x in r["latencies_ms"]],
        "server_cpu_s": cpu1 - cpu0,
        "gen_cpu_s": sum(r["cpu_s"] for r in results),
    }


@dataclass
class Measured:
    """One server in one case, over every window."""

    rps: Stats
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_ms: float  # CPU milliseconds per request, server
    gen_cpu_ms: float  # and generator


def _summarise(windows: list[dict[str, Any]]) -> Measured:
    latencies = sorted(x for w in windows for x in w["latencies"])
    ok = sum(w["ok"] for w in windows) or 1
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else []
    return Measured(
        rps=Stats.of([w["rps"] for w in windows]),
        p50_ms=q[49] if q else float("nan"),
        p99_ms=q[98] if q else float("nan"),
        errors=sum(w["errors"] for w in windows),
        server_cpu_ms=1000 * sum(w["server_cpu_s"] for w in windows) / ok,
        gen_cpu_ms=1000 * sum(w["gen_cpu_s"] for w in windows) / ok,
    )


# -- the floor: signing in one process --------------------------------------------------


def _per_second(fn: Any, seconds: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            fn()
        n += 20
    return n / elapsed


def signing_floor(seconds: float) -> dict[str, float]:
    """Operations/s in this process with ``cryptography`` and the service's own code.

    ``issue``: one whole issuance as ``/v1/bot/certs`` does it (X.509 + SSH certificate,
    PEM and line encodings), the floor per request. ``x509`` and ``ssh``: each alone.
    ``ecdsa``: bare P-256 signatures of a certificate-sized message, the primitive.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from tbot_py.authservice import ca
    from tbot_py.identity import keys
    from tbot_py.identity.tlsid import TLSIdentity

    now = datetime.now(UTC)
    cas = ca.create_cluster_cas("tbot-py.local", now)
    public = keys.generate_private_key().public_key()
    expires = (now + timedelta(hours=1)).replace(microsecond=0)
    bot = ca.BotProfile(name="bench", roles=("access",))
    instance = "0a47c24b-1f90-4cc0-8c1d-03d2ef02fb62"
    identity = TLSIdentity(
        username=bot.username,
        groups=bot.roles,
        principals=ca.bot_principals(bot, instance, internal_join=False),
        route_to_cluster=cas.cluster_name,
        teleport_cluster=cas.cluster_name,
        impersonator=bot.username,
        disallow_reissue=True,
        bot_name=bot.name,
        bot_instance_id=instance,
    )
    subject = identity.to_subject()
    message = b"x" * 600
    ops = {
        "issue": lambda: ca.issue_impersonated_identity(
            cas,
            bot,
            instance_id=instance,
            roles=bot.roles,
            public_key=public,
            expires=expires,
            reissuable=False,
            route_to_cluster="",
            now=now,
        ),
        "x509": lambda: cas.user.identity_leaf.sign(
            cas.user.key,
            subject=subject,
            public_key=public,
            serial=1,
            not_before=now,
            not_after=expires,
        ),
        "ssh": lambda: ca._sign_ssh_user_cert(cas.user, identity, public, expires=expires, now=now),
        "ecdsa": lambda: cas.user.key.sign(message, ec.ECDSA(hashes.SHA256())),
    }
    # Short bursts, round-robin, median of each: drift on this shared machine hits all alike.
    rates: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(FLOOR_ROUNDS):
        for name, op in ops.items():
            rates[name].append(_per_second(op, seconds / len(ops) / FLOOR_ROUNDS))
    return {name: statistics.median(values) for name, values in rates.items()}


# -- the benchmark ----------------------------------------------------------------------


def _measure(ctx: Context, servers: list[Server], rounds: int, seconds: float) -> None:
    with _generators(GENERATORS) as gens:
        for mode, _ in CASES:
            for s in servers:  # one untimed pass: connections, caches, lazy imports
                _window(gens, s, mode, min(seconds / 2, 1.0))
            for r in range(rounds):
                # Rotate who goes first so no server always follows the same one.
                shift = r % len(servers)
                for s in servers[shift:] + servers[:shift]:
                    w = _window(gens, s, mode, seconds)
                    s.windows.setdefault(mode, []).append(w)
                    ctx.log(f"   {mode:4} {s.label:12} {w['rps']:7.0f} req/s errors {w['errors']}")


def _detail(label: str, m: Measured) -> str:
    return (
        f"{label} {m.rps.text('req/s', 0)}, p50 {m.p50_ms:.1f} ms, p99 {m.p99_ms:.1f} ms, "
        f"{m.errors} errors, server CPU {m.server_cpu_ms:.2f} ms/req (busy "
        f"{m.server_cpu_ms * m.rps.median / 1000:.2f} of {os.cpu_count()} cores), "
        f"generator CPU {m.gen_cpu_ms:.2f} ms/req"
    )


def run(ctx: Context) -> list[Row]:
    rounds, seconds = (2, 1.0) if ctx.quick else (4, 3.0)
    floor = signing_floor(1.0 if ctx.quick else 4.0)
    with ExitStack() as stack:
        ours = _our_server(ctx, stack, WORKERS)
        single = _our_server(ctx, stack, 1)
        peer = _cfssl_server(ctx, stack)
        _measure(ctx, [ours, peer, single], rounds, seconds)
    method = (
        f"{CONCURRENCY} requests in flight from {GENERATORS} generator processes (the same "
        f"generator for both; it shares the {os.cpu_count()} cores with the server), P-256 keys "
        f"and mTLS for both; ours POST /v1/bot/certs (X.509 + SSH certificate), cfssl POST "
        f"/api/v1/cfssl/sign (X.509 only); {rounds} interleaved windows of {seconds:g} s per "
        f"server after {WARMUP_S:g} s warm-up each"
    )
    rows = []
    for mode, title in CASES:
        a, b = _summarise(ours.windows[mode]), _summarise(peer.windows[mode])
        one = _summarise(single.windows[mode])
        ratio = a.rps.median / b.rps.median
        rows.append(
            Row(
                NAME,
                f"requests/s, {title}, auth start --workers {WORKERS}",
                a.rps.median,
                "req/s",
                ours_text=_detail("ours", a),
                peer="cfssl serve",
                peer_value=b.rps.median,
                peer_text=_detail("cfssl", b),
                ratio=ratio,
                ratio_text="ours/cfssl",
                target=f">= {TARGET_RATIO:.1f}x",
                passed=ratio >= TARGET_RATIO,
                notes=method,
            )
        )
        for label, attr in (("p50", "p50_ms"), ("p99", "p99_ms")):
            ours_ms, peer_ms = getattr(a, attr), getattr(b, attr)
            rows.append(
                Row(
                    NAME,
                    f"{label} latency, {title}, --workers {WORKERS}",
                    ours_ms,
                    "ms",
                    peer="cfssl serve",
                    peer_value=peer_ms,
                    ratio=ours_ms / peer_ms if peer_ms else None,
                    ratio_text="ours/cfssl, lower is better",
                )
            )
        rows.append(
            Row(
                NAME,
                f"requests/s, {title}, one worker (the default)",
                one.rps.median,
                "req/s",
                ours_text=_detail("ours", one),
                peer="cfssl serve",
                peer_value=b.rps.median,
                ratio=one.rps.median / b.rps.median,
                ratio_text="ours/cfssl",
            )
        )
    best = max(_summarise(ours.windows[m]).rps.median for m, _ in CASES)
    rows.append(
        Row(
            NAME,
            "signing floor: one issuance (X.509 + SSH certificate), one process",
            floor["issue"],
            "issues/s",
            ours_text=f"X.509 leaf alone {floor['x509']:.0f}/s, SSH certificate alone "
            f"{floor['ssh']:.0f}/s, bare ECDSA P-256 signature {floor['ecdsa']:.0f}/s "
            "(cryptography, the service's own templates and encoders, no HTTP, TLS or storage)",
            peer=f"our best req/s (--workers {WORKERS})",
            peer_value=best,
            ratio=best / floor["issue"],
            ratio_text="ours / floor",
            notes="how close the service comes to the cost of signing alone in one process "
            f"(with {WORKERS} workers it may exceed 1.0)",
        )
    )
    return rows
