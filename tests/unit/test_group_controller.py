"""The GroupController service over real gRPC, the storage host replaced by in-memory fakes: validation,
idempotency, the one-backend rule, and the fence (all members fenced before the first snapshot, lifted after)."""

from __future__ import annotations

import grpc
import pytest

from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.server.endpoint import parse_endpoint
from csi_driver.server.grpc_server import CsiServer, ServerOptions
from csi_driver.services.controller import ControllerService
from csi_driver.services.group_controller import GroupControllerService
from csi_driver.services.identity import IdentityService
from csi_driver.storage import backend as backend_module
from csi_driver.storage.backend import LvmBackend
from csi_driver.storage.errors import CapacityExhausted, HostUnreachable
from csi_driver.storage.lvm import PoolCapacity
from tests.unit.fakes import FakeExporter, FakeThinPool, GiB

Cap = csi_pb2.VolumeCapability
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def backends():
    made = {"blk": LvmBackend("blk", FakeThinPool(), FakeExporter("iscsi")),
            "files": LvmBackend("files", FakeThinPool(), FakeExporter("nfs"))}  # fmt: skip
    for backend in made.values():
        backend.exporter.calls = backend.pool.calls  # one list: the order of fences and snapshots
    return made


class Stubs:
    def __init__(self, channel: grpc.Channel) -> None:
        self.controller = csi_pb2_grpc.ControllerStub(channel)
        self.group = csi_pb2_grpc.GroupControllerStub(channel)
        self.identity = csi_pb2_grpc.IdentityStub(channel)


@pytest.fixture
def stubs(backends, tmp_path):
    controller = ControllerService(backends, default_backend="blk")
    group = GroupControllerService(controller)
    identity = IdentityService("berth.csi.io", controller=True)
    server = CsiServer(
        parse_endpoint(f"unix://{tmp_path}/csi.sock"),
        [
            lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
            lambda s: csi_pb2_grpc.add_GroupControllerServicer_to_server(group, s),
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
        ],
        ServerOptions(),
    )
    server.start()
    yield Stubs(grpc.insecure_channel(f"unix:{tmp_path}/csi.sock"))
    server.stop(0)


def volume(stubs: Stubs, name: str, backend: str = "blk") -> str:
    capability = Cap(mount=Cap.MountVolume(), access_mode=Cap.AccessMode(mode=Cap.AccessMode.SINGLE_NODE_WRITER))
    request = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB), volume_capabilities=[capability],
        parameters={"backend": backend},
    )  # fmt: skip
    return stubs.controller.CreateVolume(request).volume.volume_id


def group_snapshot(stubs: Stubs, name: str, *volume_ids: str, **parameters: str) -> csi_pb2.VolumeGroupSnapshot:
    request = csi_pb2.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=volume_ids, parameters=parameters)
    return stubs.group.CreateVolumeGroupSnapshot(request).group_snapshot


