"""The controller's CSI behaviour over real gRPC, with the storage host replaced by in-memory fakes."""

from __future__ import annotations

import grpc
import pytest

from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.server.endpoint import parse_endpoint
from csi_driver.server.grpc_server import CsiServer, ServerOptions
from csi_driver.services.controller import ControllerService
from csi_driver.services.errors import OperationLocks, RpcError
from csi_driver.storage.backend import LvmBackend
from csi_driver.storage.errors import CommandFailed, HostUnreachable
from tests.unit.fakes import FakeExporter, FakeThinPool, GiB, MiB

Cap = csi_pb2.VolumeCapability
Mode = Cap.AccessMode
NODE_A = "iqn.2026-11.io.berth.lab:node1|198.18.0.11,198.18.1.11"
NODE_B = "iqn.2026-11.io.berth.lab:node2|198.18.0.12"


def capability(mode=Mode.SINGLE_NODE_WRITER, block=False, fs_type=""):
    if block:
        return Cap(block=Cap.BlockVolume(), access_mode=Mode(mode=mode))
    return Cap(mount=Cap.MountVolume(fs_type=fs_type), access_mode=Mode(mode=mode))


@pytest.fixture
def backends():
    return {
        "blk": LvmBackend("blk", FakeThinPool(), FakeExporter("iscsi")),
        "files": LvmBackend("files", FakeThinPool(), FakeExporter("nfs")),
    }


@pytest.fixture
def served(backends, tmp_path):
    """The service object (its locks) and a stub that reaches it over gRPC."""
    service = ControllerService(backends, default_backend="blk", max_volumes_per_node=3)
    server = CsiServer(
        parse_endpoint(f"unix://{tmp_path}/csi.sock"),
        [lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(service, s)],
        ServerOptions(),
    )
    server.start()
    yield service, csi_pb2_grpc.ControllerStub(grpc.insecure_channel(f"unix:{tmp_path}/csi.sock"))
    server.stop(0)


@pytest.fixture
def controller(served):
    return served[1]


def create(stub, name="pvc-1", size=GiB, limit=0, caps=None, **parameters):
    return stub.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size, limit_bytes=limit),
            volume_capabilities=caps or [capability()],
            parameters=parameters,
        )
    ).volume


def status_of(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    return caught.value.code(), caught.value.details()


def test_create_is_idempotent_and_rounds_to_extents(controller):
    first = create(controller, size=GiB + 1)
    again = create(controller, size=GiB + 1)
    assert first.volume_id == again.volume_id and first.volume_id.startswith("blk/vol-")
    assert first.capacity_bytes == GiB + 4 * MiB
    assert first.volume_context["protocol"] == "iscsi" and first.volume_context["wwn"]


def test_create_same_name_other_size_already_exists(controller):
    create(controller, size=GiB, limit=GiB)
    code, message = status_of(create, controller, "pvc-1", 2 * GiB)
    assert code == grpc.StatusCode.ALREADY_EXISTS and "pvc-1" in message


def test_create_same_name_other_parameters_already_exists(controller):
    create(controller)
    code, message = status_of(lambda: create(controller, fsType="xfs"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "fsType" in message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"name": ""}, "CreateVolume name is required"),
        ({"caps": [Cap(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))]}, "access type"),
        ({"caps": [capability(Mode.MULTI_NODE_MULTI_WRITER)]}, "use an NFS StorageClass"),
        ({"caps": [capability(fs_type="btrfs")]}, "'btrfs' is not supported"),
        ({"caps": [capability(block=True)], "backend": "files"}, "raw block access needs an iSCSI"),
        ({"backend": "nope"}, "unknown backend 'nope'"),
        ({"fstype": "xfs"}, "unknown StorageClass parameter(s) fstype"),
    ],
)
def test_create_rejects_with_clear_message(controller, kwargs, expected):
    code, message = status_of(lambda: create(controller, **kwargs))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in message


