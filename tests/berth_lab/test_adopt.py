"""`berth adopt` on the real stack (docs/adoption.md): an LV an admin made and filled by hand becomes a Berth
volume whose data a node reads through Berth, block over iSCSI and a filesystem over NFS; an open LV and a Berth
volume are refused."""

from __future__ import annotations

import shlex

import pytest
import yaml

from sanity.runner import PYTHON
from tests.berth_lab.conftest import Berth, block, mount, target_path
from tests.berth_lab.test_iscsi_volumes import staged_device

pytestmark = pytest.mark.lab

VG = "berth"


def adopt(lab, backend: str, lv: str, name: str, *extra: str):
    argv = [PYTHON, "-m", "csi_driver", "adopt", "--config", "/etc/berth/config.yaml", "--backend", backend,
            "--lv", lv, "--name", name, *extra]  # fmt: skip
    return lab.run("node1", shlex.join(argv), check=False, timeout=300)


def adopted_volume(result) -> dict:
    """The CSI volume the printed PV names, as the CO would pass it on."""
    assert result.rc == 0, result.stderr
    pv = yaml.safe_load(result.stdout)
    assert pv["kind"] == "PersistentVolume" and pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    return {"volume_id": pv["spec"]["csi"]["volumeHandle"], "volume_context": pv["spec"]["csi"]["volumeAttributes"]}


def test_a_block_lv_made_by_hand_is_read_through_berth(lab, berth: Berth):
    lab.run("storage", f"lvcreate -q --type thin -V 64M --thinpool pool -n admin-disk {VG} && "
                       f"head -c 1048576 /dev/urandom > /tmp/admin-disk.bin && "
                       f"dd if=/tmp/admin-disk.bin of=/dev/{VG}/admin-disk bs=1M oflag=direct status=none")  # fmt: skip
    expected = lab.run("storage", "md5sum < /tmp/admin-disk.bin").stdout.split()[0]
    held = "sleep 600 < /dev/berth/admin-disk > /dev/null 2>&1 & echo $!"
    holder = lab.run("storage", held).stdout.strip()
    refused = adopt(lab, "lab-iscsi", "admin-disk", "adopted-block")
    lab.run("storage", f"kill {holder}; sleep 1")
    assert refused.rc == 1 and "in use" in refused.stderr, refused.stderr

    volume = adopted_volume(adopt(lab, "lab-iscsi", "admin-disk", "adopted-block"))
    cap = block()
    try:
        context = berth.publish(volume, "node1", cap).body["publish_context"]
        assert berth.stage(volume, "node1", cap, context).ok
        device = staged_device(lab, volume)
        read = lab.run("node1", f"dd if={device} bs=1M count=1 iflag=direct status=none | md5sum").stdout.split()[0]
        assert read == expected, "the node reads other data than the admin wrote"
        again = adopt(lab, "lab-iscsi", "admin-disk", "adopted-block")
        assert adopted_volume(again) == volume, "a re-run prints the same PV"
        other = adopt(lab, "lab-iscsi", volume["volume_id"].split("/")[1], "another-name")
        assert other.rc == 1 and "already managed by Berth" in other.stderr, other.stderr
    finally:
        berth.unstage(volume, "node1")
        berth.unpublish(volume, "node1")
        berth.delete(volume)


def test_an_nfs_filesystem_made_by_hand_is_mounted_through_berth(lab, berth: Berth):
    lab.run("storage", f"lvcreate -q --type thin -V 512M --thinpool pool -n admin-fs {VG} && "
                       f"mkfs.xfs -q /dev/{VG}/admin-fs && mkdir -p /mnt/admin && mount /dev/{VG}/admin-fs /mnt/admin "
                       "&& echo kept > /mnt/admin/disk.img && umount /mnt/admin", timeout=300)  # fmt: skip
    volume = adopted_volume(adopt(lab, "lab-nfs", "admin-fs", "adopted-fs", "--parameter",
                                  "nfsExportOptions=rw,sync,no_subtree_check,no_root_squash"))  # fmt: skip
    rwx = mount("MULTI_NODE_MULTI_WRITER")
    try:
        berth.attach(volume, "node1", rwx)
        assert lab.run("node1", f"cat {target_path(volume)}/disk.img").stdout.strip() == "kept"
    finally:
        assert not berth.detach(volume, "node1")
        berth.delete(volume)
    gone = lab.run("storage", f"lvs --noheadings -o lv_name {VG}").stdout.split()
    assert "admin-fs" not in gone and volume["volume_id"].split("/")[1] not in gone
