"""The storage host rebooted, or cut off, while two nodes write (issue #13, fault suite items 3 and 4).

node1 writes to an RWX iSCSI block volume through multipath, node2 to a disk image on an RWX NFS volume, both with
blockwriter.py (O_DIRECT, fsync, then acknowledge). Then the storage guest loses its power and boots again, or
loses both cables for 30 s. After the reboot nothing but the host's own boot brings the LIO configuration
(rtslib-fb-targetctl.service, as docs/storage-host.md has the admin enable it) and the NFS exports (fstab mounts,
/etc/exports.d) back. Both writers must carry on without an I/O error, and every acknowledged write must read back
intact. docs/faults.md has the node settings this needs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.berth_lab.conftest import Berth, MiB, block, queue_longer
from tests.handover.test_handover import RWX, Attached, Writer, attach, rwx_file, verify

pytestmark = [pytest.mark.lab, pytest.mark.faults]

LINKS_DOWN_SECONDS = 30


def writers_survive(lab, berth: Berth, name: str, disrupt: Callable[[], dict]) -> None:
    """node1 writes to an RWX iSCSI block volume, node2 to a disk image on an RWX NFS volume; `disrupt` breaks the
    storage host meanwhile and returns what it measured. Both writers must go on with no I/O error, and every
    acknowledged write must read back intact."""
    queue_longer(lab, "node1", True)
    block_volume = berth.create(f"{name}-block", 128 * MiB, block(RWX))
    options = "sync,no_subtree_check,all_squash,anonuid=107,anongid=107"  # docs/nfs.md's KubeVirt export options
    nfs_volume = berth.create(f"{name}-nfs", 320 * MiB, rwx_file(), backend="lab-nfs", nfsExportOptions=options)
    attached: list[tuple[dict, Attached]] = []
    writers: list[Writer] = []
    try:
        attached.append((block_volume, attach(berth, block_volume, "node1", block(RWX))))
        attached.append((nfs_volume, attach(berth, nfs_volume, "node2", rwx_file())))
        disk = attached[1][1]
        lab.run(disk.node, f"truncate -s 96M {disk.path} && chown 107:107 {disk.path}")
        writers = [Writer(lab, target, first=0, tag=tag) for (_, target), tag in zip(attached, "ab", strict=True)]
        for writer in writers:
            writer.wait_for_acks(30)

        report = disrupt()
        before = {writer.tag: len(writer.acks()) for writer in writers}
        for writer in writers:
            writer.wait_for_acks(before[writer.tag] + 30, timeout=600)

        for writer, (_, target) in zip(writers, attached, strict=True):
            acks = writer.stop()
            assert [seq for seq, _ in acks] == list(range(len(acks)))
            gaps = [later - earlier for (_, earlier), (_, later) in zip(acks, acks[1:], strict=False)]
            checked = verify(lab, target, acks[-1][0])
            assert checked["bad"] == [] and checked["verified"] == len(acks), checked
            report[writer.node] = {"acknowledged": len(acks), "verified": checked["verified"],
                                   "longest_stall_seconds": round(max(gaps), 1)}  # fmt: skip
        print(f"\n{name} under writers: {json.dumps(report)}")
    finally:
        for writer in writers:
            lab.run(writer.node, f"touch {writer.files}.stop", check=False)
        for volume, target in attached:
            berth.detach(volume, target.node)
        for volume in (block_volume, nfs_volume):
            berth.call("node1", "Controller.DeleteVolume", {"volume_id": volume["volume_id"]})
        queue_longer(lab, "node1", False)


def test_storage_host_reboot_while_two_nodes_write(lab, berth: Berth):
    lab.run("storage", "systemctl enable -q rtslib-fb-targetctl.service")  # as docs/storage-host.md has it
    try:
        writers_survive(lab, berth, "reboot", lambda: {"storage_reboot_seconds": round(lab.reboot("storage"), 1)})
    finally:
        lab.run("storage", "systemctl disable -q rtslib-fb-targetctl.service")


def test_both_paths_down_for_30_seconds_while_two_nodes_write(lab, berth: Berth):
    """Both of the storage host's cables pulled: every iSCSI path fails (multipath queues) and the NFS server is
    unreachable (the hard mount retries); 30 s later both come back."""

    def pull_both_cables() -> dict:
        for link in (0, 1):
            lab.set_link("storage", link, False)
        try:
            time.sleep(LINKS_DOWN_SECONDS)
        finally:
            for link in (0, 1):
                lab.set_link("storage", link, True)
        return {"links_down_seconds": LINKS_DOWN_SECONDS}

    writers_survive(lab, berth, "paths-down", pull_both_cables)
