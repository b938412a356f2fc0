from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tbot_py.cli.main import main
from tbot_py.cli.wait import describe_answer, wait_url
from tbot_py.diagnostics.health import HealthRegistry
from tbot_py.diagnostics.http import DiagnosticsServer

from .conftest import FakeClock, succeed


@pytest.fixture
def server(registry: HealthRegistry) -> Iterator[str]:
    diagnostics = DiagnosticsServer("127.0.0.1:0", registry, None, wait_cap=1)
    bound = diagnostics.start()
    try:
        yield bound
    finally:
        diagnostics.stop()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_wait_prints_readyz_once_every_service_has_reported(
    server: str, registry: HealthRegistry, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.register("identity", "bot")
    timer = threading.Timer(0.1, succeed, (registry, "identity", clock))
    timer.start()
    try:
        code, out, err = run(["wait", "--diag-addr", server, "--timeout", "5s"], capsys)
    finally:
        timer.cancel()
    assert (code, err) == (0, "")
    assert json.loads(out)["status"] == "healthy"


def test_wait_for_one_service_ignores_the_others(
    server: str, registry: HealthRegistry, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.register("identity", "bot")
    registry.register("out", "identity")
    succeed(registry, "out", clock)
    code, out, _ = run(["wait", "--diag-addr", server, "--service", "out"], capsys)
    assert code == 0
    assert json.loads(out)["status"] == "healthy"


def test_wait_times_out_with_the_last_status(
    server: str, registry: HealthRegistry, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.register("identity", "bot")
    registry.report_failure("identity", "access denied", next_retry=clock.now, duration=0.1)
    started = time.monotonic()
    code, out, err = run(["wait", "--diag-addr", server, "--timeout", "300ms"], capsys)
    assert 0.25 < time.monotonic() - started < 2
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith("ERROR: timed out after 300ms waiting for http://")
    assert "last status: HTTP 503: unhealthy; identity unhealthy (access denied)" in err


def test_wait_keeps_trying_while_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = run(["wait", "--diag-addr", f"127.0.0.1:{port}", "--timeout", "200ms"], capsys)
    assert code == 1
    assert "last status: cannot connect" in err


def test_wait_rejects_a_bad_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["wait", "--diag-addr", "127.0.0.1:1", "--timeout", "soon"], capsys)
    assert code == 1
    assert err.startswith("ERROR: --timeout: invalid duration")


def test_wait_url_handles_services_ipv6_and_empty_hosts() -> None:
    assert wait_url("127.0.0.1:3001", None) == "http://127.0.0.1:3001/wait"
    assert wait_url("http://127.0.0.1:3001/", "a b") == "http://127.0.0.1:3001/wait/a%20b"
    assert wait_url("[::1]:3001", None) == "http://[::1]:3001/wait"
    assert wait_url(":3001", "x") == "http://127.0.0.1:3001/wait/x"


def test_describe_answer_summarises_each_shape() -> None:
    assert describe_answer(404, b'{"error": "Service named \\"x\\" not found."}') == (
        'HTTP 404: Service named "x" not found.'
    )
    assert describe_answer(503, b'{"status": "unhealthy", "reason": "boom"}') == (
        "HTTP 503: unhealthy (boom)"
    )
    assert describe_answer(502, b"bad\ngateway") == "HTTP 502: bad gateway"
