"""A NodeStageVolume that fails leaves nothing behind (issue #13 items 3 and 13), and what it means for retries."""

import errno
import os

import grpc
import pytest

from csi_driver.csi import csi_pb2
from csi_driver.node import stage_record
from csi_driver.node.commands import Result
from csi_driver.node.iscsi import sweep_portal_locks
from csi_driver.node.stage_record import RecordStore, StageRecord

from .conftest import WWN
from .fakes import timeout_for
from .test_nfs_identity_runner import NFS_VOL, nfs_stage
from .test_node_service import VOL, capability, code_of, publish_request, stage_request


def fail(prefix: list[str], stderr: str = "boom"):
    def handler(args):
        return Result(1, "", stderr) if args[: len(prefix)] == prefix else None

    return handler


def record(node, volume_id=VOL):
    return RecordStore(os.path.join(node.root, "state")).load(volume_id)


def kinds(node):
    return [entry[0] for entry in node.connector_log]


def staging(node):
    return os.path.join(node.root, "staging")


@pytest.mark.parametrize(
    "failing, stderr",
    [
        (["mkfs.ext4"], "mkfs.ext4: Input/output error while writing out and closing file system"),
        (["mount", "-t"], "mount: wrong fs type, bad option, bad superblock"),
        (["dumpe2fs"], "dumpe2fs: Bad magic number in super-block"),
    ],
)
def test_a_stage_failing_after_login_logs_out_and_forgets_the_record(node, context, failing, stderr):
    node.system.handlers.append(fail(failing, stderr))
    code, details = code_of(node.service.NodeStageVolume, stage_request(node), context)
    assert code == grpc.StatusCode.INTERNAL and stderr in details
    disconnects = [entry for entry in node.connector_log if entry[0] == "disconnect"]
    assert len(disconnects) == 1 and disconnects[0][3] is True, "the login is undone (forced: nothing to flush)"
    assert kinds(node)[-1] == "sweep locks", "os-brick's portal lock files go with the session"
    assert record(node) is None
    assert not node.system.table.is_mountpoint(staging(node))
    # The retry starts from a clean node and works.
    node.system.handlers.clear()
    node.service.NodeStageVolume(stage_request(node), context)
    assert record(node).device_path == node.device
    assert node.system.table.at(staging(node)).source == node.device


def test_a_failed_grow_unmounts_before_logging_out(node, context):
    node.system.fs_types[node.device] = "ext4"
    node.system.fs_sizes[node.device] = 1 << 30  # a clone of a 1 GiB volume on a 10 GiB LUN
    node.system.handlers.append(fail(["resize2fs"], "resize2fs: Permission denied"))
    code, _ = code_of(node.service.NodeStageVolume, stage_request(node), context)
    assert code == grpc.StatusCode.INTERNAL
    umount = node.system.calls.index(["umount", "--", staging(node)])
    assert kinds(node)[-2:] == ["disconnect", "sweep locks"] and umount > 0
    assert record(node) is None and not node.system.table.is_mountpoint(staging(node))


def test_a_wrong_wwn_is_detached_once_and_leaves_no_record(node, context):
    other = stage_request(node, volume_context={"protocol": "iscsi", "wwn": "6001405" + "0" * 25})
    code, details = code_of(node.service.NodeStageVolume, other, context)
    assert code == grpc.StatusCode.INTERNAL and "refusing" in details
    assert kinds(node).count("disconnect") == 1
    assert record(node) is None


def test_a_connector_that_cannot_be_built_is_a_named_internal_error_not_a_traceback(node, context):
    def no_connector(multipath):
        raise ImportError("No module named 'os_brick'")

    node.volumes.protocols["iscsi"].connector_factory = no_connector
    code, details = code_of(node.service.NodeStageVolume, stage_request(node), context)
    assert code == grpc.StatusCode.INTERNAL
    assert details.startswith("cannot set up os-brick's iSCSI connector") and "No module named" in details
    assert record(node) is None and node.connector_log == []


