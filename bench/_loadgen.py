"""An HTTPS load generator worker: ``python bench/_loadgen.py`` reads jobs on stdin.

The same generator drives every server under test, so whatever it costs (it shares the
machine's cores with the server) it costs each of them alike per request. It is plain
blocking ``ssl`` sockets in threads, with pre-encoded requests and a minimal HTTP/1.1
reader, to keep its own share of the CPU small.

Protocol: one JSON job per stdin line, one JSON result per stdout line. A job names the
target (address, TLS files, a file of pre-encoded requests), the mode (``new``: a new TLS
connection per request, full handshake, no session resumption; ``keep``: one persistent
connection per thread), the number of threads, and the wall-clock ``start``/``measure``/
``end`` times (``time.time()``); requests finishing inside [measure, end] are counted.
An empty line or EOF ends the worker.
"""

from __future__ import annotations

import base64
import json
import resource
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

#: Latencies are kept to this many per thread and window (a 4-thread, 3 s window at
#: 2000 requests/s is 1500 a thread), enough for a p99.
_MAX_SAMPLES = 20_000


@dataclass
class _Tally:
    ok: int = 0
    errors: int = 0
    first_error: str = ""
    latencies_ms: list[float] = field(default_factory=list)


def _read_response(f: BinaryIO) -> tuple[int, bytes, bool]:
    """Status, body and whether the server will close, from one HTTP/1.1 response."""
    status_line = f.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split(b" ", 2)[1])
    length = -1
    chunked = closing = False
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            closing = True
    if chunked:
        parts = []
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            parts.append(f.read(size))
            f.readline()
        body = b"".join(parts)
    elif length >= 0:
        body = f.read(length)
    else:
        body, closing = f.read(), True
    return status, body, closing


class _Target:
    """One server: where it is, how to reach it over TLS, and the requests to send it."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.host = str(job["host"])
        self.port = int(job["port"])
        self.server_name = str(job.get("server_name") or self.host)
        self.expect = str(job["expect"]).encode()
        ctx = ssl.create_default_context(cafile=job["ca"])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if job.get("cert"):
            ctx.load_cert_chain(job["cert"], job["key"])
        self.ctx = ctx
        with open(job["requests"], "rb") as f:
            self.requests = [base64.b64decode(line) for line in f if line.strip()]
        keep, close = b"Connection: keep-alive\r\n", b"Connection: close\r\n"
        self.close_requests = [r.replace(keep, close) for r in self.requests]

    def connect(self) -> tuple[ssl.SSLSocket, BinaryIO]:
        raw = socket.create_connection((self.host, self.port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = self.ctx.wrap_socket(raw, server_hostname=self.server_name)
        return conn, conn.makefile("rb")


def _drive(target: _Target, first: int, stride: int, job: dict[str, Any], tally: _Tally) -> None:
    """Send requests first, first+stride, ... until ``job["end"]``; count into ``tally``."""
    mode = job["mode"]
    measure, end = float(job["measure"]), float(job["end"])
    requests = target.requests if mode == "keep" else target.close_requests
    n = len(requests)
    i = first
    conn: ssl.SSLSocket | None = None
    reader: BinaryIO | None = None
    while True:
        started = time.time()
        if started >= end:
            break
        t0 = time.perf_counter()
        try:
            if conn is None or reader is None:
                conn, reader = target.connect()
            conn.sendall(requests[i % n])
            status, body, closing = _read_response(reader)
            t1 = time.perf_counter()
            if status != 200 or target.expect not in body:
                raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        except Exception as exc:  # counted, and the connection is started afresh
            tally.errors += 1
            tally.first_error = tally.first_error or f"{type(exc).__name__}: {exc}"[:300]
            closing = True
            t1 = 0.0
        else:
            if started >= measure and time.time() <= end:
                tally.ok += 1
                if len(tally.latencies_ms) < _MAX_SAMPLES:
                    tally.latencies_ms.append((t1 - t0) * 1000)
        if closing or mode == "new":
            if reader is not None:
                reader.close()
            if conn is not None:
                conn.close()
            conn = reader = None
        i += stride
    if conn is not None:
        conn.close()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_job(job: dict[str, Any], targets: dict[str, _Target]) -> dict[str, Any]:
    """Run one window against one target; return counts, latencies and our CPU time."""
    key = job["requests"]
    if key not in targets:
        targets[key] = _Target(job)
    target = targets[key]
    threads = int(job["threads"])
    tallies = [_Tally() for _ in range(threads)]
    offset = int(job.get("offset", 0))
    workers = [
        threading.Thread(
            target=_drive,
            args=(target, offset + t, threads * int(job.get("stride", 1)), job, tally),
            daemon=True,
        )
        for t, tally in enumerate(tallies)
    ]
    time.sleep(max(0.0, float(job["start"]) - time.time()))
    for w in workers:
        w.start()
    time.sleep(max(0.0, float(job["measure"]) - time.time()))
    cpu0 = _cpu_s()
    time.sleep(max(0.0, float(job["end"]) - time.time()))
    cpu1 = _cpu_s()
    for w in workers:
        w.join()
    return {
        "ok": sum(t.ok for t in tallies),
        "errors": sum(t.errors for t in tallies),
        "first_error": next((t.first_error for t in tallies if t.first_error), ""),
        "latencies_ms": [x for t in tallies for x in t.latencies_ms],
        "cpu_s": cpu1 - cpu0,
    }


def main() -> int:
    targets: dict[str, _Target] = {}
    for line in sys.stdin:
        if not line.strip():
            break
        result = run_job(json.loads(line), targets)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