def status(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()
    return OK, ""


def lv(object_id: str) -> str:
    return object_id.split("/")[1]


def test_the_service_and_its_capability_are_advertised(stubs):
    plugin = stubs.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in plugin.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in services
    caps = stubs.group.GroupControllerGetCapabilities(csi_pb2.GroupControllerGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == [
        csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]


@pytest.mark.parametrize(
    ("name", "sources", "parameters", "expected"),
    [
        ("", ["A", "B"], {}, "CreateVolumeGroupSnapshot name is required"),
        ("g" * 129, ["A", "B"], {}, "is 129 bytes, CSI allows 128"),
        ("g\x07", ["A", "B"], {}, "control character U+0007"),
        ("g", [], {}, "needs source_volume_ids"),
        ("g", ["A", "A"], {}, "more than once"),
        ("g", ["A", "B"], {"consistency": "strong"}, "unknown group snapshot parameter(s) consistency"),
        ("g", ["A", "F"], {}, "must share one backend, these are on blk, files"),
    ],
)
def test_create_refuses_with_a_clear_message(stubs, backends, name, sources, parameters, expected):
    made = {"A": volume(stubs, "a"), "B": volume(stubs, "b"), "F": volume(stubs, "f", "files")}
    code, message = status(lambda: group_snapshot(stubs, name, *(made[s] for s in sources), **parameters))
    assert (code, expected in message) == (INVALID, True), message
    assert not [c for c in backends["blk"].pool.calls if c.startswith(("fence", "snapshot"))]


def test_kubernetes_own_parameters_are_ignored(stubs):
    a = volume(stubs, "a")
    assert group_snapshot(stubs, "g", a, **{"csi.storage.k8s.io/group-snapshotter-secret-name": "s"}).snapshots


def test_an_unknown_volume_is_not_found(stubs):
    a = volume(stubs, "a")
    for missing in ("blk/vol-00000000000000000000", "no-such-id", "nowhere/vol-1"):
        code, _ = status(lambda m=missing: group_snapshot(stubs, "g", a, m))
        assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("backend", ["blk", "files"])
def test_every_member_is_fenced_before_the_first_snapshot_and_unfenced_after_the_last(stubs, backends, backend):
    a, b = volume(stubs, "a", backend), volume(stubs, "b", backend)
    pool = backends[backend].pool
    pool.calls.clear()
    group = group_snapshot(stubs, "vm-1", a, b)
    members = {s.source_volume_id: lv(s.snapshot_id) for s in group.snapshots}
    assert pool.calls == [
        f"fence {lv(a)} {lv(b)}", f"snapshot {lv(a)} {members[a]}", f"snapshot {lv(b)} {members[b]}", "unfence",
    ]  # fmt: skip
    assert group.group_snapshot_id.startswith(f"{backend}/grp-") and group.ready_to_use
    assert all(s.group_snapshot_id == group.group_snapshot_id and s.ready_to_use for s in group.snapshots)


def test_a_failed_member_lifts_the_fence_and_leaves_no_snapshot(stubs, backends):
    a, b, c = volume(stubs, "a"), volume(stubs, "b"), volume(stubs, "c")
    pool = backends["blk"].pool
    pool.snapshot_fails[lv(b)] = CapacityExhausted("thin pool full")
    pool.calls.clear()
    code, message = status(lambda: group_snapshot(stubs, "g", a, b, c))
    assert (code, message) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "thin pool full")
    assert pool.calls.index("unfence") > max(i for i, x in enumerate(pool.calls) if x.startswith("snapshot"))
    assert not [i for i in pool.lvs.values() if i.meta.get("kind") == "snapshot"], "the member made was removed"


def test_a_failed_member_is_reported_even_when_lifting_the_fence_fails_too(stubs, backends):
    a, b = volume(stubs, "a"), volume(stubs, "b")
    backends["blk"].pool.snapshot_fails[lv(b)] = CapacityExhausted("thin pool full")
    backends["blk"].exporter.unfence_error = HostUnreachable("ssh: connect timed out")  # the host's timer lifts it
    assert status(lambda: group_snapshot(stubs, "g", a, b)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "thin pool full")
    assert not [i for i in backends["blk"].pool.lvs.values() if i.meta.get("kind") == "snapshot"]


def test_a_failed_fence_is_lifted_and_takes_no_snapshot(stubs, backends):
    a, b = volume(stubs, "a"), volume(stubs, "b")
    pool = backends["blk"].pool
    backends["blk"].exporter.fence_error = HostUnreachable("ssh: connect timed out")
    pool.calls.clear()
    assert status(lambda: group_snapshot(stubs, "g", a, b))[0] == grpc.StatusCode.UNAVAILABLE
    assert [x for x in pool.calls if not x.startswith("remove")] == [f"fence {lv(a)} {lv(b)}", "unfence"]


def test_a_group_that_outlasted_its_fence_is_removed_and_retried(stubs, backends, monkeypatch):
    a, b = volume(stubs, "a"), volume(stubs, "b")
    monkeypatch.setattr(backend_module, "FENCE_SECONDS", 0)  # the host may have lifted the fence in between
    code, message = status(lambda: group_snapshot(stubs, "g", a, b))
    assert (code, "longer than the 0 s its fence may last" in message) == (grpc.StatusCode.ABORTED, True), message
    assert not [i for i in backends["blk"].pool.lvs.values() if i.meta.get("kind") == "snapshot"]


def test_create_is_idempotent_and_a_name_keeps_its_volumes(stubs, backends):
    a, b, c = volume(stubs, "a"), volume(stubs, "b"), volume(stubs, "c")
    first = group_snapshot(stubs, "g", a, b)
    pool = backends["blk"].pool
    pool.calls.clear()
    again = group_snapshot(stubs, "g", b, a)
    assert again == first and not [x for x in pool.calls if x.startswith(("fence", "snapshot"))]
    for other in ([a], [a, c], [a, b, c]):
        code, message = status(lambda o=other: group_snapshot(stubs, "g", *o))
        assert (code, "already exists with other source volumes" in message) == (grpc.StatusCode.ALREADY_EXISTS, True)
    assert group_snapshot(stubs, "h", a, b).group_snapshot_id != first.group_snapshot_id


def test_a_group_left_half_made_is_taken_again_at_one_instant(stubs, backends):
    a, b = volume(stubs, "a"), volume(stubs, "b")
    first = group_snapshot(stubs, "g", a, b)
    pool = backends["blk"].pool
    pool.remove(lv(first.snapshots[1].snapshot_id))  # what a controller crash between the two lvcreate leaves
    pool.calls.clear()
    again = group_snapshot(stubs, "g", a, b)
    assert {s.snapshot_id for s in again.snapshots} == {s.snapshot_id for s in first.snapshots}
    assert pool.calls[0] == f"remove {lv(first.snapshots[0].snapshot_id)}", "the leftover goes first"
    assert [x.split()[0] for x in pool.calls[1:]] == ["fence", "snapshot", "snapshot", "unfence"]


def test_get_and_delete(stubs, backends):
    a, b = volume(stubs, "a"), volume(stubs, "b")
    group = group_snapshot(stubs, "g", a, b)
    member_ids = [s.snapshot_id for s in group.snapshots]

    def get(group_id: str, snapshot_ids=()):
        request = csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=group_id, snapshot_ids=snapshot_ids)
        return stubs.group.GetVolumeGroupSnapshot(request).group_snapshot

    def delete(group_id: str, snapshot_ids=()):
        request = csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group_id, snapshot_ids=snapshot_ids)
        return stubs.group.DeleteVolumeGroupSnapshot(request)

    assert get(group.group_snapshot_id) == group == get(group.group_snapshot_id, member_ids)
    single = stubs.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=member_ids[0])).snapshot
    assert single.group_snapshot_id == group.group_snapshot_id
    assert status(lambda: get(""))[0] == INVALID
    for unknown in ("fake-group-id", "blk/grp-00000000000000000000", "nowhere/grp-1"):
        assert status(lambda u=unknown: get(u))[0] == grpc.StatusCode.NOT_FOUND
        assert status(lambda u=unknown: delete(u)) == (OK, "")
    code, message = status(lambda: get(group.group_snapshot_id, member_ids[:1]))
    assert code == INVALID and member_ids[1] in message
    assert status(lambda: get(group.group_snapshot_id, [*member_ids, "blk/snap-1"]))[0] == INVALID

    delete_member = csi_pb2.DeleteSnapshotRequest(snapshot_id=member_ids[0])
    code, message = status(lambda: stubs.controller.DeleteSnapshot(delete_member))
    assert code == INVALID and "delete the group" in message, "a member is never deleted alone"
    assert status(lambda: delete(""))[0] == INVALID
    assert status(lambda: delete(group.group_snapshot_id, member_ids[:1]))[0] == INVALID
    assert len(get(group.group_snapshot_id).snapshots) == 2, "a refused delete removes nothing"
    assert status(lambda: delete(group.group_snapshot_id, member_ids)) == (OK, "")
    assert status(lambda: get(group.group_snapshot_id))[0] == grpc.StatusCode.NOT_FOUND
    assert status(lambda: delete(group.group_snapshot_id, member_ids)) == (OK, ""), "a retried delete is fine"
    assert not [i for i in backends["blk"].pool.lvs.values() if i.meta.get("kind") == "snapshot"]


