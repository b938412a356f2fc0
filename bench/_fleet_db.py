"""The storage ceiling behind the fleet extrapolation: renewals per second the database allows.

    python bench/_fleet_db.py [--seconds 10] [--threads 8] [--postgres]

Every renewal is one write transaction (``InstanceStore.renew``), and both backends run
write transactions one at a time: SQLite's single writer, PostgreSQL's one advisory lock
(``WRITE_LOCK_KEY``) that every write takes. The certificates are signed inside that
transaction. So no number of replicas renews faster than this loop: ``--threads`` threads,
each renewing its own bot instances back to back through the real store with the real
signing code (the auth service's own ``issue``), no HTTP and no TLS. Reports renewals/s
and the time each write transaction held the lock. ``--postgres`` starts a throwaway
PostgreSQL (as the tests do: ``tests/pg.py``; note its ``fsync=off``).
Not part of ``make bench``: its figures are quoted in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tbot_py.authservice import admin, ca
from tbot_py.authservice.app import certificate_profile
from tbot_py.authservice.cluster import Cluster, open_cluster
from tbot_py.identity import keys


def renew_loop(cluster: Cluster, seconds: float, threads: int) -> tuple[int, list[float]]:
    """(renewals done, each one's duration in ms) with ``threads`` threads for ``seconds``."""
    bot = admin.add_bot(cluster, f"db-{uuid.uuid4().hex[:8]}", roles=("access",))
    profile = certificate_profile(bot.bot, [])
    public_key = keys.generate_private_key().public_key()
    spki = keys.spki_der(public_key)
    durations: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        token = admin.add_token(cluster, bot.bot.name).token
        instance = str(uuid.uuid4())
        now = datetime.now(UTC)
        cluster.storage.instances.join(keys.token_hash(token), instance_id=instance, now=now)
        generation = 1
        while time.monotonic() < deadline:
            now = datetime.now(UTC)
            expires = now + timedelta(hours=1)

            def issue(
                gen: int, now: datetime = now, expires: datetime = expires
            ) -> tuple[str, datetime]:
                certs = ca.issue_bot_identity(
                    cluster.cas, profile, instance_id=instance, generation=gen,
                    public_key=public_key, expires=expires, now=now,
                )  # fmt: skip
                return json.dumps(certs.to_json()), expires

            t0 = time.perf_counter()
            answer = cluster.storage.instances.renew(
                bot.bot.name, instance, presented=generation, new_key_spki=spki, now=now,
                issue=issue,
            )  # fmt: skip
            elapsed = (time.perf_counter() - t0) * 1000
            generation = answer.generation
            with lock:
                durations.append(elapsed)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return len(durations), durations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tbot-py-db-") as tmp:
        if args.postgres:
            from tests.pg import start_postgres

            started = start_postgres()
            pg = next(started).server
            if pg is None:
                raise SystemExit("PostgreSQL could not start")
            try:
                cluster = open_cluster(Path(tmp) / "auth", storage=pg.new_database())
                done, durations = renew_loop(cluster, args.seconds, args.threads)
            finally:
                started.close()
        else:
            cluster = open_cluster(Path(tmp) / "auth")
            done, durations = renew_loop(cluster, args.seconds, args.threads)
    durations.sort()
    backend = "PostgreSQL (fsync=off)" if args.postgres else "SQLite (WAL)"
    print(
        f"{backend}: {done / args.seconds:.0f} renewals/s with {args.threads} threads; "
        f"each {statistics.median(durations):.1f} ms median, "
        f"p99 {durations[int(len(durations) * 0.99)]:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
