import os

import grpc
import pytest

from csi_driver.csi import csi_pb2
from csi_driver.node import iscsi
from csi_driver.node.stage_record import RecordStore

from .conftest import WWN, Aborted

VOL = "lab-iscsi/vol-3f2a9c01d4e5b6a7c8d9"
Cap = csi_pb2.VolumeCapability


def capability(block: bool = False, mode: int = Cap.AccessMode.SINGLE_NODE_WRITER, fs: str = "ext4"):
    if block:
        return Cap(block=Cap.BlockVolume(), access_mode=Cap.AccessMode(mode=mode))
    return Cap(mount=Cap.MountVolume(fs_type=fs), access_mode=Cap.AccessMode(mode=mode))


def stage_request(node, block=False, **overrides):
    fields = dict(
        volume_id=VOL,
        staging_target_path=os.path.join(node.root, "staging"),
        volume_capability=capability(block),
        publish_context={
            "targetPortals": "198.18.0.2:3260",
            "targetIqn": "iqn.2026-11.io.csi.berth:v",
            "targetLun": "0",
        },
        volume_context={"protocol": "iscsi", "backend": "lab-iscsi", "wwn": WWN},
    )
    fields.update(overrides)
    return csi_pb2.NodeStageVolumeRequest(**fields)


def publish_request(node, block=False, target="target", **overrides):
    fields = dict(
        volume_id=VOL,
        staging_target_path=os.path.join(node.root, "staging"),
        target_path=os.path.join(node.root, "mnt", target),
        volume_capability=capability(block),
    )
    fields.update(overrides)
    return csi_pb2.NodePublishVolumeRequest(**fields)


def code_of(call, request, context):
    with pytest.raises(Aborted) as caught:
        call(request, context)
    return caught.value.code, caught.value.details


# --- argument validation: before any lookup, with a clear message ---


@pytest.mark.parametrize(
    "rpc, request_, missing",
    [
        ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(staging_target_path="/s", volume_capability=capability()),
         "volume_id"),
        ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(volume_id="fake-vol-id-1", volume_capability=capability()),
         "staging_target_path"),
        ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(volume_id="fake-vol-id-1", staging_target_path="/s"),
         "volume_capability"),
        ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(staging_target_path="/s"), "volume_id"),
        ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(volume_id="v"), "staging_target_path"),
        ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(target_path="/t", volume_capability=capability()),
         "volume_id"),
        ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(volume_id="fake-vol-id-1", volume_capability=capability()),  # noqa: E501
         "target_path"),
        ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(volume_id="fake-vol-id-1", target_path="/t"),
         "volume_capability"),
        ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(target_path="/t"), "volume_id"),
        ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(volume_id="v"), "target_path"),
        ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_path="/t"), "volume_id"),
        ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_id="fake-vol-id-1"), "volume_path"),
        ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_path="/t"), "volume_id"),
        ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_id="fake-vol-id-1"), "volume_path"),
    ],
)  # fmt: skip
def test_required_fields(node, context, rpc, request_, missing):
    code, details = code_of(getattr(node.service, rpc), request_, context)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"{missing} is required"
    assert node.system.calls == []


def test_capability_without_access_type(node, context):
    request = stage_request(node, volume_capability=Cap(access_mode=Cap.AccessMode(mode=1)))
    code, details = code_of(node.service.NodeStageVolume, request, context)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "access type" in details


def test_unknown_protocol(node, context):
    request = stage_request(node, volume_context={"protocol": "fc"})
    code, details = code_of(node.service.NodeStageVolume, request, context)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'fc'" in details


def test_capabilities_and_info(node, context):
    caps = node.service.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), context)
    Rpc = csi_pb2.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} == {
        Rpc.STAGE_UNSTAGE_VOLUME, Rpc.GET_VOLUME_STATS, Rpc.EXPAND_VOLUME, Rpc.VOLUME_CONDITION,
        Rpc.SINGLE_NODE_MULTI_WRITER,
    }  # fmt: skip
    info = node.service.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), context)
    assert info.node_id.startswith("iqn.") and info.max_volumes_per_node == 16


# --- stage / publish ---


def test_stage_mount_formats_blank_device_and_is_idempotent(node, context):
    for _ in range(3):
        node.service.NodeStageVolume(stage_request(node), context)
    assert len(node.system.commands("mkfs.ext4")) == 1
    assert len([c for c in node.connector_log if c[0] == "connect"]) == 1
    assert node.system.table.at(os.path.join(node.root, "staging")).source == node.device
    record = RecordStore(os.path.join(node.root, "state")).load(VOL)
    assert record.device_path == node.device and record.wwn == WWN and record.fs_type == "ext4"