def test_a_group_holds_its_volumes_against_other_operations(stubs, backends):
    """The per-object locks are the Controller's: a DeleteVolume during the group snapshot is ABORTED."""
    a, b = volume(stubs, "a"), volume(stubs, "b")
    pool = backends["blk"].pool
    answers = []

    def snapshot_during_delete(source, new_lv, tags, read_only=False, known_absent=False):
        answers.append(status(lambda: stubs.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=a))))
        return FakeThinPool.snapshot(pool, source, new_lv, tags, read_only)

    pool.snapshot = snapshot_during_delete
    group_snapshot(stubs, "g", a, b)
    assert [code for code, _ in answers] == [grpc.StatusCode.ABORTED] * 2


def test_a_pool_at_its_full_threshold_takes_no_group_and_holds_nothing():
    pool = FakeThinPool()
    backend = LvmBackend("blk", pool, FakeExporter("iscsi"), full_threshold_percent=90)
    volume = backend.create_volume("v", GiB, 0, {}, None)
    pool.capacity = lambda: PoolCapacity(100 * GiB, 95 * GiB, 5 * GiB, 95.0, 5.0)
    with pytest.raises(CapacityExhausted, match="no new group snapshot"):
        backend.create_group_snapshot("g", [volume.lv])
    assert not [c for c in pool.calls if c.startswith(("fence", "snapshot"))]
