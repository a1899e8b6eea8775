"""Live-migration hand-over through Berth: one RWX volume, node1 hands over to node2, no acknowledged write lost.

The sequence is KubeVirt's: the target pod's volume is published while the source VM still writes; the source
stops; the target reads everything and continues; only then is the source torn down, which must not disturb the
target. The writer (blockwriter.py) writes like QEMU with cache=none: O_DIRECT, fsync, then acknowledge.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest

from lab import config as lab_config
from lab.topology import Lab
from tests.berth_lab.conftest import Berth, MiB, block, staging_path, target_path

pytestmark = [pytest.mark.lab, pytest.mark.handover]

WRITER = f"python3 {lab_config.GUEST_SRC}/tests/handover/blockwriter.py"
RWX = "MULTI_NODE_MULTI_WRITER"
PACE = 0.01  # seconds between writes: a steady guest, not a benchmark; keeps the block count in range


def rwx_file() -> dict:
    return {"mount": {}, "access_mode": {"mode": RWX}}


@dataclass
class Attached:
    """The volume staged and published on one node, as a VM pod would have it."""

    node: str
    path: str  # the block device file, or the disk.img on the published NFS directory


def attach(berth: Berth, volume: dict, node: str, cap: dict) -> Attached:
    berth.attach(volume, node, cap)
    target = target_path(volume)
    return Attached(node, target if "block" in cap else f"{target}/disk.img")


class Writer:
    """blockwriter.py running in the background on a node; its stdout is the acknowledgement log."""

    def __init__(self, lab: Lab, attached: Attached, first: int, tag: str) -> None:
        self.lab, self.node, self.tag = lab, attached.node, tag
        self.files = f"/tmp/handover-{tag}"
        lab.run(self.node, f"rm -f {self.files}.*")
        command = (
            f"{WRITER} write {attached.path} --first {first} --interval {PACE} --tag {tag} "
            f"--stop-file {self.files}.stop > {self.files}.acks 2> {self.files}.err; echo $? > {self.files}.rc"
        )
        lab.run(self.node, f"setsid nohup sh -c '{command}' < /dev/null > /dev/null 2>&1 &")

    def acks(self) -> list[tuple[int, float]]:
        # The writer's shell creates the file: under load, the first look can come before it.
        text = self.lab.run(self.node, f"cat {self.files}.acks 2>/dev/null; true").stdout
        return [(int(seq), float(at)) for seq, at in (line.split() for line in text.splitlines() if line)]

    def wait_for_acks(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acks()) < count:
            assert self.running(), f"writer {self.tag} died: {self.error()}"
            assert time.monotonic() < deadline, f"writer {self.tag} acknowledged fewer than {count} writes"
            time.sleep(1)

    def running(self) -> bool:
        return self.lab.run(self.node, f"test -e {self.files}.rc", check=False).rc != 0

    def error(self) -> str:
        return self.lab.run(self.node, f"cat {self.files}.err {self.files}.rc 2>/dev/null; true").stdout

    def stop(self) -> list[tuple[int, float]]:
        """Stop and wait for the exit; the writer must have ended cleanly (no I/O error)."""
        self.lab.run(self.node, f"touch {self.files}.stop")
        deadline = time.monotonic() + 60
        while self.running():
            assert time.monotonic() < deadline, f"writer {self.tag} did not stop"
            time.sleep(0.5)
        rc = self.lab.run(self.node, f"cat {self.files}.rc").stdout.strip()
        assert rc == "0", f"writer {self.tag} failed: {self.error()}"
        return self.acks()


def verify(lab: Lab, attached: Attached, last: int, first: int = 0) -> dict:
    result = lab.run(attached.node, f"{WRITER} verify {attached.path} --first {first} --last {last}", check=False)
    return json.loads(result.stdout.strip().splitlines()[-1])


def hand_over(lab: Lab, berth: Berth, volume: dict, cap: dict, prepare=None) -> dict:
    """node1 writes, node2 attaches meanwhile, node1 stops, node2 verifies and continues through node1's
    teardown. Returns the report; asserts that every acknowledged write is read back intact."""
    source = attach(berth, volume, "node1", cap)
    target = None
    try:
        if prepare:
            prepare(source)
        writer_a = Writer(lab, source, first=0, tag="a")
        writer_a.wait_for_acks(50)
        attach_started = time.monotonic()
        target = attach(berth, volume, "node2", cap)
        attach_seconds = time.monotonic() - attach_started
        during_attach = len(writer_a.acks())
        writer_a.wait_for_acks(during_attach + 20)  # the source keeps writing with the target attached

        stopped = time.monotonic()
        acks_a = writer_a.stop()
        last_a = acks_a[-1][0]
        before = verify(lab, target, last_a)
        assert before["bad"] == [] and before["verified"] == len(acks_a), before
        writer_b = Writer(lab, target, first=last_a + 1, tag="b")
        writer_b.wait_for_acks(1)
        gap = time.monotonic() - stopped

        teardown_started = time.monotonic()
        assert berth.detach(volume, "node1") == []
        teardown_seconds = time.monotonic() - teardown_started
        acks_at_teardown_end = len(writer_b.acks())
        writer_b.wait_for_acks(acks_at_teardown_end + 20)  # still writing after the source is gone
        acks_b = writer_b.stop()
        assert [seq for seq, _ in acks_b] == list(range(last_a + 1, last_a + 1 + len(acks_b)))
        final = verify(lab, target, acks_b[-1][0])
        acknowledged = len(acks_a) + len(acks_b)
        report = {
            "writes_acknowledged": acknowledged,
            "writes_verified": final["verified"],
            "source_writes": len(acks_a),
            "target_writes": len(acks_b),
            "target_attach_seconds": round(attach_seconds, 1),
            "handover_gap_seconds": round(gap, 1),
            "source_teardown_seconds": round(teardown_seconds, 1),
        }
        print(f"\nhand-over {volume['volume_id']}: {json.dumps(report)}")
        assert final["bad"] == [], final
        assert final["verified"] == acknowledged, report
        return report
    finally:
        for attached in (source, target):
            if attached is not None:
                lab.run(attached.node, "touch /tmp/handover-a.stop /tmp/handover-b.stop", check=False)
                berth.detach(volume, attached.node)


def test_raw_block_rwx_iscsi_handover(lab, berth):
    cap = block(RWX)
    volume = berth.create("handover-block", 128 * MiB, cap)
    try:
        hand_over(lab, berth, volume, cap)
    finally:
        berth.delete(volume)


def test_nfs_disk_image_handover(lab, berth):
    cap = rwx_file()
    # The export options docs/nfs.md gives KubeVirt classes: every client uid, root included, acts as qemu's 107.
    # (With the default root_squash, root's chown to 107 below is refused.)
    options = "sync,no_subtree_check,all_squash,anonuid=107,anongid=107"
    volume = berth.create("handover-nfs", 320 * MiB, cap, backend="lab-nfs", nfsExportOptions=options)

    def make_disk_image(source: Attached) -> None:
        # KubeVirt's Filesystem layout: the VM disk is disk.img at the volume root, owned by qemu (uid 107).
        lab.run(source.node, f"truncate -s 96M {source.path} && chown 107:107 {source.path}")

    try:
        hand_over(lab, berth, volume, cap, prepare=make_disk_image)
    finally:
        berth.delete(volume)


@pytest.mark.parametrize(
    ("kind", "size", "grown_size"), [("block", 128 * MiB, 256 * MiB), ("nfs", 320 * MiB, 512 * MiB)]
)
def test_expansion_while_published_on_both_nodes(lab, berth, kind, size, grown_size):
    cap = block(RWX) if kind == "block" else rwx_file()
    backend = "lab-iscsi" if kind == "block" else "lab-nfs"  # NFS volumes hold xfs: 300 MiB at least
    volume = berth.create(f"handover-grow-{kind}", size, cap, backend=backend)
    attached: list[Attached] = []
    try:
        attached = [attach(berth, volume, node, cap) for node in ("node1", "node2")]
        grown = berth.must("node1", "Controller.ControllerExpandVolume",
                           {"volume_id": volume["volume_id"], "capacity_range": {"required_bytes": str(grown_size)},
                            "volume_capability": cap})  # fmt: skip
        assert int(grown["capacity_bytes"]) == grown_size
        for a in attached:
            published = target_path(volume)
            berth.must(a.node, "Node.NodeExpandVolume", {
                "volume_id": volume["volume_id"], "volume_path": published, "staging_target_path":
                staging_path(volume), "capacity_range": {"required_bytes": str(grown_size)}, "volume_capability": cap,
            })  # fmt: skip
            if kind == "block":
                seen = int(lab.run(a.node, f"blockdev --getsize64 {published}").stdout)
            else:  # the NFS client sees the server filesystem's new size (xfs metadata takes a little)
                blocks, block_size = lab.run(a.node, f"stat -f -c '%b %S' {published}").stdout.split()
                seen = int(blocks) * int(block_size)
            assert seen > size, f"{a.node} sees {seen} bytes after growing from {size} to {grown_size}"
    finally:
        failed = [failure for a in attached for failure in berth.detach(volume, a.node)]
        assert not failed, f"detach failed: {failed}"
        berth.delete(volume)