def test_rwx_block_on_iscsi_and_rwx_mount_on_nfs_are_fine(controller):
    create(controller, name="vm-disk", caps=[capability(Mode.MULTI_NODE_MULTI_WRITER, block=True)])
    create(controller, name="shared", caps=[capability(Mode.MULTI_NODE_MULTI_WRITER)], backend="files")


def test_capacity_exhausted(controller):
    create(controller, "big", 60 * GiB)
    code, _ = status_of(create, controller, "second-big", 60 * GiB)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, "fits the pool, but not next to the first one"


@pytest.mark.parametrize("size", [200 * GiB, int(5.1 * (1 << 50)), 1 << 62, (1 << 63) - 1])
def test_sizes_above_the_backend_limit_are_out_of_range_and_never_reach_the_host(controller, backends, size):
    """A size the pool could never honour (100 GiB pool x ratio 1.0) is OUT_OF_RANGE, not INTERNAL from lvcreate."""
    code, message = status_of(create, controller, "huge", size)
    assert code == grpc.StatusCode.OUT_OF_RANGE
    assert str(size) in message and str(100 * GiB) in message, "names the requested size and the limit"
    assert "backends.blk.lvm.over_provisioning_ratio" in message, "names the config key"
    assert backends["blk"].pool.calls == []


def test_expansion_is_bounded_like_creation(controller, backends):
    volume = create(controller, size=GiB)
    lv = volume.volume_id.split("/")[1]

    def expand(size):
        return controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size)
            )
        )

    for size in (int(4 * (1 << 60)), 1 << 62, (1 << 63) - 1, 101 * GiB):  # 4 EiB: what the lab run reached
        code, message = status_of(expand, size)
        assert code == grpc.StatusCode.OUT_OF_RANGE and "over_provisioning_ratio" in message
    create(controller, "other", 60 * GiB)
    code, _ = status_of(expand, 50 * GiB)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, "the growth does not fit next to the other volume"
    assert backends["blk"].pool.lvs[lv].size_bytes == GiB, "nothing changed on the host"
    assert expand(30 * GiB).capacity_bytes == 30 * GiB


def test_clone_above_the_limit_is_out_of_range(controller, backends):
    volume = create(controller)
    source = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume.volume_id))
    request = csi_pb2.CreateVolumeRequest(
        name="clone", capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 62),
        volume_capabilities=[capability()], volume_content_source=source,
    )  # fmt: skip
    code, _ = status_of(controller.CreateVolume, request)
    assert code == grpc.StatusCode.OUT_OF_RANGE
    assert not any(call.startswith("snapshot") for call in backends["blk"].pool.calls)
    smaller = csi_pb2.CreateVolumeRequest(
        name="clone", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB // 2, limit_bytes=GiB // 2),
        volume_capabilities=[capability()], volume_content_source=source,
    )  # fmt: skip
    code, message = status_of(controller.CreateVolume, smaller)
    assert code == grpc.StatusCode.OUT_OF_RANGE and "at least as large as its source" in message


def test_nfs_expand_retry_grows_the_filesystem_that_failed_to_grow(backends):
    """lvextend succeeded, the filesystem grow on the host failed; the retry finds the LV at its size and must
    still grow the filesystem instead of reporting success."""
    files = backends["files"]
    volume = files.create_volume("pvc-1", GiB, 0, {}, None)
    files.exporter.grow_error = CommandFailed(["xfs_growfs", "/srv/berth/x"], 1, "No space left on device")
    with pytest.raises(CommandFailed):
        files.expand_volume(volume.lv, 2 * GiB, 0)
    assert files.pool.lvs[volume.lv].size_bytes == 2 * GiB
    files.exporter.grow_error = None
    files.exporter.grow_calls.clear()
    assert files.expand_volume(volume.lv, 2 * GiB, 0) == (2 * GiB, False)
    assert files.exporter.grow_calls == [(volume.lv, 100 * GiB)], "grown again, with the backend's size limit"


