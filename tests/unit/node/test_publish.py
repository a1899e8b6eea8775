"""NodePublishVolume: multipath raw block (issue #13 item 12), read-only access modes (6), unmount errors (8)."""

import os

import grpc
import pytest

from csi_driver.csi import csi_pb2
from csi_driver.node.commands import Result
from csi_driver.node.stage_record import RecordStore

from .conftest import WWN
from .test_node_service import VOL, capability, code_of, publish_request, stage_request

Mode = csi_pb2.VolumeCapability.AccessMode
TWO_PORTALS = {"targetPortals": "198.18.0.2:3260,198.18.1.2:3260", "targetIqn": "iqn.2026-11.io.csi.berth:v"}


def add_multipath_map(node) -> str:
    """multipathd's work: /dev/dm-3 over the path sdb, and udev's by-id link for it."""
    dm = os.path.join(node.root, "dev", "dm-3")
    open(dm, "w").close()
    os.symlink(dm, os.path.join(node.by_id, f"dm-uuid-mpath-3{WWN}"))
    os.makedirs(os.path.join(node.root, "sys", "dm-3", "slaves", "sdb"))
    return dm


def stage_multipath(node, context):
    request = stage_request(node, block=True, publish_context=TWO_PORTALS)
    node.service.NodeStageVolume(request, context)


def binds(node):
    return [c for c in node.system.calls if "--bind" in c]


# --- multipath: only the map, never one of its paths ---


def test_multipath_stage_records_the_map_when_os_brick_returns_one_path(node, context):
    dm = add_multipath_map(node)  # the connector answers with /dev/sdb, as os-brick does when the map is late
    stage_multipath(node, context)
    assert RecordStore(os.path.join(node.root, "state")).load(VOL).device_path == dm


def test_multipath_stage_finds_a_map_udev_has_not_linked_yet(node, context):
    dm = add_multipath_map(node)
    os.unlink(os.path.join(node.by_id, f"dm-uuid-mpath-3{WWN}"))  # a loaded udev is behind: only sysfs knows
    os.makedirs(os.path.join(node.root, "sys", "dm-3", "dm"))
    with open(os.path.join(node.root, "sys", "dm-3", "dm", "uuid"), "w") as f:
        f.write(f"mpath-3{WWN}\n")
    stage_multipath(node, context)
    assert RecordStore(os.path.join(node.root, "state")).load(VOL).device_path == dm


def test_multipath_stage_without_a_map_fails_and_logs_out(node, context):
    code, details = code_of(
        node.service.NodeStageVolume, stage_request(node, block=True, publish_context=TWO_PORTALS), context
    )
    assert code == grpc.StatusCode.INTERNAL and "multipathd assembled no map" in details
    assert [e[0] for e in node.connector_log].count("disconnect") == 1
    assert RecordStore(os.path.join(node.root, "state")).load(VOL) is None


def test_block_publish_never_binds_a_single_path_of_a_multipath_volume(node, context):
    dm = add_multipath_map(node)
    stage_multipath(node, context)
    os.unlink(os.path.join(node.by_id, f"dm-uuid-mpath-3{WWN}"))  # the map is being rebuilt after a re-stage
    code, details = code_of(node.service.NodePublishVolume, publish_request(node, block=True), context)
    assert code == grpc.StatusCode.INTERNAL and "multipath map" in details
    assert binds(node) == [], "wwn-0x and the recorded path both name a device; neither may be used"
    os.symlink(dm, os.path.join(node.by_id, f"dm-uuid-mpath-3{WWN}"))
    node.service.NodePublishVolume(publish_request(node, block=True), context)
    assert binds(node)[0][-2] == dm


def test_a_repeated_publish_replaces_a_single_path_bind_with_the_map_and_is_idempotent(node, context):
    dm = add_multipath_map(node)
    stage_multipath(node, context)
    target = os.path.join(node.root, "mnt", "target")
    open(target, "w").close()
    node.system.table.add("udev", target, "devtmpfs", "0:5", "/sdb")  # what the race left
    node.service.NodePublishVolume(publish_request(node, block=True), context)
    assert node.system.table.at(target).root == "/dm-3"
    assert ["umount", "--", target] in node.system.calls and binds(node)[0][-2:] == [dm, target]
    calls = len(node.system.calls)
    node.service.NodePublishVolume(publish_request(node, block=True), context)
    assert len(node.system.calls) == calls


