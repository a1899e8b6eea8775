"""Worker lanes (issue #13 items 5 and 15): with every Controller worker busy, Probe, NodeGetInfo, node calls and
SnapshotMetadata streams still answer at once; with every Node worker busy, controller calls do."""

from __future__ import annotations

import threading

import grpc
import pytest

from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.server.endpoint import parse_endpoint
from csi_driver.server.grpc_server import CsiServer, ServerOptions
from csi_driver.services.identity import IdentityService

WORKERS = 2


class Stuck:
    """Servicer methods that hold their worker until released, and note the thread they ran on."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.threads: list[str] = []

    def hold(self, response):
        self.threads.append(threading.current_thread().name)
        self.started.release()
        self.release.wait(10)
        return response


class SlowController(csi_pb2_grpc.ControllerServicer):
    def __init__(self, stuck: Stuck) -> None:
        self.stuck = stuck

    def CreateVolume(self, request, context):
        return self.stuck.hold(csi_pb2.CreateVolumeResponse())

    def ControllerGetCapabilities(self, request, context):
        return csi_pb2.ControllerGetCapabilitiesResponse()


class SlowNode(csi_pb2_grpc.NodeServicer):
    def __init__(self, stuck: Stuck) -> None:
        self.stuck = stuck

    def NodeStageVolume(self, request, context):
        return self.stuck.hold(csi_pb2.NodeStageVolumeResponse())

    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(node_id=threading.current_thread().name)


class SnapshotMetadata(csi_pb2_grpc.SnapshotMetadataServicer):
    def GetMetadataAllocated(self, request, context):
        for _ in range(2):
            yield csi_pb2.GetMetadataAllocatedResponse()
        context.set_trailing_metadata((("thread", threading.current_thread().name),))


@pytest.fixture
def server(tmp_path):
    stuck = Stuck()
    identity = IdentityService("berth.csi.io", controller=True)
    controller, node = SlowController(stuck), SlowNode(stuck)
    csi = CsiServer(
        parse_endpoint(f"unix://{tmp_path}/csi.sock"),
        [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
            lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
            lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s),
            lambda s: csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadata(), s),
        ],
        ServerOptions(workers=WORKERS),
    )
    csi.start()
    channel = grpc.insecure_channel(f"unix:{tmp_path}/csi.sock")
    yield channel, stuck
    stuck.release.set()
    channel.close()
    csi.stop(0)


def fill(call, request, stuck: Stuck, count: int) -> list:
    """Start `count` calls that hold their workers (and more that queue behind them)."""
    pending = [call.future(request, timeout=10) for _ in range(count)]
    for _ in range(WORKERS):
        assert stuck.started.acquire(timeout=5), "the calls started"
    return pending


def test_probe_and_node_calls_answer_while_every_controller_worker_is_busy(server):
    channel, stuck = server
    controller = csi_pb2_grpc.ControllerStub(channel)
    pending = fill(controller.CreateVolume, csi_pb2.CreateVolumeRequest(name="x"), stuck, 3 * WORKERS)
    probe = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=2)
    assert probe.ready.value
    node = csi_pb2_grpc.NodeStub(channel)
    assert node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=2).node_id.startswith("rpc-quick")
    controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest(), timeout=2)
    pending.append(node.NodeStageVolume.future(csi_pb2.NodeStageVolumeRequest(), timeout=10))  # kept: not cancelled
    assert stuck.started.acquire(timeout=2), "a node call starts although the controller lane is full"
    assert all(name.startswith("rpc-controller") for name in stuck.threads[:WORKERS])
    assert stuck.threads[WORKERS].startswith("rpc-node")


def test_controller_calls_answer_while_every_node_worker_is_busy(server):
    channel, stuck = server
    node = csi_pb2_grpc.NodeStub(channel)
    pending = fill(node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(), stuck, 3 * WORKERS)
    create = csi_pb2_grpc.ControllerStub(channel).CreateVolume
    pending.append(create.future(csi_pb2.CreateVolumeRequest(name="x"), timeout=10))
    assert stuck.started.acquire(timeout=2), "in all-in-one mode controller calls do not wait for node calls"
    assert csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value


def test_snapshot_metadata_streams_run_in_their_own_lane(server):
    """A stream goes as fast as its reader (a backup application): it must never hold a Controller worker."""
    channel, stuck = server
    controller = csi_pb2_grpc.ControllerStub(channel)
    pending = fill(controller.CreateVolume, csi_pb2.CreateVolumeRequest(name="x"), stuck, 3 * WORKERS)
    stream = csi_pb2_grpc.SnapshotMetadataStub(channel).GetMetadataAllocated(
        csi_pb2.GetMetadataAllocatedRequest(snapshot_id="b/snap-1"), timeout=5
    )
    assert len(list(stream)) == 2, "the stream ran while every controller worker was busy"
    assert dict(stream.trailing_metadata())["thread"].startswith("rpc-snapshot_metadata")
    assert len(pending) == 3 * WORKERS