def test_limit_below_required_is_out_of_range(controller):
    code, _ = status_of(create, controller, "pvc-x", 2 * GiB, GiB)
    assert code == grpc.StatusCode.OUT_OF_RANGE


def test_clone_from_snapshot_and_volume(controller, backends):
    volume = create(controller)
    snapshot = controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=volume.volume_id)
    ).snapshot
    assert snapshot.ready_to_use and snapshot.source_volume_id == volume.volume_id
    assert snapshot.creation_time.seconds > 0
    source = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
    )
    restored = controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="restored", capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB),
            volume_capabilities=[capability()], volume_content_source=source,
        )
    ).volume  # fmt: skip
    assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id
    assert restored.capacity_bytes == 2 * GiB, "a larger requested size expands the clone"
    assert backends["blk"].exporter.frozen == [volume.volume_id.split("/")[1]]

    missing = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id="blk/vol-0000"))
    code, _ = status_of(
        controller.CreateVolume,
        csi_pb2.CreateVolumeRequest(name="c2", volume_capabilities=[capability()], volume_content_source=missing),
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_clone_without_size_takes_the_source_size(controller):
    volume = create(controller, size=256 * MiB)
    source = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume.volume_id))
    request = csi_pb2.CreateVolumeRequest(
        name="clone", volume_capabilities=[capability()], volume_content_source=source
    )
    assert controller.CreateVolume(request).volume.capacity_bytes == 256 * MiB, "not the 1 GiB default"
    assert controller.CreateVolume(request).volume.capacity_bytes == 256 * MiB, "retry: same volume"


def test_xfs_volumes_are_at_least_the_xfs_minimum(controller):
    volume = create(controller, name="small-xfs", size=64 * MiB, fsType="xfs")
    assert volume.capacity_bytes >= 300 << 20, "mkfs.xfs refuses anything smaller"
    code, message = status_of(controller.CreateVolume, csi_pb2.CreateVolumeRequest(
        name="tiny-xfs", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB, limit_bytes=100 * MiB),
        volume_capabilities=[capability()], parameters={"fsType": "xfs"}))  # fmt: skip
    assert code == grpc.StatusCode.OUT_OF_RANGE and "xfs needs 300 MiB" in message
    assert create(controller, name="small-ext4", size=64 * MiB, fsType="ext4").capacity_bytes == 64 * MiB


def test_an_xfs_capability_sizes_the_volume_like_the_fstype_parameter(controller):
    """Kubernetes sends csi.storage.k8s.io/fstype as the capability's fs_type, not as a parameter: a 256 MiB claim
    for xfs must not become a volume mkfs.xfs refuses at NodeStage (the e2e suite's xfs patterns found it)."""
    volume = create(controller, name="claim-xfs", size=256 * MiB, caps=[capability(fs_type="xfs")])
    assert volume.capacity_bytes >= 300 << 20
    assert create(controller, name="claim-xfs", size=256 * MiB, caps=[capability(fs_type="xfs")]) == volume
    assert create(controller, name="claim-ext4", size=256 * MiB, caps=[capability(fs_type="ext4")]).capacity_bytes == (
        256 * MiB
    )


def test_snapshot_name_reused_for_another_source(controller):
    one, two = create(controller, "one"), create(controller, "two")
    controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=one.volume_id))
    again = controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=one.volume_id))
    assert again.snapshot.source_volume_id == one.volume_id
    code, _ = status_of(
        controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=two.volume_id)
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS


def test_list_snapshots_filters_and_pages(controller):
    volume = create(controller)
    requests = [csi_pb2.CreateSnapshotRequest(name=f"s{i}", source_volume_id=volume.volume_id) for i in range(5)]
    ids = [controller.CreateSnapshot(request).snapshot.snapshot_id for request in requests]
    page = controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=2))
    assert len(page.entries) == 2 and page.next_token
    rest = controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(starting_token=page.next_token))
    seen = [e.snapshot.snapshot_id for e in [*page.entries, *rest.entries]]
    assert sorted(seen) == sorted(ids) and not rest.next_token
    only = controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=ids[3]))
    assert [e.snapshot.snapshot_id for e in only.entries] == [ids[3]]
    assert not controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id="none-exist-id")).entries
    code, _ = status_of(controller.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id="none-exist-id"))
    assert code == grpc.StatusCode.NOT_FOUND


