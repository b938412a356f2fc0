from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tbot_py.diagnostics.health import HealthRegistry
from tbot_py.diagnostics.http import DiagnosticsServer, parse_listen_address
from tbot_py.diagnostics.metrics import Metrics
from tbot_py.errors import ConfigError

from .conftest import FakeClock, succeed

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> object:
        return json.loads(self.body)


def get(base: str, path: str, timeout: float = 5) -> Answer:
    try:
        with _NO_PROXY.open(f"http://{base}{path}", timeout=timeout) as resp:
            return Answer(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), exc.read())


def parse_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def wired(clock: FakeClock, metrics: Metrics) -> HealthRegistry:
    return HealthRegistry(clock, observer=metrics)


@pytest.fixture
def server(wired: HealthRegistry, metrics: Metrics) -> Iterator[str]:
    diagnostics = DiagnosticsServer("127.0.0.1:0", wired, metrics, wait_cap=1)
    bound = diagnostics.start()
    try:
        yield bound
    finally:
        diagnostics.stop()


def test_start_binds_an_ephemeral_port_on_loopback(server: str) -> None:
    host, port = parse_listen_address(server)
    assert host == "127.0.0.1"
    assert port > 0


def test_livez_is_ok(server: str) -> None:
    answer = get(server, "/livez")
    assert (answer.status, answer.body) == (200, b"OK")


def test_readyz_is_503_with_tbots_shape_while_initializing(
    server: str, wired: HealthRegistry
) -> None:
    wired.register("identity", "bot")
    answer = get(server, "/readyz")
    assert answer.status == 503
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json() == {
        "status": "unhealthy",
        "services": {
            "identity": {
                "status": "initializing",
                "updated_at": None,
                "not_after": None,
                "next_renewal": None,
                "last_success": None,
                "consecutive_failures": 0,
            }
        },
    }
    assert answer.body.startswith(b'{\n  "status": "unhealthy",\n  "services": {\n    "identity"')


def test_readyz_is_200_when_every_service_is_healthy(
    server: str, wired: HealthRegistry, clock: FakeClock
) -> None:
    wired.register("identity", "bot")
    wired.register("out", "identity")
    succeed(wired, "identity", clock)
    succeed(wired, "out", clock)
    answer = get(server, "/readyz")
    assert answer.status == 200
    assert answer.json() == {
        "status": "healthy",
        "services": {
            name: {
                "status": "healthy",
                "updated_at": "2026-01-01T12:00:00Z",
                "not_after": "2026-01-01T13:00:00Z",
                "next_renewal": "2026-01-01T12:20:00Z",
                "last_success": "2026-01-01T12:00:00Z",
                "consecutive_failures": 0,
            }
            for name in ("identity", "out")
        },
    }


def test_readyz_service_answers_its_own_status(
    server: str, wired: HealthRegistry, clock: FakeClock
) -> None:
    wired.register("identity", "bot")
    wired.register("out", "identity")
    succeed(wired, "identity", clock)
    wired.report_failure("out", "permission denied", next_retry=clock.now, duration=0.1)

    healthy = get(server, "/readyz/identity")
    assert healthy.status == 200
    assert healthy.json()["status"] == "healthy"  # type: ignore[index]

    failing = get(server, "/readyz/out")
    assert failing.status == 503
    document = failing.json()
    assert isinstance(document, dict)
    assert (document["status"], document["reason"]) == ("unhealthy", "permission denied")
    assert document["consecutive_failures"] == 1


def test_readyz_unknown_service_is_404_with_tbots_error(server: str) -> None:
    answer = get(server, "/readyz/nope")
    assert answer.status == 404
    assert answer.json() == {"error": 'Service named "nope" not found.'}


def test_unknown_paths_get_404_text_with_a_pointer_to_the_docs(server: str) -> None:
    for path in ("/", "/nope", "/readyz/a/b", "/livez/x"):
        answer = get(server, path)
        assert answer.status == 404, path
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert b"https://" in answer.body


def test_wait_blocks_until_every_service_has_reported(
    server: str, wired: HealthRegistry, clock: FakeClock
) -> None:
    wired.register("identity", "bot")
    timer = threading.Timer(0.1, succeed, (wired, "identity", clock))
    started = time.monotonic()
    timer.start()
    try:
        answer = get(server, "/wait")
    finally:
        timer.cancel()
    assert 0.09 < time.monotonic() - started < 1.5
    assert answer.status == 200
    assert answer.json()["status"] == "healthy"  # type: ignore[index]


def test_wait_for_a_service_answers_its_status_once_it_reports(
    server: str, wired: HealthRegistry, clock: FakeClock
) -> None:
    wired.register("identity", "bot")
    wired.register("out", "identity")
    report = lambda: wired.report_failure("out", "boom", next_retry=clock.now, duration=0.1)  # noqa: E731
    timer = threading.Timer(0.1, report)
    timer.start()
    try:
        answer = get(server, "/wait/out")
    finally:
        timer.cancel()
    assert answer.status == 503
    assert answer.json()["reason"] == "boom"  # type: ignore[index]
    assert get(server, "/wait/nope").status == 404


