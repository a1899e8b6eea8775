import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.server.endpoint import EndpointError, parse_endpoint
from csi_driver.server.grpc_server import MAX_UNIX_PATH, CsiServer, ServerOptions, serve_on_unix_socket
from csi_driver.server.logs import configure_logging
from csi_driver.services.identity import IdentityService


@pytest.mark.parametrize(
    ("text", "scheme", "address"),
    [
        ("unix:///csi/csi.sock", "unix", "/csi/csi.sock"),
        ("unix:/csi/csi.sock", "unix", "/csi/csi.sock"),
        ("/csi/csi.sock", "unix", "/csi/csi.sock"),
        ("tcp://127.0.0.1:10000", "tcp", "127.0.0.1:10000"),
        ("127.0.0.1:10000", "tcp", "127.0.0.1:10000"),
    ],
)
def test_parse_endpoint(text, scheme, address):
    endpoint = parse_endpoint(text)
    assert (endpoint.scheme, endpoint.address) == (scheme, address)


@pytest.mark.parametrize(
    "text", ["unix://relative.sock", "tcp://host", "tcp://host:99999", "nonsense", "tcp://:80"]
)
def test_parse_endpoint_rejects(text):
    with pytest.raises(EndpointError, match="endpoint"):
        parse_endpoint(text)


def start(endpoint: str, checks=(), **options) -> CsiServer:
    identity = IdentityService("berth.test", controller=True, checks=checks)
    server = CsiServer(
        parse_endpoint(endpoint),
        [lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s)],
        ServerOptions(**options),
    )
    server.start()
    return server


def identity_stub(target: str) -> csi_pb2_grpc.IdentityStub:
    return csi_pb2_grpc.IdentityStub(grpc.insecure_channel(target))


def test_unix_socket_created_with_mode_and_parent_dir(tmp_path):
    path = tmp_path / "deep" / "dir" / "csi.sock"
    server = start(f"unix://{path}", socket_mode=0o660)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        info = identity_stub(f"unix:{path}").GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
        assert info.name == "berth.test" and info.vendor_version
    finally:
        server.stop(0)
    assert not path.exists(), "the socket is removed on shutdown"


def test_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "csi.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # leaves the socket file behind, as a crashed process would
    server = start(f"unix://{path}")
    try:
        identity_stub(f"unix:{path}").Probe(csi_pb2.ProbeRequest(), timeout=5)
    finally:
        server.stop(0)


class RecordingServer:
    """A real grpc server that notes what existed at `path` when it was bound and when it started."""

    def __init__(self, path):
        self.path = path
        self.server = grpc.server(futures.ThreadPoolExecutor(1))
        csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService("berth.test", controller=True), self.server)
        self.bound_to = ""
        self.visible_before_start = None

    def add_insecure_port(self, address):
        self.bound_to = address
        return self.server.add_insecure_port(address)

    def start(self):
        self.visible_before_start = os.path.exists(self.path)
        self.server.start()


def test_the_socket_appears_only_once_the_server_serves(tmp_path):
    """A sidecar that connects between bind and start has its connection reset and exits ("Lost connection to
    CSI driver"): nothing may be at the socket path before the server accepts."""
    path = tmp_path / "csi.sock"
    server = RecordingServer(str(path))
    serve_on_unix_socket(server, str(path), 0o600)  # type: ignore[arg-type]
    try:
        assert server.bound_to == f"unix:{tmp_path}/.csi.sock.new", "bound to a hidden name, not the final path"
        assert server.visible_before_start is False
        assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(os.listdir(tmp_path)) == ["csi.sock"]
        identity_stub(f"unix:{path}").Probe(csi_pb2.ProbeRequest(), timeout=5)
    finally:
        server.server.stop(0)


def test_a_path_too_long_for_a_hidden_sibling_is_bound_directly(tmp_path):
    directory = tmp_path / ("d" * (MAX_UNIX_PATH - len(str(tmp_path)) - 12))
    path = directory / "csi.sock"  # fits sockaddr_un; ".csi.sock.new" beside it does not
    assert len(str(path)) <= MAX_UNIX_PATH < len(str(directory / ".csi.sock.new"))
    server = RecordingServer(str(path))
    serve_on_unix_socket(server, str(path), 0o600)  # type: ignore[arg-type]
    try:
        assert server.bound_to == f"unix:{path}"
        identity_stub(f"unix:{path}").Probe(csi_pb2.ProbeRequest(), timeout=5)
    finally:
        server.server.stop(0)


def test_regular_file_at_socket_path_is_not_deleted(tmp_path):
    path = tmp_path / "csi.sock"
    path.write_text("someone's data")
    with pytest.raises(EndpointError, match="not a socket"):
        start(f"unix://{path}")
    assert path.read_text() == "someone's data"