def publish(stub, volume_id, node=NODE_A, mode=Mode.SINGLE_NODE_WRITER, readonly=False, block=False):
    return stub.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node, volume_capability=capability(mode, block=block), readonly=readonly
        )
    )


def test_publish_rules(controller, backends):
    volume = create(controller)
    context = publish(controller, volume.volume_id).publish_context
    assert context["targetIqn"].endswith(volume.volume_id.split("/")[1])
    publish(controller, volume.volume_id)  # idempotent
    code, _ = status_of(publish, controller, volume.volume_id, NODE_A, Mode.SINGLE_NODE_WRITER, True)
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, message = status_of(publish, controller, volume.volume_id, NODE_B)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "single node" in message
    code, _ = status_of(publish, controller, volume.volume_id, "fake-node-id-123")
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = status_of(publish, controller, "blk/vol-00000000000000000000")
    assert code == grpc.StatusCode.NOT_FOUND

    code, message = status_of(controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "still published" in message
    controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id=NODE_A)
    )
    controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id=NODE_A)
    )
    controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert not backends["blk"].pool.lvs


def test_rwx_block_publishes_on_two_nodes_and_lists_them(controller):
    rwx = Mode.MULTI_NODE_MULTI_WRITER
    volume = create(controller, caps=[capability(rwx, block=True)])
    publish(controller, volume.volume_id, NODE_A, rwx, block=True)
    publish(controller, volume.volume_id, NODE_B, rwx, block=True)
    got = controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert sorted(got.status.published_node_ids) == sorted([NODE_A, NODE_B])
    assert not got.status.volume_condition.abnormal


def test_attach_limit(controller):
    for i in range(3):
        publish(controller, create(controller, f"v{i}").volume_id)
    code, message = status_of(publish, controller, create(controller, "v3").volume_id)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 3" in message


def test_publish_reads_its_pool_once_and_each_other_pool_once(controller, backends):
    volume = create(controller)
    pools = [backend.pool for backend in backends.values()]
    before = [pool.reads for pool in pools]
    publish(controller, volume.volume_id)
    assert [pool.reads - n for pool, n in zip(pools, before, strict=True)] == [1, 1]  # each read is an lvs


def test_list_volumes_reads_each_pool_once(controller, backends):
    create(controller)
    pools = [backend.pool for backend in backends.values()]
    before = [pool.reads for pool in pools]
    controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert [pool.reads - n for pool, n in zip(pools, before, strict=True)] == [1, 1]  # volumes and capacity: one lvs


def test_delete_unknown_ids_is_ok(controller):
    for volume_id in ("fake-vol-id", "blk/vol-00000000000000000000", "other/vol-1"):
        controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="reallyfakesnapshotid"))


def test_list_volumes_pages_and_rejects_bad_token(controller):
    created = {create(controller, f"v{i}").volume_id for i in range(3)}
    first = controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2))
    rest = controller.ListVolumes(csi_pb2.ListVolumesRequest(starting_token=first.next_token))
    assert {e.volume.volume_id for e in [*first.entries, *rest.entries]} == created
    code, _ = status_of(controller.ListVolumes, csi_pb2.ListVolumesRequest(starting_token="invalid-token"))
    assert code == grpc.StatusCode.ABORTED