def test_wait_answers_like_readyz_at_the_cap(server: str, wired: HealthRegistry) -> None:
    wired.register("identity", "bot")
    started = time.monotonic()
    answer = get(server, "/wait")  # the fixture caps waits at 1 s
    assert 0.9 < time.monotonic() - started < 3
    assert answer.status == 503
    assert answer.json()["services"]["identity"]["status"] == "initializing"  # type: ignore[index]


def test_metrics_expose_every_metric_with_service_and_task_labels(
    server: str, wired: HealthRegistry, clock: FakeClock
) -> None:
    wired.register("identity", "bot")
    wired.register("out", "identity")
    wired.report_failure("identity", "boom", next_retry=clock.now, duration=0.2)
    succeed(wired, "identity", clock, attempt=1)
    succeed(wired, "out", clock)
    answer = get(server, "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = answer.body.decode()
    samples = parse_samples(text)
    identity = {"service": "identity", "name": "bot-identity-renewal"}
    out = {"service": "out", "name": "output-renewal"}
    expected = [
        ("tbot_task_iterations_total", identity, 2),
        ("tbot_task_iterations_total", out, 1),
        ("tbot_task_iterations_failed", identity, 1),
        ("tbot_task_iterations_failed", out, 0),
        ("tbot_task_iterations_successful_bucket", {**identity, "le": "0.0"}, 0),
        ("tbot_task_iterations_successful_bucket", {**identity, "le": "1.0"}, 1),
        ("tbot_task_iterations_successful_count", identity, 1),
        ("tbot_task_iteration_duration_seconds_bucket", {**out, "le": "0.1"}, 0),
        ("tbot_task_iteration_duration_seconds_bucket", {**out, "le": "0.30625"}, 1),
        ("tbot_task_iteration_duration_seconds_bucket", {**out, "le": "1.6413085937500003"}, 1),
        ("tbot_task_iteration_duration_seconds_sum", identity, 0.45),
        ("tbot_py_credential_not_after_timestamp_seconds", {"service": "out"}, 1767272400),
        ("tbot_py_next_renewal_timestamp_seconds", {"service": "out"}, 1767270000),
        ("tbot_py_last_success_timestamp_seconds", {"service": "identity"}, 1767268800),
        ("tbot_py_consecutive_failures", {"service": "identity"}, 0),
    ]
    for name, labels, value in expected:
        key = (name, frozenset(labels.items()))
        assert samples.get(key) == pytest.approx(value), key
    assert "# TYPE tbot_task_iterations_total counter" in text
    assert "_created" not in text
    assert "tbot_task_iterations_failed_total" not in text


def test_metrics_track_failures_and_forget_unregistered_services(
    server: str, wired: HealthRegistry, clock: FakeClock
) -> None:
    wired.register("out", "identity")
    for _ in range(3):
        wired.report_failure("out", "boom", next_retry=clock.now + timedelta(seconds=5), duration=1)
    text = get(server, "/metrics").body.decode()
    failures = ("tbot_py_consecutive_failures", frozenset({("service", "out")}))
    assert parse_samples(text)[failures] == 3
    assert "tbot_py_credential_not_after_timestamp_seconds{" not in text
    wired.unregister("out")
    assert 'service="out"' not in get(server, "/metrics").body.decode()


def test_metrics_is_404_when_not_enabled(wired: HealthRegistry) -> None:
    diagnostics = DiagnosticsServer("127.0.0.1:0", wired, None)
    bound = diagnostics.start()
    try:
        assert get(bound, "/metrics").status == 404
        assert get(bound, "/livez").status == 200
    finally:
        diagnostics.stop()


def test_stop_closes_the_port(wired: HealthRegistry) -> None:
    diagnostics = DiagnosticsServer("127.0.0.1:0", wired, None)
    bound = diagnostics.start()
    diagnostics.stop()
    diagnostics.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        get(bound, "/livez", timeout=1)


def test_a_port_in_use_is_one_clear_error(server: str, wired: HealthRegistry) -> None:
    with pytest.raises(ConfigError, match="cannot listen on diagnostics address"):
        DiagnosticsServer(server, wired, None).start()


@pytest.mark.parametrize("addr", ["3001", "localhost", "127.0.0.1:http", "127.0.0.1:70000"])
def test_bad_addresses_are_rejected(addr: str) -> None:
    with pytest.raises(ConfigError, match="must be host:port"):
        parse_listen_address(addr)


def test_addresses_parse_with_ipv6_brackets_and_empty_hosts() -> None:
    assert parse_listen_address("[::1]:3001") == ("::1", 3001)
    assert parse_listen_address(":3001") == ("", 3001)


def test_requests_are_not_logged_at_info(
    server: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    get(server, "/livez")
    get(server, "/nope")
    assert capfd.readouterr().err == ""
    assert [r for r in caplog.records if r.name.startswith("tbot_py.diagnostics.http")] == []