def test_tcp_endpoint():
    server = start("tcp://127.0.0.1:0")
    try:
        caps = identity_stub(f"127.0.0.1:{server.port}").GetPluginCapabilities(
            csi_pb2.GetPluginCapabilitiesRequest(), timeout=5
        )
        types = {c.service.type for c in caps.capabilities if c.HasField("service")}
        assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE in types
    finally:
        server.stop(0)


def slow_check(seconds: float):
    def check():
        time.sleep(seconds)
        return None

    return check


def call_in_thread(stub, results):
    def run():
        try:
            results.append(stub.Probe(csi_pb2.ProbeRequest(), timeout=30))
        except grpc.RpcError as err:
            results.append(err.code())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_graceful_stop_lets_in_flight_rpc_finish(tmp_path):
    server = start(f"unix://{tmp_path}/csi.sock", checks=[slow_check(1.0)])
    results: list = []
    thread = call_in_thread(identity_stub(f"unix:{tmp_path}/csi.sock"), results)
    time.sleep(0.3)
    server.stop(grace=5)
    thread.join()
    assert results and isinstance(results[0], csi_pb2.ProbeResponse)


def test_graceful_stop_is_bounded(tmp_path):
    server = start(f"unix://{tmp_path}/csi.sock", checks=[slow_check(5.0)])
    results: list = []
    thread = call_in_thread(identity_stub(f"unix:{tmp_path}/csi.sock"), results)
    time.sleep(0.3)
    started = time.monotonic()
    server.stop(grace=0.5)
    assert time.monotonic() - started < 3
    thread.join()
    assert results == [grpc.StatusCode.CANCELLED] or results == [grpc.StatusCode.UNAVAILABLE]


def test_probe_not_ready_says_why(tmp_path):
    server = start(f"unix://{tmp_path}/csi.sock", checks=[lambda: None, lambda: "storage host unreachable"])
    try:
        with pytest.raises(grpc.RpcError) as caught:
            identity_stub(f"unix:{tmp_path}/csi.sock").Probe(csi_pb2.ProbeRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "storage host unreachable" in caught.value.details()
    finally:
        server.stop(0)


def test_interceptor_logs_method_code_duration_and_request_id(tmp_path):
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)

    def broken_check():
        raise ValueError("a bug")

    checks = [broken_check]
    server = start(f"unix://{tmp_path}/csi.sock", checks=[lambda: checks[0]()])
    try:
        stub = identity_stub(f"unix:{tmp_path}/csi.sock")
        stub.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), metadata=[("x-request-id", "req-42")], timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Probe(csi_pb2.ProbeRequest(), timeout=5)
        checks[0] = lambda: None
        stub.Probe(csi_pb2.ProbeRequest(), timeout=5)  # a healthy Probe is routine: debug, not in an info log
    finally:
        server.stop(0)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "ValueError: a bug" in caught.value.details()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    rpcs = [r for r in records if r["msg"] == "rpc"]
    info = next(r for r in rpcs if r["method"].endswith("GetPluginInfo"))
    assert info["code"] == "OK" and info["request_id"] == "req-42" and info["duration_ms"] >= 0
    [probe] = [r for r in rpcs if r["method"].endswith("Probe")]
    assert probe["code"] == "INTERNAL" and probe["level"] == "warning"
    assert probe["details"].startswith("internal error in /csi.v1.Identity/Probe"), "details are text, not bytes"
    bug = next(r for r in records if r["msg"] == "unhandled error")
    assert "ValueError" in bug["exception"] and bug["request_id"] == probe["request_id"] != "-"