def test_expand(controller):
    volume = create(controller)
    grown = controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=3 * GiB)
        )
    )
    assert grown.capacity_bytes == 3 * GiB and grown.node_expansion_required
    code, _ = status_of(
        controller.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(volume_id=volume.volume_id)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_validate_and_capacity(controller):
    volume = create(controller)
    ok = controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id, volume_capabilities=[capability()])
    )
    assert ok.confirmed.volume_capabilities
    refused = controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[capability(Mode.MULTI_NODE_MULTI_WRITER)]
        )
    )
    assert not refused.HasField("confirmed") and "NFS" in refused.message
    code, _ = status_of(
        controller.ValidateVolumeCapabilities,
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="blk/vol-1", volume_capabilities=[capability()]),
    )
    assert code == grpc.StatusCode.NOT_FOUND
    capacity = controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
    assert 0 < capacity <= 100 * GiB - GiB


def test_locks_refuse_a_held_key_at_once_and_release_it_on_any_exit():
    locks = OperationLocks()
    with locks.hold("DeleteVolume", [("", "blk/vol-1")]):
        with pytest.raises(RpcError) as caught, locks.hold("CreateSnapshot", [("", "blk/vol-2"), ("", "blk/vol-1")]):
            pass
        assert caught.value.code == grpc.StatusCode.ABORTED
        assert str(caught.value) == "DeleteVolume is still in progress on blk/vol-1; retry later"
        with locks.hold("DeleteVolume", [("", "blk/vol-2"), ("", "")]):  # the refused call took nothing
            pass
    with pytest.raises(ValueError), locks.hold("DeleteVolume", [("", "blk/vol-1")]):
        raise ValueError("the operation failed")
    with locks.hold("DeleteVolume", [("", "blk/vol-1")]):
        pass


def test_every_rpc_that_changes_a_volume_is_refused_while_another_holds_it(served):
    service, stub = served
    volume_id = create(stub).volume_id
    calls = {
        "DeleteVolume": csi_pb2.DeleteVolumeRequest(volume_id=volume_id),
        "ControllerPublishVolume": csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=NODE_A, volume_capability=capability()
        ),
        "ControllerUnpublishVolume": csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=NODE_A),
        "ControllerExpandVolume": csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB)
        ),
        "ControllerModifyVolume": csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id),
        "CreateSnapshot": csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=volume_id),
    }
    with service.locks.hold("DeleteVolume", [("", volume_id)]):
        for rpc, request in calls.items():
            answer = status_of(getattr(stub, rpc), request)
            assert answer == (grpc.StatusCode.ABORTED, f"DeleteVolume is still in progress on {volume_id}; retry later")
        stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id))  # reading takes no lock
    stub.DeleteVolume(calls["DeleteVolume"])


def test_a_name_is_held_within_its_rpc_only(served):
    service, stub = served
    source = create(stub).volume_id
    with service.locks.hold("CreateSnapshot", [("CreateSnapshot", "pvc-2")]):
        create(stub, name="pvc-2")  # a volume may have the name of a snapshot being made
        request = csi_pb2.CreateSnapshotRequest(name="pvc-2", source_volume_id=source)
        answer = status_of(stub.CreateSnapshot, request)
        assert answer == (grpc.StatusCode.ABORTED, "CreateSnapshot is still in progress on name 'pvc-2'; retry later")


def test_capabilities_cover_what_is_implemented(controller):
    caps = controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest()).capabilities
    types = {c.rpc.type for c in caps}
    Rpc = csi_pb2.ControllerServiceCapability.RPC
    assert {Rpc.CREATE_DELETE_VOLUME, Rpc.PUBLISH_UNPUBLISH_VOLUME, Rpc.CREATE_DELETE_SNAPSHOT, Rpc.CLONE_VOLUME,
            Rpc.EXPAND_VOLUME, Rpc.LIST_VOLUMES, Rpc.GET_CAPACITY, Rpc.GET_SNAPSHOT,
            Rpc.MODIFY_VOLUME} <= types  # fmt: skip