def test_stage_with_other_fs_type_conflicts(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    other = stage_request(node, volume_capability=capability(fs="xfs"))
    code, details = code_of(node.service.NodeStageVolume, other, context)
    assert code == grpc.StatusCode.ALREADY_EXISTS and "fs_type" in details


def test_publish_without_stage_is_failed_precondition(node, context):
    code, details = code_of(node.service.NodePublishVolume, publish_request(node), context)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not staged" in details
    request = publish_request(node, staging_target_path="")
    code, _ = code_of(node.service.NodePublishVolume, request, context)
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_publish_idempotent_then_conflicts(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    for _ in range(3):
        node.service.NodePublishVolume(publish_request(node), context)
    target = os.path.join(node.root, "mnt", "target")
    assert os.path.isdir(target)
    assert len([c for c in node.system.commands("mount") if "--bind" in c]) == 1
    code, details = code_of(node.service.NodePublishVolume, publish_request(node, readonly=True), context)
    assert code == grpc.StatusCode.ALREADY_EXISTS and "read-write" in details
    # Something else mounted at another target path: not ours → ALREADY_EXISTS.
    foreign = os.path.join(node.root, "mnt", "foreign")
    node.system.table.add("/dev/sdz", foreign, "ext4", "8:99")
    code, _ = code_of(node.service.NodePublishVolume, publish_request(node, target="foreign"), context)
    assert code == grpc.StatusCode.ALREADY_EXISTS


def test_single_node_single_writer_second_target(node, context):
    snsw = capability(mode=Cap.AccessMode.SINGLE_NODE_SINGLE_WRITER)
    node.service.NodeStageVolume(stage_request(node, volume_capability=snsw), context)
    node.service.NodePublishVolume(publish_request(node, volume_capability=snsw), context)
    request = publish_request(node, target="other_target", volume_capability=snsw)
    code, _ = code_of(node.service.NodePublishVolume, request, context)
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_block_publish_binds_device_onto_a_file_and_unpublish_removes_it(node, context):
    node.service.NodeStageVolume(stage_request(node, block=True), context)
    assert node.system.commands("mkfs.ext4") == [] and node.system.commands("mount") == []
    node.service.NodePublishVolume(publish_request(node, block=True), context)
    target = os.path.join(node.root, "mnt", "target")
    assert os.path.isfile(target)
    assert ["mount", "--bind", "--", node.device, target] in node.system.calls
    node.service.NodePublishVolume(publish_request(node, block=True), context)  # idempotent
    assert len(node.system.commands("mount")) == 1
    node.service.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=target), context)
    assert not os.path.exists(target)


def test_unpublish_unknown_volume_is_ok(node, context):
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id="fake-vol-id-1", target_path="/nonexistent/target")
    node.service.NodeUnpublishVolume(request, context)


# --- unstage, also after a restart with the device gone ---


def test_unstage_after_restart_with_device_gone(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    staging = os.path.join(node.root, "staging")
    node.make_service()  # the plugin restarts: nothing in memory
    node.remove_device()  # the LUN vanished (target deleted, network cut)
    node.system.table.remove_top(staging)  # and the kernel dropped the dead mount
    node.service.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging), context
    )
    disconnect = [c for c in node.connector_log if c[0] == "disconnect"]
    assert len(disconnect) == 1
    _, props, device_info, force, _ = disconnect[0]
    assert (
        force is True and props["target_iqn"] == "iqn.2026-11.io.csi.berth:v" and device_info == {"path": node.device}
    )
    assert RecordStore(os.path.join(node.root, "state")).load(VOL) is None
    # Idempotent: a second unstage is OK and touches nothing.
    node.service.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging), context
    )
    assert len([c for c in node.connector_log if c[0] == "disconnect"]) == 1


def test_failed_detach_keeps_the_record(node, context):
    node.service.NodeStageVolume(stage_request(node, block=True), context)
    node.make_service()
    staging = os.path.join(node.root, "staging")
    original = node.volumes.protocols["iscsi"].connector_factory

    def failing(multipath):
        connector = original(multipath)
        connector.disconnect_error = RuntimeError("logout failed")
        return connector

    node.volumes.protocols["iscsi"].connector_factory = failing
    request = csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging)
    code, details = code_of(node.service.NodeUnstageVolume, request, context)
    assert code == grpc.StatusCode.INTERNAL and "logout failed" in details
    assert RecordStore(os.path.join(node.root, "state")).load(VOL) is not None


def test_an_unreadable_stage_record_fails_unstage_and_is_replaced_by_a_new_stage(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    store = RecordStore(os.path.join(node.root, "state"))
    with open(store.path(VOL), "w") as f:
        f.write("{")  # a disk fault or a hand edit
    staging = os.path.join(node.root, "staging")
    unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging)
    code, details = code_of(node.service.NodeUnstageVolume, unstage, context)
    assert code == grpc.StatusCode.INTERNAL and "cannot be read" in details and store.path(VOL) in details
    assert not [c for c in node.connector_log if c[0] == "disconnect"]  # nothing guessed
    node.service.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=os.path.join(node.root, "mnt", "t")), context
    )
    node.service.NodeStageVolume(stage_request(node), context)
    assert store.load(VOL).device_path == node.device and os.path.exists(store.path(VOL) + ".unreadable")
    node.service.NodeUnstageVolume(unstage, context)
    assert [c[0] for c in node.connector_log if c[0] == "disconnect"] == ["disconnect"]


