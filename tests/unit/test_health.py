"""The HTTP /healthz endpoint (what the livenessprobe sidecar did) and the time bound on readiness checks."""

from __future__ import annotations

import http.client
import logging
import threading
import time

import grpc
import pytest

from csi_driver import cli
from csi_driver.config import load_config
from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.server.endpoint import parse_endpoint
from csi_driver.server.grpc_server import CsiServer, ServerOptions
from csi_driver.server.health import HealthEndpoint
from csi_driver.services.identity import IdentityService


def get(port: int, path: str = "/healthz", timeout: float = 10) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def serve(checks, check_timeout: float = 5.0) -> HealthEndpoint:
    identity = IdentityService("berth.test", controller=False, checks=checks, check_timeout=check_timeout)
    endpoint = HealthEndpoint("127.0.0.1", 0, identity.not_ready_reason)
    endpoint.start()
    return endpoint


@pytest.fixture
def hung():
    """A check that blocks until the test ends, like stat() on a dead NFS server; counts its calls."""
    release = threading.Event()
    calls = []

    def check():
        calls.append(time.monotonic())
        release.wait(30)
        return None

    check.calls = calls
    yield check
    release.set()


def test_ok_when_every_check_passes():
    endpoint = serve([lambda: None, lambda: None])
    try:
        assert get(endpoint.port) == (200, "ok\n")
        assert get(endpoint.port, "/healthz?verbose=1")[0] == 200
    finally:
        endpoint.stop()


def test_503_names_every_failing_check():
    endpoint = serve([lambda: None, lambda: "missing node tools: iscsiadm", lambda: "backend lab: no route"])
    try:
        status, body = get(endpoint.port)
    finally:
        endpoint.stop()
    assert status == 503
    assert body == "not ready: missing node tools: iscsiadm; backend lab: no route\n"


def test_other_paths_are_404():
    endpoint = serve([])
    try:
        assert get(endpoint.port, "/")[0] == 404
        assert get(endpoint.port, "/healthz/extra")[0] == 404
        assert get(endpoint.port, "/metrics")[0] == 404
    finally:
        endpoint.stop()


def test_a_check_that_raises_gives_503_with_the_error():
    def broken():
        raise ValueError("a bug")

    endpoint = serve([broken])
    try:
        status, body = get(endpoint.port)
    finally:
        endpoint.stop()
    assert status == 503 and "ValueError: a bug" in body


def test_hung_check_gives_503_within_the_bound_and_runs_once(hung):
    endpoint = serve([lambda: None, hung], check_timeout=0.5)
    try:
        started = time.monotonic()
        status, body = get(endpoint.port)
        assert time.monotonic() - started < 2.5
        assert status == 503
        assert "hung did not finish within 0.5 s" in body
        status, _ = get(endpoint.port)  # polled again while the first run still hangs
        assert status == 503
    finally:
        endpoint.stop()
    assert len(hung.calls) == 1, "a hung check is joined, not started again on every poll"


def test_probe_is_bounded_too(tmp_path, hung):
    identity = IdentityService("berth.test", controller=False, checks=[hung], check_timeout=0.5)
    server = CsiServer(
        parse_endpoint(f"unix://{tmp_path}/csi.sock"),
        [lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s)],
        ServerOptions(),
    )
    server.start()
    try:
        stub = csi_pb2_grpc.IdentityStub(grpc.insecure_channel(f"unix:{tmp_path}/csi.sock"))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Probe(csi_pb2.ProbeRequest(), timeout=10)
        assert time.monotonic() - started < 2.5
    finally:
        server.stop(0)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "did not finish within 0.5 s" in caught.value.details()


def test_answers_while_every_grpc_worker_is_busy(tmp_path):
    """kubelet must not restart a plugin that is merely busy: /healthz does not queue behind RPCs."""
    release = threading.Event()
    blocking = grpc.method_handlers_generic_handler(
        "test.Busy",
        {"Wait": grpc.unary_unary_rpc_method_handler(lambda request, context: release.wait(30) and b"")},
    )
    identity = IdentityService("berth.test", controller=False, checks=[lambda: None])
    endpoint = HealthEndpoint("127.0.0.1", 0, identity.not_ready_reason)
    server = CsiServer(
        parse_endpoint(f"unix://{tmp_path}/csi.sock"),
        [lambda s: s.add_generic_rpc_handlers((blocking,))],
        ServerOptions(workers=1),
        companions=[endpoint],
    )
    server.start()
    channel = grpc.insecure_channel(f"unix:{tmp_path}/csi.sock")
    busy = channel.unary_unary("/test.Busy/Wait").future(b"", timeout=30)
    try:
        time.sleep(0.3)  # the one worker is now inside Wait
        assert not busy.done()
        assert get(endpoint.port, timeout=5) == (200, "ok\n")
    finally:
        release.set()
        server.stop(0)
    assert get_refused(endpoint.port), "stopping the server stops the health endpoint"


def get_refused(port: int) -> bool:
    try:
        get(port, timeout=2)
    except OSError:
        return True
    return False


def test_requests_are_logged_at_debug_only(caplog):
    endpoint = serve([])
    try:
        with caplog.at_level(logging.INFO):
            get(endpoint.port)
        assert not [r for r in caplog.records if r.msg == "healthz request"]
        with caplog.at_level(logging.DEBUG, logger="berth.health"):
            get(endpoint.port)
        (record,) = [r for r in caplog.records if r.msg == "healthz request"]
        assert record.levelno == logging.DEBUG and "GET /healthz" in record.request
    finally:
        endpoint.stop()


def test_health_port_in_use_is_a_clean_start_up_error(tmp_path):
    taken = serve([])
    try:
        server = CsiServer(
            parse_endpoint(f"unix://{tmp_path}/csi.sock"),
            [],
            ServerOptions(),
            companions=[HealthEndpoint("127.0.0.1", taken.port, lambda: None)],
        )
        with pytest.raises(RuntimeError, match=f"health endpoint 127.0.0.1:{taken.port}: Address already in use"):
            server.start()
    finally:
        taken.stop()
    assert not (tmp_path / "csi.sock").exists(), "the CSI socket is cleaned up when a companion cannot start"


def test_cli_health_port_runs_the_probe_checks(tmp_path, monkeypatch):
    """--health-port wires /healthz to the same checks as Probe: here the controller's backend check."""
    monkeypatch.setattr("csi_driver.assembly.backend_readiness_check", lambda backends: lambda: "backend lab: down")
    args = cli.build_parser().parse_args(
        ["--mode", "controller", "--endpoint", f"unix://{tmp_path}/csi.sock", "--health-port", "1",
         "--health-address", "127.0.0.1"]
    )  # fmt: skip
    server = cli.build_server(args, load_config(None))
    (endpoint,) = server.companions
    assert isinstance(endpoint, HealthEndpoint) and endpoint.address == "127.0.0.1"
    endpoint.port = 0  # any free port, not the privileged 1
    server.start()
    try:
        assert get(endpoint.port) == (503, "not ready: backend lab: down\n")
    finally:
        server.stop(0)
