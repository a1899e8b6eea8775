import errno
import os

import pytest

from csi_driver.csi import csi_pb2
from csi_driver.node import nfs
from csi_driver.node.commands import LocalRunner
from csi_driver.node.errors import CommandFailed, CommandTimeout
from csi_driver.node.identity import in_networks, local_node_id, read_initiator_iqn
from csi_driver.node.nfs import mount_options, nfs_source

from .conftest import Aborted

NFS_VOL = "lab-nfs/vol-0123456789abcdef0123"


def nfs_stage(node, **overrides):
    cap = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=["noatime"]),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=5),
    )
    fields = dict(
        volume_id=NFS_VOL,
        staging_target_path=os.path.join(node.root, "staging"),
        volume_capability=cap,
        volume_context={"protocol": "nfs", "nfsServer": "198.18.0.2", "nfsExport": "/srv/berth/vol"},
    )
    fields.update(overrides)
    return csi_pb2.NodeStageVolumeRequest(**fields)


def test_nfs_options_and_source():
    assert mount_options(["noatime"], False) == ["vers=4.2", "noatime", "rw"]
    assert mount_options(["nfsvers=3", "ro"], True) == ["nfsvers=3", "ro"]
    assert nfs_source("fd00::2", "/srv/x") == "[fd00::2]:/srv/x"


def test_nfs_stage_mounts_once(node, context):
    for _ in range(2):
        node.service.NodeStageVolume(nfs_stage(node), context)
    mounts = node.system.commands("mount")
    assert mounts == [
        ["mount", "-t", "nfs", "-o", "vers=4.2,noatime,rw", "--", "198.18.0.2:/srv/berth/vol",
         os.path.join(node.root, "staging")]
    ]  # fmt: skip


def test_nfs_stale_handle_is_remounted(node, context, monkeypatch):
    node.service.NodeStageVolume(nfs_stage(node), context)
    staging = os.path.join(node.root, "staging")
    real_stat = os.stat
    stale = {"left": 2}  # is_staged and stage each see ESTALE once; after the remount it is fine

    def stale_stat(path, *args, **kwargs):
        if path == staging and stale["left"]:
            stale["left"] -= 1
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(nfs.os, "stat", stale_stat)
    node.service.NodeStageVolume(nfs_stage(node), context)
    assert ["umount", "-l", "--", staging] in node.system.calls
    assert len(node.system.commands("mount")) == 2


def test_nfs_block_access_is_invalid(node, context):
    cap = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=csi_pb2.VolumeCapability.AccessMode(mode=5)
    )
    with pytest.raises(Aborted, match="INVALID_ARGUMENT: an NFS volume"):
        node.service.NodeStageVolume(nfs_stage(node, volume_capability=cap), context)


def test_bounded_gives_up_on_a_hung_call():
    import threading

    never = threading.Event()
    with pytest.raises(OSError, match="not responding"):
        nfs.bounded(never.wait, timeout=0.05)


def test_initiator_name_and_node_id(tmp_path):
    path = tmp_path / "initiatorname.iscsi"
    path.write_text("## generated\nInitiatorName=iqn.2026-11.io.berth.lab:node1\n")
    assert read_initiator_iqn(str(path)) == "iqn.2026-11.io.berth.lab:node1"
    assert local_node_id(["198.18.0.11"], "host", str(path)) == "iqn.2026-11.io.berth.lab:node1|198.18.0.11"
    assert local_node_id(["198.18.0.11"], "host", str(tmp_path / "missing")) == "host"
    assert local_node_id([], "host", str(path)) == "host"


def test_storage_networks_filter_node_addresses():
    addresses = ["10.0.2.15", "198.18.0.11", "198.18.1.11", "fd00::11"]
    assert in_networks(addresses, []) == addresses
    assert in_networks(addresses, ["198.18.0.0/24", "198.18.1.0/24"]) == ["198.18.0.11", "198.18.1.11"]
    assert in_networks(addresses, ["fd00::/64"]) == ["fd00::11"]


def test_local_runner_records_failure_and_timeout():
    runner = LocalRunner()
    assert runner.run(["echo", "hi"]).stdout == "hi\n"
    with pytest.raises(CommandFailed, match="exited 1"):
        runner.run(["false"])
    with pytest.raises(CommandTimeout):
        runner.run(["sleep", "5"], timeout=0.2)


def test_os_brick_runs_in_process_as_root(tmp_path):
    pytest.importorskip("os_brick")
    from csi_driver.node.iscsi import brick_connector_factory

    connector = brick_connector_factory(str(tmp_path / "locks"))(True)
    import os_brick.privileged
    from oslo_config import cfg

    assert type(connector).__name__ == "ISCSIConnector"
    assert connector._root_helper is None and connector.use_multipath
    assert os_brick.privileged.default.client_mode is False
    assert cfg.CONF.os_brick.lock_path == str(tmp_path / "locks")
    import eventlet.patcher

    assert not eventlet.patcher.is_monkey_patched("thread")
