"""A storage host that stops answering, or lacks its volume group (issue #13 items 7 and 8): Probe keeps answering
and never fails for it, the other backends keep working, and the codes say what is wrong."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest

from csi_driver.assembly import BackendWatch
from csi_driver.csi import csi_pb2
from csi_driver.storage.backend import LvmBackend
from csi_driver.storage.errors import HostNotReady, HostUnreachable
from tests.unit.fakes import FakeExporter, FakeThinPool, GiB
from tests.unit.test_controller import NODE_A, capability, create, status_of


class BrokenPool(FakeThinPool):
    """A thin pool whose host fails every call with `error` (None: it works), or hangs while `hang` is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.error: Exception | None = None
        self.hang: threading.Event | None = None

    def _host(self) -> None:
        if self.hang is not None:
            self.hang.wait(5)
        if self.error is not None:
            raise self.error

    def capacity(self):
        self._host()
        return super().capacity()

    def find(self, lv):
        self._host()
        return super().find(lv)

    def list(self, tag_filter=None, managed_only=True):
        self._host()
        return super().list(tag_filter, managed_only)


@pytest.fixture
def backends():
    return {
        "blk": LvmBackend("blk", FakeThinPool(), FakeExporter("iscsi")),
        "files": LvmBackend("files", BrokenPool(), FakeExporter("nfs")),
    }


def test_a_dead_backend_never_fails_probe_and_is_logged_once(backends, caplog):
    backends["files"].pool.error = HostUnreachable("ssh to 198.18.0.9:22 failed: Connection timed out")
    watch = BackendWatch(backends, interval=0)
    caplog.set_level(logging.INFO, logger="berth")
    assert watch() is None, "Probe stays ready: a restart cannot bring a storage host back"
    watch.look()
    watch.look()
    warnings = [r for r in caplog.records if r.getMessage() == "backend not usable"]
    assert [r.backend for r in warnings] == ["files"], "logged once, when it went down"
    assert "Connection timed out" in warnings[0].reason
    backends["files"].pool.error = None
    watch.look()
    assert [r.backend for r in caplog.records if r.getMessage() == "backend usable again"] == ["files"]


def test_probe_never_waits_for_a_storage_host(backends):
    backends["files"].pool.hang = threading.Event()
    watch = BackendWatch(backends, interval=0)
    try:
        started = time.monotonic()
        assert watch() is None and watch() is None
        assert time.monotonic() - started < 0.5, "the look at the hosts runs in the background"
    finally:
        backends["files"].pool.hang.set()


@pytest.fixture
def controller(backends, tmp_path):
    from csi_driver.csi import csi_pb2_grpc
    from csi_driver.server.endpoint import parse_endpoint
    from csi_driver.server.grpc_server import CsiServer, ServerOptions
    from csi_driver.services.controller import ControllerService

    service = ControllerService(backends, default_backend="blk", max_volumes_per_node=3)
    server = CsiServer(
        parse_endpoint(f"unix://{tmp_path}/csi.sock"),
        [lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(service, s)],
        ServerOptions(),
    )
    server.start()
    yield csi_pb2_grpc.ControllerStub(grpc.insecure_channel(f"unix:{tmp_path}/csi.sock"))
    server.stop(0)


def test_other_backends_keep_working_while_one_host_is_down(controller, backends):
    backends["files"].pool.error = HostUnreachable("ssh to 198.18.0.9:22 failed: Connection refused")
    volume = create(controller, "pvc-blk")
    request = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume.volume_id, node_id=NODE_A, volume_capability=capability()
    )
    published = controller.ControllerPublishVolume(request)
    assert published.publish_context, "the attach limit is counted without the dead backend"
    code, message = status_of(lambda: create(controller, "pvc-nfs", backend="files"))
    assert code == grpc.StatusCode.UNAVAILABLE and "Connection refused" in message


def test_a_missing_volume_group_is_failed_precondition_not_not_found(controller, backends):
    backends["files"].pool.error = HostNotReady('Volume group "berth" not found; check lvm.volume_group')
    code, message = status_of(lambda: create(controller, "pvc-nfs", GiB, backend="files"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "lvm.volume_group" in message
    code, _ = status_of(
        controller.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(volume_id="files/vol-0123456789abcdef0123")
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION, "not 'your volume does not exist'"