def test_a_target_bound_to_another_device_is_already_exists(node, context):
    add_multipath_map(node)
    stage_multipath(node, context)
    target = os.path.join(node.root, "mnt", "target")
    node.system.table.add("udev", target, "devtmpfs", "0:5", "/sdz")
    code, details = code_of(node.service.NodePublishVolume, publish_request(node, block=True), context)
    assert code == grpc.StatusCode.ALREADY_EXISTS and "not this volume" in details


# --- read-only access modes ---


@pytest.mark.parametrize("mode", [Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY])
@pytest.mark.parametrize("block", [False, True])
def test_reader_only_modes_publish_read_only(node, context, mode, block):
    cap = capability(block=block, mode=mode)
    node.service.NodeStageVolume(stage_request(node, block=block, volume_capability=cap), context)
    node.service.NodePublishVolume(publish_request(node, block=block, volume_capability=cap), context)
    assert node.system.table.at(os.path.join(node.root, "mnt", "target")).readonly


def test_a_reader_only_publish_of_a_shared_block_volume_is_read_only(node, context):
    """The node stages once for every pod; a reader pod's publish carries its own mode."""
    rwx, reader = (
        capability(block=True, mode=Mode.MULTI_NODE_MULTI_WRITER),
        capability(block=True, mode=Mode.MULTI_NODE_READER_ONLY),
    )
    node.service.NodeStageVolume(stage_request(node, block=True, volume_capability=rwx), context)
    node.service.NodePublishVolume(publish_request(node, block=True, volume_capability=reader), context)
    assert node.system.table.at(os.path.join(node.root, "mnt", "target")).readonly


def test_a_volume_published_read_only_to_the_node_is_bound_read_only(node, context):
    """ControllerPublish with readonly=true puts readonly=true into publish_context; every bind follows it."""
    context_ro = {**stage_request(node).publish_context, "readonly": "true"}
    node.service.NodeStageVolume(stage_request(node, block=True, publish_context=context_ro), context)
    node.service.NodePublishVolume(publish_request(node, block=True), context)
    assert node.system.table.at(os.path.join(node.root, "mnt", "target")).readonly
    node.service.NodePublishVolume(publish_request(node, block=True), context)  # the same request: OK


# --- unmount failures: never ALREADY_EXISTS ---


@pytest.mark.parametrize(
    "stderr, code, fragment",
    [
        ("umount: {t}: target is busy.", grpc.StatusCode.FAILED_PRECONDITION, "busy (a process still has"),
        ("umount: {t}: must be superuser to unmount.", grpc.StatusCode.INTERNAL, "must be superuser"),
    ],
)
def test_failed_unmount_says_why(node, context, stderr, code, fragment):
    node.service.NodeStageVolume(stage_request(node), context)
    node.service.NodePublishVolume(publish_request(node), context)
    target = os.path.join(node.root, "mnt", "target")
    node.system.handlers.append(lambda a: Result(32, "", stderr.format(t=target)) if a[0] == "umount" else None)
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=target)
    got, details = code_of(node.service.NodeUnpublishVolume, request, context)
    assert got == code and fragment in details
    assert node.system.table.is_mountpoint(target) and os.path.isdir(target)


def test_a_raw_block_volume_staged_read_only_is_read_only_at_the_block_layer(node, context):
    """A read-only bind does not stop writes through a device node; the device's own read-only flag does."""
    reader = capability(block=True, mode=Mode.MULTI_NODE_READER_ONLY)
    node.service.NodeStageVolume(stage_request(node, block=True, volume_capability=reader), context)
    assert ["blockdev", "--setro", node.device] in node.system.calls
    node.service.NodeStageVolume(stage_request(node, block=True, volume_capability=reader), context)
    writer = capability(block=True, mode=Mode.MULTI_NODE_MULTI_WRITER)
    node.service.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=os.path.join(node.root, "staging")),
        context,
    )
    calls = len(node.system.calls)
    node.service.NodeStageVolume(stage_request(node, block=True, volume_capability=writer), context)
    assert ["blockdev", "--setro", node.device] not in node.system.calls[calls:]