def test_a_stage_record_that_cannot_be_written_undoes_the_attach(node, context, monkeypatch):
    mkstemp = stage_record.tempfile.mkstemp

    def full_after_login(*args, **kwargs):
        if "connect" in kinds(node):  # the save before login went through
            raise OSError(errno.ENOSPC, "No space left on device")
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(stage_record.tempfile, "mkstemp", full_after_login)
    code, details = code_of(node.service.NodeStageVolume, stage_request(node), context)
    assert code == grpc.StatusCode.INTERNAL
    assert f"cannot write the stage record of volume {VOL}" in details and "No space left" in details
    assert kinds(node) == ["connect", "disconnect", "sweep locks"], "the login is undone"
    assert record(node) is None


def test_the_staging_directory_is_removed_only_if_the_stage_created_it(node, context):
    node.system.handlers.append(fail(["mount", "-t"]))
    created_here = os.path.join(node.root, "new-staging")
    code_of(node.service.NodeStageVolume, stage_request(node, staging_target_path=created_here), context)
    assert not os.path.exists(created_here)
    code_of(node.service.NodeStageVolume, stage_request(node), context)
    assert os.path.isdir(staging(node)), "the CO's directory stays"


def test_a_timeout_keeps_the_partial_stage_for_kubelet(node, context):
    """DEADLINE_EXCEEDED is not final for kubelet: it retries or unstages, so nothing is undone under a command
    that may still be running."""
    node.system.handlers.append(timeout_for(["mount", "-t"]))
    code, _ = code_of(node.service.NodeStageVolume, stage_request(node), context)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "disconnect" not in kinds(node) and record(node) is not None
    node.service.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging(node)), context
    )
    assert kinds(node).count("disconnect") == 1 and record(node) is None


def test_a_failed_undo_keeps_the_record_and_says_what_is_left(node, context):
    node.system.handlers.append(fail(["mkfs.ext4"]))
    original = node.volumes.protocols["iscsi"].connector_factory

    def failing(multipath):
        connector = original(multipath)
        connector.disconnect_error = RuntimeError("logout timed out")
        return connector

    node.volumes.protocols["iscsi"].connector_factory = failing
    code, details = code_of(node.service.NodeStageVolume, stage_request(node), context)
    assert code == grpc.StatusCode.INTERNAL
    assert "boom" in details and "logout timed out" in details and "NodeUnstageVolume" in details
    assert record(node) is not None, "the record is all that knows about the session now"


def test_a_leftover_record_with_other_parameters_is_cleaned_up_not_already_exists(node, context):
    """What a crash (or a Berth before this fix) left: a record for xfs, the device still attached, nothing
    mounted, nothing published. Each later stage used to answer ALREADY_EXISTS."""
    leftover = StageRecord(
        volume_id=VOL, protocol="iscsi", staging_path=staging(node), access_type="mount", fs_type="xfs",
        connection_properties={"target_portal": "198.18.0.2:3260", "target_iqn": "iqn.old:v", "target_lun": 0},
        device_path=node.device, wwn=WWN,
    )  # fmt: skip
    RecordStore(os.path.join(node.root, "state")).save(leftover)
    node.service.NodeStageVolume(stage_request(node), context)
    disconnect = next(entry for entry in node.connector_log if entry[0] == "disconnect")
    assert disconnect[1]["target_iqn"] == "iqn.old:v", "the leftover's own session is logged out first"
    assert record(node).fs_type == "ext4" and node.system.table.is_mountpoint(staging(node))