def test_unstage_refuses_while_still_published(node, context):
    node.service.NodeStageVolume(stage_request(node, block=True), context)
    node.service.NodePublishVolume(publish_request(node, block=True), context)
    request = csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=os.path.join(node.root, "staging"))
    code, details = code_of(node.service.NodeUnstageVolume, request, context)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "still mounted" in details
    assert not [c for c in node.connector_log if c[0] == "disconnect"]


# --- stats, expand, locks ---


def test_stats_not_found_for_unknown_volume_and_wrong_path(node, context):
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id="fake-vol-id-1", volume_path="/some/path")
    code, _ = code_of(node.service.NodeGetVolumeStats, request, context)
    assert code == grpc.StatusCode.NOT_FOUND
    node.service.NodeStageVolume(stage_request(node), context)
    node.service.NodePublishVolume(publish_request(node), context)
    code, details = code_of(
        node.service.NodeGetVolumeStats,
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOL, volume_path="some/path"),
        context,
    )
    assert code == grpc.StatusCode.NOT_FOUND and "some/path" in details


def test_stats_of_published_mount_and_abnormal_when_device_gone(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    node.service.NodePublishVolume(publish_request(node), context)
    target = os.path.join(node.root, "mnt", "target")
    response = node.service.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOL, volume_path=target), context
    )
    units = {u.unit for u in response.usage}
    assert units == {csi_pb2.VolumeUsage.BYTES, csi_pb2.VolumeUsage.INODES}
    assert not response.volume_condition.abnormal
    node.remove_device()
    response = node.service.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOL, volume_path=target), context
    )
    assert response.volume_condition.abnormal and "gone" in response.volume_condition.message


def test_expand_rescans_and_grows(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    node.system.sizes[node.device] = 20 << 30
    request = csi_pb2.NodeExpandVolumeRequest(volume_id=VOL, volume_path=os.path.join(node.root, "staging"))
    response = node.service.NodeExpandVolume(request, context)
    assert response.capacity_bytes == 20 << 30
    assert [c for c in node.connector_log if c[0] == "extend"]
    assert ["resize2fs", "--", node.device] in node.system.calls


def test_expand_tries_the_rescan_again_while_a_path_is_not_up_yet(node, context, monkeypatch):
    """Right after a stage under load a path may not read yet, and os-brick refuses to rescan until all do."""
    monkeypatch.setattr(iscsi, "EXPAND_RETRY_INTERVAL", 0)
    node.service.NodeStageVolume(stage_request(node), context)
    node.extend_errors.extend([RuntimeError("All paths need to be up to extend the device.")] * 2)
    request = csi_pb2.NodeExpandVolumeRequest(volume_id=VOL, volume_path=os.path.join(node.root, "staging"))
    node.service.NodeExpandVolume(request, context)
    assert len([c for c in node.connector_log if c[0] == "extend"]) == 3


def test_expand_gives_up_on_a_rescan_that_keeps_failing(node, context, monkeypatch):
    monkeypatch.setattr(iscsi, "EXPAND_RETRY_WINDOW", 0)
    node.service.NodeStageVolume(stage_request(node), context)
    node.extend_errors.append(RuntimeError("All paths need to be up to extend the device."))
    request = csi_pb2.NodeExpandVolumeRequest(volume_id=VOL, volume_path=os.path.join(node.root, "staging"))
    code, details = code_of(node.service.NodeExpandVolume, request, context)
    assert code == grpc.StatusCode.INTERNAL and "All paths need to be up" in details


def test_expand_unknown_volume_not_found(node, context):
    request = csi_pb2.NodeExpandVolumeRequest(volume_id="fake-vol-id-1", volume_path="/x")
    code, _ = code_of(node.service.NodeExpandVolume, request, context)
    assert code == grpc.StatusCode.NOT_FOUND


def test_second_call_while_one_is_in_flight_is_aborted(node, context):
    with node.service.locks.hold("NodeStageVolume", [("", VOL)]):
        code, details = code_of(node.service.NodePublishVolume, publish_request(node), context)
    assert code == grpc.StatusCode.ABORTED and "NodeStageVolume is still in progress" in details


def test_unstage_of_mount_volume_still_published_keeps_staging_mount(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    node.service.NodePublishVolume(publish_request(node), context)
    staging = os.path.join(node.root, "staging")
    request = csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging)
    code, _ = code_of(node.service.NodeUnstageVolume, request, context)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert node.system.table.is_mountpoint(staging) and node.system.commands("umount") == []
