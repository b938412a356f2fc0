"""The cluster on PostgreSQL: CAs live in the database and the first replica to start makes them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tbot_py.authservice.cluster import open_cluster, read_ca_pin
from tbot_py.authservice.errors import BadParameter, ClusterNotInitialized


def test_replicas_starting_together_create_one_set_of_cas(
    postgres_dsn: str, tmp_path: Path
) -> None:
    pins: list[str] = []
    barrier = threading.Barrier(4)

    def start(n: int) -> None:
        barrier.wait()
        pins.append(open_cluster(tmp_path / f"replica-{n}", storage=postgres_dsn).ca_pin)

    threads = [threading.Thread(target=start, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pins) == 4
    assert len(set(pins)) == 1
    assert read_ca_pin(tmp_path / "admin", postgres_dsn) == pins[0]
    # No CA key reaches the data directories.
    assert not list(tmp_path.rglob("*_ca.key"))


def test_an_empty_database_has_no_cluster_for_read_only_commands(
    postgres_dsn: str, tmp_path: Path
) -> None:
    with pytest.raises(ClusterNotInitialized, match="tbot-py auth start"):
        read_ca_pin(tmp_path, postgres_dsn)


def test_another_cluster_name_is_refused(postgres_dsn: str, tmp_path: Path) -> None:
    open_cluster(tmp_path, storage=postgres_dsn, cluster_name="corp.example")
    with pytest.raises(BadParameter, match=r"already holds cluster 'corp\.example'"):
        open_cluster(tmp_path, storage=postgres_dsn, cluster_name="other.example")


def test_a_storage_url_that_is_not_postgres_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadParameter, match="invalid --storage 'mysql' URL"):
        open_cluster(tmp_path, storage="mysql://root:pw@db/x")