def test_a_failed_restage_never_detaches_a_device_a_target_still_uses(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    node.service.NodePublishVolume(publish_request(node), context)
    node.system.table.mounts = [m for m in node.system.table.mounts if m.mount_point != staging(node)]
    node.system.handlers.append(fail(["mount", "-t"]))
    code, _ = code_of(node.service.NodeStageVolume, stage_request(node), context)
    assert code == grpc.StatusCode.INTERNAL
    assert "disconnect" not in kinds(node), "a pod still has the volume"
    assert record(node) is not None and record(node).targets


def test_a_failed_nfs_mount_leaves_no_record(node, context):
    node.system.handlers.append(fail(["mount", "-t", "nfs"], "mount.nfs: access denied by server"))
    code, details = code_of(node.service.NodeStageVolume, nfs_stage(node), context)
    assert code == grpc.StatusCode.INTERNAL and "access denied" in details
    assert record(node, NFS_VOL) is None
    node.system.handlers.clear()
    node.service.NodeStageVolume(nfs_stage(node), context)
    assert record(node, NFS_VOL) is not None


# --- growing a filesystem smaller than its device (a clone or restore larger than its source) ---


@pytest.mark.parametrize("fs, grow", [("ext4", "resize2fs"), ("xfs", "xfs_growfs")])
def test_stage_grows_a_filesystem_smaller_than_its_device(node, context, fs, grow):
    node.system.fs_types[node.device] = fs
    node.system.fs_sizes[node.device] = 1 << 30
    node.service.NodeStageVolume(stage_request(node, volume_capability=capability(fs=fs)), context)
    assert len(node.system.commands(grow)) == 1
    assert node.system.fs_sizes[node.device] == 10 << 30


def test_stage_leaves_a_full_size_or_read_only_filesystem_alone(node, context):
    node.service.NodeStageVolume(stage_request(node), context)  # freshly made: spans the device
    assert node.system.commands("resize2fs") == []
    node.make_service()
    ro = capability(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY)
    node.system.fs_sizes[node.device] = 1 << 30
    node.service.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging(node)), context
    )
    node.service.NodeStageVolume(stage_request(node, volume_capability=ro), context)
    assert node.system.commands("resize2fs") == [], "a read-only staging is never written"


# --- os-brick lock files ---


def test_unstage_sweeps_os_brick_portal_locks(node, context):
    node.service.NodeStageVolume(stage_request(node, block=True), context)
    node.service.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging(node)), context
    )
    assert kinds(node)[-2:] == ["disconnect", "sweep locks"]


def test_sweep_removes_only_the_per_portal_locks(tmp_path):
    names = [
        "os-brick-connect_to_iscsi_portal-198.18.0.1:3260-iqn.2026-11.io.berth:vol-a",
        "os-brick-connect_to_iscsi_portal-198.18.1.1:3260-iqn.2026-11.io.berth:vol-a",
        "os-brick-connect_volume",
        "os-brick-extend_volume",
    ]
    for name in names:
        (tmp_path / name).touch()
    assert sweep_portal_locks(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == ["os-brick-connect_volume", "os-brick-extend_volume"]


def test_the_real_sweeper_takes_os_brick_connect_lock(tmp_path):
    pytest.importorskip("os_brick")
    from csi_driver.node.iscsi import brick_lock_sweeper

    portal_lock = tmp_path / "os-brick-connect_to_iscsi_portal-198.18.0.1:3260-iqn.x:v"
    portal_lock.touch()
    brick_lock_sweeper(str(tmp_path))()
    assert not portal_lock.exists() and (tmp_path / "os-brick-connect_volume").exists()


def test_a_record_of_another_lun_under_the_same_volume_id_is_never_taken_for_this_one(node, context):
    """The volume was deleted and made again under the same ID while the node kept its old staging: the old
    record and mount name another WWN, so they are not "already staged" (that answered OK over a dead LUN)."""
    node.service.NodeStageVolume(stage_request(node), context)
    other = stage_request(node, volume_context={"protocol": "iscsi", "wwn": "6001405" + "1" * 25})
    code, details = code_of(node.service.NodeStageVolume, other, context)
    assert code == grpc.StatusCode.ALREADY_EXISTS and "wwn=" in details
