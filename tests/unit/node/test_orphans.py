"""`berth orphans --node`: stage records whose device or mount is gone, and their removal through NodeUnstage's path."""

import os
import time

from csi_driver.node.orphans import find_stale_stages, remove_stale_stages
from csi_driver.orphans import audit_node

from .test_nfs_identity_runner import NFS_VOL, nfs_stage
from .test_node_service import VOL, publish_request, stage_request

HOUR = 3600


def later(seconds: float = 2 * HOUR):
    return lambda: time.time() + seconds


def staging(node):
    return os.path.join(node.root, "staging")


def test_a_record_whose_device_is_gone_is_stale_past_the_age_limit_and_removal_unstages_it(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    node.remove_device()

    assert find_stale_stages(node.volumes, HOUR) == [], "a record younger than the limit may be a stage in progress"
    (stale,) = find_stale_stages(node.volumes, HOUR, later())
    assert (stale.volume_id, stale.protocol, stale.staging_path) == (VOL, "iscsi", staging(node))
    assert "gone" in stale.reason and stale.age_seconds >= 2 * HOUR - 5

    (outcome,) = remove_stale_stages(node.volumes, [stale], HOUR, later())
    assert outcome == (stale, None)
    disconnects = [entry for entry in node.connector_log if entry[0] == "disconnect"]
    assert len(disconnects) == 1 and disconnects[0][3] is True, "NodeUnstage's forced detach of a vanished device"
    assert node.volumes.records.load(VOL) is None
    assert not node.system.table.is_mountpoint(staging(node))
    assert find_stale_stages(node.volumes, HOUR, later()) == []


def test_a_whole_staging_or_one_a_pod_still_holds_is_never_stale(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    assert find_stale_stages(node.volumes, 0, later()) == [], "device and staging mount are there"
    node.service.NodePublishVolume(publish_request(node), context)
    node.remove_device()
    assert find_stale_stages(node.volumes, 0, later()) == [], "a publish target is mounted: kubelet's to undo"


def test_an_nfs_record_without_its_mount_is_stale(node, context):
    node.service.NodeStageVolume(nfs_stage(node), context)
    assert find_stale_stages(node.volumes, 0, later()) == []
    node.system.table.remove_top(staging(node))
    (stale,) = find_stale_stages(node.volumes, 0, later())
    assert stale.volume_id == NFS_VOL and "nothing of it is mounted" in stale.reason


def test_removal_skips_a_record_that_is_whole_again(node, context):
    node.service.NodeStageVolume(nfs_stage(node), context)
    node.system.table.remove_top(staging(node))
    (stale,) = find_stale_stages(node.volumes, 0, later())
    node.service.NodeStageVolume(nfs_stage(node), context)  # kubelet staged it again meanwhile
    ((_, error),) = remove_stale_stages(node.volumes, [stale], 0, later())
    assert error and "no longer stale" in error
    assert node.volumes.records.load(NFS_VOL) is not None and node.system.table.is_mountpoint(staging(node))


def test_node_report_lists_exactly_what_it_removed(node, context):
    node.service.NodeStageVolume(nfs_stage(node), context)
    node.system.table.remove_top(staging(node))
    found = audit_node(node.volumes, 0, remove=False)
    assert [(e.kind, e.name, e.removed) for e in found.orphans] == [("stage_record", NFS_VOL, False)]
    assert found.exit_status() == 1
    removed = audit_node(node.volumes, 0, remove=True)
    assert [(e.name, e.removed, e.error) for e in removed.orphans] == [(NFS_VOL, True, None)]
    assert removed.exit_status() == 0 and audit_node(node.volumes, 0, remove=False).orphans == []