def test_backends_sharing_one_pool_see_only_their_own_volumes(tmp_path):
    shared = FakeThinPool()
    blk = LvmBackend("blk", shared, FakeExporter("iscsi"))
    files = LvmBackend("files", shared, FakeExporter("nfs"))
    volume = blk.create_volume("pvc-1", GiB, 0, {}, None)
    blk.create_snapshot("snap-1", volume.lv)
    assert [v.lv for v in blk.list_volumes()] == [volume.lv] and files.list_volumes() == []
    assert files.list_snapshots() == [] and len(blk.list_snapshots()) == 1
    with pytest.raises(Exception, match="not found"):
        files.get_volume(volume.lv)
    files.delete_volume(volume.lv)  # another backend's ID: nothing of ours, nothing removed
    assert blk.get_volume(volume.lv)
    same_name = files.create_volume("pvc-1", GiB, 0, {}, None)
    assert same_name.lv != volume.lv, "one CSI name in two backends on one pool: two volumes, no collision"
    assert files.create_snapshot("snap-1", same_name.lv).lv != blk.list_snapshots()[0].lv


def test_a_volume_that_cannot_be_finished_is_removed_not_leaked():
    pool, exporter = FakeThinPool(), FakeExporter("nfs")
    backend = LvmBackend("files", pool, exporter)
    exporter.prepare_error = CommandFailed(["mkfs.xfs", "/dev/berth/x"], 1, "Filesystem must be larger than 300MB.")
    with pytest.raises(CommandFailed):
        backend.create_volume("pvc-1", GiB, 0, {}, None)
    assert pool.list({}) == [], "a permanent failure leaves no half-made LV behind"

    exporter.prepare_error = HostUnreachable("ssh: connect to host 198.18.0.1: Connection refused")
    with pytest.raises(HostUnreachable):
        backend.create_volume("pvc-1", GiB, 0, {}, None)
    assert [lv.meta["state"] for lv in pool.list({})] == ["creating"], "kept for the retry to finish"
    exporter.prepare_error = None
    assert backend.create_volume("pvc-1", GiB, 0, {}, None).size_bytes == GiB
    assert [lv.meta["state"] for lv in pool.list({})] == ["ready"]


def test_unknown_access_mode_is_invalid_argument_not_internal(controller):
    caps = [Cap(mount=Cap.MountVolume(), access_mode=Mode(mode=99))]
    code, message = status_of(create, controller, "pvc-99", GiB, 0, caps)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "access mode 99" in message


@pytest.mark.parametrize(
    "name",
    ["x" * 129, "é" * 65, "pvc\x00", "pvc\x07x", "pvc\x1b[0m", "pvc\x7f", "pvc\x85"],
)
def test_volume_and_snapshot_names_follow_the_spec(controller, name):
    code, message = status_of(create, controller, name)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CreateVolume name" in message
    volume = create(controller, "source")
    code, message = status_of(
        controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume.volume_id)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CreateSnapshot name" in message


def test_names_the_spec_allows_are_accepted(controller):
    assert create(controller, "é" * 64).volume_id  # 128 bytes of UTF-8
    assert create(controller, "tab\tand space").volume_id  # common whitespace is allowed in names


@pytest.mark.parametrize(
    ("parameters", "secrets", "fragment"),
    [
        ({"fsType": "x" * 129}, {}, "parameters['fsType'] is 129 bytes"),
        ({"csi.storage.k8s.io/pvc/name": "a\nb"}, {}, "holds a control character"),
        ({"k" * 129: "v"}, {}, "is 129 bytes"),
        ({}, {f"key{i}": "v" * 100 for i in range(50)}, "secrets holds"),
        ({}, {"node.session.auth.password": "hunter2\x00"}, "secrets['node.session.auth.password'] holds a control"),
    ],
)
def test_maps_follow_the_spec_limits_and_never_echo_secrets(controller, parameters, secrets, fragment):
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-maps", volume_capabilities=[capability()], parameters=parameters, secrets=secrets
    )
    code, message = status_of(controller.CreateVolume, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in message
    assert "hunter2" not in message


def test_nfs_export_options_storage_class_parameter(controller):
    nfs_caps = [capability(Mode.MULTI_NODE_MULTI_WRITER)]
    volume = create(controller, "kubevirt", caps=nfs_caps, backend="files", nfsExportOptions="no_root_squash")
    assert volume.volume_id.startswith("files/")
    code, message = status_of(lambda: create(controller, "blk-opts", nfsExportOptions="no_root_squash"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "applies to nfs backends" in message


# --- ControllerModifyVolume and CreateVolume's mutable_parameters ---


def create_with(stub, name="pvc-1", backend="blk", **mutable):
    return stub.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
            volume_capabilities=[capability()],
            parameters={"backend": backend},
            mutable_parameters=mutable,
        )
    ).volume


def modify(stub, volume_id, **mutable):
    return stub.ControllerModifyVolume(
        csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=mutable)
    )


