"""Group snapshots on the real stack (docs/group-snapshots.md): the dependent-write test, on two iSCSI block volumes
and on two NFS volumes.

The writer on node1 writes record n to A with O_DIRECT, waits for it to complete, then record n to B, and so on;
every record overwrites the first 4 KiB of its volume (of a file on it, for NFS). Any instant therefore finds A at n
and B at n or n - 1. A group snapshot must show exactly that; two snapshots taken one after the other (A first)
find B ahead of A. Berth reaches the storage host through berth-host here (restricted SSH).
"""

from __future__ import annotations

import time

import pytest

from sanity.runner import start_berth, stop_berth
from tests.berth_lab.conftest import Berth, MiB, block, mount, queue_longer, target_path

pytestmark = pytest.mark.lab

WRITER_UNIT = "berth-dependent-writer"
ROUNDS = 1  # a round costs about a minute under TCG; every round of the documented runs agreed
NFS_RECORD_FILE = "records.bin"
# The writer: A then B, each write waited for; `records` is the last n written to both.
WRITER = """
import mmap, os, sys
a, b = (os.open(path, os.O_WRONLY | os.O_DIRECT) for path in sys.argv[1:3])
buffer = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
n = 0
while True:
    n += 1
    buffer.seek(0)
    buffer.write(f"{n}\\n".encode().ljust(4096, b"\\0"))
    os.pwrite(a, buffer, 0)
    os.pwrite(b, buffer, 0)
    if n % 20 == 0:
        open("/tmp/records", "w").write(str(n))
"""
# The first line of the record at the start of a block device or file, "" when nothing was written.
READ_RECORD = "dd if={} bs=4096 count=1 iflag=direct status=none | head -c 16 | tr -d '\\0' | head -n1"


@pytest.fixture(scope="module")
def berth(lab):
    """Berth on node1 (controller and node), reaching the storage host in restricted mode (berth-host)."""
    start_berth(lab, "node1", mode="all", restricted=True)
    lab.run("node1", "mkdir -p /var/lib/berth-test/staging")
    driver = Berth(lab)
    driver.node_ids = {"node1": driver.must("node1", "Node.NodeGetInfo")["node_id"]}
    yield driver
    try:
        driver.finish_deletes()
    finally:
        stop_berth(lab, "node1")


def group_snapshot(berth: Berth, name: str, *volumes: dict) -> dict:
    request = {"name": name, "source_volume_ids": [v["volume_id"] for v in volumes]}
    return berth.must("node1", "GroupController.CreateVolumeGroupSnapshot", request)["group_snapshot"]


def delete_group(berth: Berth, group: dict) -> None:
    request = {"group_snapshot_id": group["group_snapshot_id"],
               "snapshot_ids": [s["snapshot_id"] for s in group["snapshots"]]}  # fmt: skip
    berth.must("node1", "GroupController.DeleteVolumeGroupSnapshot", request)


def record(lab, snapshot_id: str, nfs: bool) -> int:
    """The record in a snapshot, read from its LV on the storage host: the device itself (iSCSI), or the record
    file in its xfs, mounted read-only as a crash left it (NFS)."""
    device = f"/dev/berth/{snapshot_id.split('/')[1]}"
    if not nfs:
        return int(lab.run("storage", READ_RECORD.format(device)).stdout.strip() or 0)
    lab.run("storage", f"lvchange -ay -Ky {device} && mkdir -p /mnt/dw && "
                       f"mount -o ro,norecovery,nouuid {device} /mnt/dw")  # fmt: skip
    try:
        return int(lab.run("storage", READ_RECORD.format(f"/mnt/dw/{NFS_RECORD_FILE}")).stdout.strip() or 0)
    finally:
        lab.run("storage", f"umount /mnt/dw; lvchange -an {device}", check=False)


def records_written(lab) -> int:
    return int(lab.run("node1", "cat /tmp/records 2>/dev/null || echo 0").stdout.strip() or 0)


def wait_for_records(lab, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while records_written(lab) < count:
        assert time.monotonic() < deadline, f"the writer wrote {records_written(lab)} records in {timeout:g} s"
        time.sleep(0.5)


@pytest.mark.parametrize("backend", ["lab-iscsi", "lab-nfs"])
def test_dependent_writes_a_group_snapshot_is_one_instant_one_by_one_is_not(lab, berth, backend):
    nfs = backend == "lab-nfs"
    cap, size = (mount(), 320 * MiB) if nfs else (block(), 16 * MiB)  # xfs needs 300 MiB
    a, b = (berth.create(f"dw-{backend}-{x}", size, cap, backend) for x in "ab")
    paths = [target_path(v) + (f"/{NFS_RECORD_FILE}" if nfs else "") for v in (a, b)]
    groups: list[dict] = []
    singles: list[str] = []
    queue_longer(lab, "node1", True)  # the documented node setting: a fence must not fail I/O (group-snapshots.md)
    try:
        for volume, path in zip((a, b), paths, strict=True):
            berth.attach(volume, "node1", cap)
            if nfs:  # written once in full: the records then overwrite allocated blocks in place
                lab.run("node1", f"dd if=/dev/zero of={path} bs=4096 count=1 oflag=direct,sync status=none")
        lab.run("node1", "rm -f /tmp/records && cat > /tmp/dw-writer.py", input=WRITER)
        lab.run("node1", f"systemd-run --unit={WRITER_UNIT} --quiet python3 /tmp/dw-writer.py {paths[0]} {paths[1]}")
        wait_for_records(lab, 20)
        with_instant, timings = [], []
        for n in range(ROUNDS):
            started = time.monotonic()
            group = group_snapshot(berth, f"dw-group-{n}", a, b)
            timings.append(time.monotonic() - started)
            groups.append(group)
            by_source = {s["source_volume_id"]: s["snapshot_id"] for s in group["snapshots"]}
            with_instant.append(tuple(record(lab, by_source[v["volume_id"]], nfs) for v in (a, b)))
            wait_for_records(lab, records_written(lab) + 20)  # the writer goes on after the fence
        without_instant = []
        for n in range(ROUNDS):
            first, second = berth.snapshot(f"dw-a-{n}", a), berth.snapshot(f"dw-b-{n}", b)
            singles += [first, second]
            without_instant.append((record(lab, first, nfs), record(lab, second, nfs)))
        active = lab.run("node1", f"systemctl is-active {WRITER_UNIT}", check=False).stdout.strip()
        print(f"\n{backend} dependent writes (A, B): group snapshots {with_instant} (each "
              f"{[f'{t:.1f}' for t in timings]} s), one by one {without_instant}; the writer wrote "
              f"{records_written(lab)} records and is {active}")  # fmt: skip
        assert active == "active", "the writer got an I/O error"
        for a_record, b_record in with_instant:
            assert a_record > 0 and a_record - b_record in (0, 1), f"not one instant: A {a_record}, B {b_record}"
        ahead = [(x, y) for x, y in without_instant if y > x]
        assert ahead, f"one by one, B was never ahead of A: {without_instant} (the writer is too slow to show it)"
    finally:
        lab.run("node1", f"systemctl stop {WRITER_UNIT}; systemctl reset-failed {WRITER_UNIT}; true", check=False)
        queue_longer(lab, "node1", False)
        for group in groups:
            delete_group(berth, group)
        for snapshot_id in singles:
            berth.delete_snapshot(snapshot_id)
        for volume in (a, b):
            assert berth.detach(volume, "node1") == []
            berth.delete(volume)
    fences = lab.run("storage", "ls /run/berth/fences; iptables -S | grep berth-fence; true").stdout.strip()
    assert fences == "", f"fences left on the storage host: {fences}"