def test_berth_console_script_runs():
    berth = os.path.join(os.path.dirname(sys.executable), "berth")
    result = subprocess.run([berth, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--endpoint" in result.stdout


def test_csicall_round_trip_and_error(tmp_path, capsys):
    from csi_driver import csicall

    server = start(f"unix://{tmp_path}/csi.sock", checks=[lambda: "pool missing"])
    try:
        assert csicall.call(f"unix://{tmp_path}/csi.sock", "Identity.GetPluginInfo", {})["name"] == "berth.test"
        assert csicall.main(["--endpoint", f"unix://{tmp_path}/csi.sock", "Identity.Probe"]) == 1
        printed = json.loads(capsys.readouterr().out)
        assert printed == {"code": "FAILED_PRECONDITION", "details": "not ready: pool missing"}
        assert csicall.main(["--endpoint", f"unix://{tmp_path}/csi.sock", "Identity.Nope"]) == 2
    finally:
        server.stop(0)


def test_csicall_stdio_answers_each_line_and_survives_bad_ones(tmp_path, monkeypatch, capsys):
    from csi_driver import csicall

    server = start(f"unix://{tmp_path}/csi.sock", checks=[lambda: "pool missing"])
    lines = ['{"rpc": "Identity.GetPluginInfo"}', "not json", '{"rpc": "Identity.Nope"}', '{"rpc": "Identity.Probe"}']
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    try:
        assert csicall.main(["--endpoint", f"unix://{tmp_path}/csi.sock", "--stdio"]) == 0
    finally:
        server.stop(0)
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["exit"] for a in answers] == [0, 2, 2, 1]
    assert answers[0]["body"]["name"] == "berth.test"
    assert answers[3]["body"] == {"code": "FAILED_PRECONDITION", "details": "not ready: pool missing"}


class Streams(csi_pb2_grpc.SnapshotMetadataServicer):
    """GetMetadataAllocated: three messages; GetMetadataDelta: one message, then a bug, or (snapshot "slow") a wait
    for its caller to go away."""

    def __init__(self) -> None:
        self.left = threading.Event()

    def GetMetadataAllocated(self, request, context):
        for _ in range(3):
            yield csi_pb2.GetMetadataAllocatedResponse(volume_capacity_bytes=1)

    def GetMetadataDelta(self, request, context):
        yield csi_pb2.GetMetadataDeltaResponse(volume_capacity_bytes=1)
        if request.base_snapshot_id == "slow":
            self.left.wait(10)
            return
        raise ValueError("a bug mid-stream")


def test_streams_are_logged_once_with_their_message_count(tmp_path):
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    servicer = Streams()
    server = CsiServer(
        parse_endpoint(f"unix://{tmp_path}/csi.sock"),
        [lambda s: csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(servicer, s)],
        ServerOptions(),
    )
    server.start()
    try:
        stub = csi_pb2_grpc.SnapshotMetadataStub(grpc.insecure_channel(f"unix:{tmp_path}/csi.sock"))
        request = csi_pb2.GetMetadataAllocatedRequest(snapshot_id="b/s", secrets={"key": "hidden-value"})
        assert len(list(stub.GetMetadataAllocated(request, metadata=[("x-request-id", "req-7")], timeout=5))) == 3
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.GetMetadataDelta(csi_pb2.GetMetadataDeltaRequest(base_snapshot_id="b/s"), timeout=5))
        left = stub.GetMetadataDelta(csi_pb2.GetMetadataDeltaRequest(base_snapshot_id="slow"), timeout=5)
        next(left)
        left.cancel()
        deadline = time.monotonic() + 5
        while '"code": "CANCELLED"' not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        servicer.left.set()
    finally:
        server.stop(0)
    assert caught.value.code() == grpc.StatusCode.INTERNAL and "ValueError: a bug mid-stream" in caught.value.details()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    rpcs = [r for r in records if r["msg"] == "rpc"]
    assert [(r["method"].rsplit("/", 1)[1], r["code"], r["messages"]) for r in rpcs] == [
        ("GetMetadataAllocated", "OK", 3), ("GetMetadataDelta", "INTERNAL", 1), ("GetMetadataDelta", "CANCELLED", 1)
    ]  # fmt: skip
    assert rpcs[0]["request_id"] == "req-7"
    bug = next(r for r in records if r["msg"] == "unhandled error")
    assert bug["request_id"] == rpcs[1]["request_id"] != "-" and "ValueError" in bug["exception"]
    request = next(r for r in records if r["msg"] == "request")
    assert request["request_id"] == "req-7" and "hidden-value" not in stream.getvalue()


def test_csicall_prints_a_stream_and_what_came_before_its_error(tmp_path, capsys):
    from csi_driver import csicall

    server = CsiServer(
        parse_endpoint(f"unix://{tmp_path}/csi.sock"),
        [lambda s: csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(Streams(), s)],
        ServerOptions(),
    )
    server.start()
    endpoint = f"unix://{tmp_path}/csi.sock"
    try:
        answer = csicall.call(endpoint, "SnapshotMetadata.GetMetadataAllocated", {"snapshot_id": "b/s"})
        assert answer == {"responses": [{"volume_capacity_bytes": "1"}] * 3}
        argv = ["--endpoint", endpoint, "SnapshotMetadata.GetMetadataDelta", '{"base_snapshot_id": "x"}']
        assert csicall.main(argv) == 1
        printed = json.loads(capsys.readouterr().out)
        assert printed["responses"] == [{"volume_capacity_bytes": "1"}] and printed["code"] == "INTERNAL"
    finally:
        server.stop(0)