def stored(backends, volume_id):
    backend, lv = volume_id.split("/")
    return backends[backend].get_volume(lv).mutable


def test_create_keeps_mutable_parameters_in_the_lv_tags(controller, backends):
    volume = create_with(controller, iscsiUnmap="false")
    assert stored(backends, volume.volume_id) == {"iscsiUnmap": "false"}
    assert backends["blk"].get_volume(volume.volume_id.split("/")[1]).parameters == {"backend": "blk"}


def test_modify_records_then_applies_to_the_live_export(controller, backends):
    volume = create_with(controller, name="files-1", backend="files", nfsSquash="root_squash")
    modify(controller, volume.volume_id, nfsSync="false")
    assert stored(backends, volume.volume_id) == {"nfsSquash": "root_squash", "nfsSync": "false"}
    lv = volume.volume_id.split("/")[1]
    assert backends["files"].exporter.modified == [(lv, {"nfsSquash": "root_squash", "nfsSync": "false"})]


def test_a_create_retry_after_a_modify_is_the_same_volume(controller):
    volume = create_with(controller, iscsiUnmap="true")
    modify(controller, volume.volume_id, iscsiUnmap="false")
    assert create_with(controller, iscsiUnmap="true").volume_id == volume.volume_id


@pytest.mark.parametrize(
    "mutable, named",
    [
        ({"XXX_FakeKey": "1"}, ["'XXX_FakeKey'", "iscsiUnmap: true, false"]),
        ({"nfsSync": "true"}, ["'nfsSync'", "backend blk offers iscsiUnmap: true, false"]),
        ({"iscsiUnmap": "yes"}, ["iscsiUnmap='yes'", "one of true, false"]),
    ],
)
def test_unknown_keys_and_values_are_invalid_naming_what_is_allowed(controller, backends, mutable, named):
    volume = create_with(controller)
    for call, request in (
        (controller.ControllerModifyVolume, csi_pb2.ControllerModifyVolumeRequest(volume_id=volume.volume_id)),
        (controller.CreateVolume, csi_pb2.CreateVolumeRequest(name="pvc-2", volume_capabilities=[capability()])),
    ):
        request.mutable_parameters.update(mutable)
        code, message = status_of(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and all(n in message for n in named), message
    assert backends["blk"].exporter.modified == [] and len(backends["blk"].list_volumes()) == 1


def test_modify_needs_a_volume_id_and_parameters_and_an_existing_volume(controller):
    volume = create_with(controller)
    cases = [
        (csi_pb2.ControllerModifyVolumeRequest(mutable_parameters={"iscsiUnmap": "true"}), "INVALID_ARGUMENT"),
        (csi_pb2.ControllerModifyVolumeRequest(volume_id=volume.volume_id), "INVALID_ARGUMENT"),
        (csi_pb2.ControllerModifyVolumeRequest(volume_id="blk/vol-0000", mutable_parameters={"iscsiUnmap": "true"}),
         "NOT_FOUND"),
        (csi_pb2.ControllerModifyVolumeRequest(volume_id="no-such-id", mutable_parameters={"iscsiUnmap": "true"}),
         "NOT_FOUND"),
    ]  # fmt: skip
    for request, code in cases:
        assert status_of(controller.ControllerModifyVolume, request)[0].name == code, request
