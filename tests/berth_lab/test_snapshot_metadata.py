"""Changed-block tracking on the real stack (docs/snapshot-metadata.md): the backup round trip a backup application
makes through the SnapshotMetadata service, with Berth reaching the storage host through berth-host (restricted SSH
access), so the new host program passes the forced command too.

Blocks are written, overwritten and discarded through iSCSI on node1 at the pool's chunk granularity; then
GetMetadataAllocated must list exactly the chunks written before snapshot 1, GetMetadataDelta exactly the chunks
changed between the snapshots, and a copy of snapshot 1 with only the delta ranges copied over it from snapshot 2
must equal snapshot 2 byte for byte (both read on the storage host from their LVs)."""

from __future__ import annotations

import json
import shlex

import pytest

from sanity.runner import start_berth
from tests.berth_lab.conftest import Berth, MiB, block
from tests.berth_lab.test_iscsi_volumes import staged_device

pytestmark = pytest.mark.lab

SIZE = 128 * MiB
# Chunk indexes. Before snapshot 1: whole chunks, and 4 KiB inside chunk 30 (a partial write maps the whole chunk).
WRITTEN_FIRST = {0, 1, 2, 10, 11, 20, 30, 40}
# Between the snapshots: chunk 1 overwritten, 4 KiB of chunk 11 overwritten, 50, 51 and 60 written for the first
# time, 20 and 40 discarded (whole chunks: the pool unmaps them).
OVERWRITTEN, PARTLY_OVERWRITTEN, NEW, DISCARDED = {1}, {11}, {50, 51, 60}, {20, 40}
CHANGED = OVERWRITTEN | PARTLY_OVERWRITTEN | NEW | DISCARDED
ALLOCATED_SECOND = (WRITTEN_FIRST - DISCARDED) | NEW


@pytest.fixture(scope="module")
def restricted(lab, berth: Berth) -> Berth:
    """node1's Berth, now through a key held to berth-host (this tree's digests)."""
    start_berth(lab, "node1", mode="all", restricted=True)
    return berth


def chunk_size(lab) -> int:
    return int(lab.run("storage", "lvs --noheadings --units b --nosuffix -o chunk_size berth/pool").stdout.strip())


def stream(berth: Berth, rpc: str, request: dict) -> list[dict]:
    return berth.must("node1", f"SnapshotMetadata.{rpc}", request)["responses"]


def ranges_of(responses: list[dict], size: int = SIZE) -> list[list[int]]:
    """[offset, size] of every tuple, after checking what every message must say (its style, the volume's size)."""
    ranges = []
    for response in responses:
        assert response["block_metadata_type"] == "VARIABLE_LENGTH" and int(response["volume_capacity_bytes"]) == size
        for entry in response.get("block_metadata", []):
            ranges.append([int(entry.get("byte_offset", 0)), int(entry["size_bytes"])])  # JSON leaves zeros out
    return ranges


def chunks_of(responses: list[dict], chunk: int) -> set[int]:
    """The chunks the ranges cover; every range must be whole chunks (the volume is a whole number of them)."""
    found: set[int] = set()
    for offset, size in ranges_of(responses):
        assert offset % chunk == 0 and size % chunk == 0 and size > 0, (offset, size)
        found |= set(range(offset // chunk, (offset + size) // chunk))
    return found


def write_chunks(lab, device: str, chunk: int, chunks: set[int], seed: str) -> None:
    """Whole chunks of fresh random data, with O_DIRECT (nothing waits in the node's page cache)."""
    lab.run("node1", f"head -c {chunk} /dev/urandom > /tmp/cbt-{seed}")
    for index in sorted(chunks):
        lab.run("node1", f"dd if=/tmp/cbt-{seed} of={device} bs={chunk} seek={index} oflag=direct status=none")


def write_4k(lab, device: str, chunk: int, index: int) -> None:
    lab.run("node1", f"dd if=/dev/urandom of={device} bs=4096 count=1 seek={(index * chunk + 8192) // 4096} "
                     "oflag=direct status=none")  # fmt: skip


# Run on the storage host: copies snapshot 1, applies the delta ranges read from snapshot 2, compares with snapshot 2.
ROUND_TRIP = """
import json, sys
base, target, ranges = json.load(sys.stdin)
with open(base, "rb") as src, open("/tmp/cbt-restore", "wb") as out:
    while block := src.read(1 << 20):
        out.write(block)

def same_as_target():
    with open("/tmp/cbt-restore", "rb") as restored, open(target, "rb") as wanted:
        while True:
            a, b = restored.read(1 << 20), wanted.read(1 << 20)
            if a != b:
                return False
            if not a:
                return True

before = same_as_target()
with open(target, "rb") as src, open("/tmp/cbt-restore", "r+b") as out:
    for offset, size in ranges:
        src.seek(offset)
        out.seek(offset)
        out.write(src.read(size))
print(json.dumps({"equal_before": before, "equal_after": same_as_target()}))
"""


def test_backup_round_trip_with_changed_blocks(lab, restricted: Berth):
    berth = restricted
    chunk = chunk_size(lab)
    assert 61 * chunk <= SIZE and SIZE % chunk == 0, f"the pool's chunk ({chunk} bytes) does not fit this layout"
    cap = block()
    volume = berth.create("cbt", SIZE, cap)
    snapshots: list[str] = []
    try:
        context = berth.publish(volume, "node1", cap).body["publish_context"]
        assert berth.stage(volume, "node1", cap, context).ok
        device = staged_device(lab, volume)
        write_chunks(lab, device, chunk, WRITTEN_FIRST - {30}, "first")
        write_4k(lab, device, chunk, 30)
        snapshots.append(berth.snapshot("cbt-1", volume))

        write_chunks(lab, device, chunk, OVERWRITTEN | NEW, "second")
        write_4k(lab, device, chunk, *PARTLY_OVERWRITTEN)
        for index in sorted(DISCARDED):
            lab.run("node1", f"blkdiscard --offset {index * chunk} --length {chunk} {device}")
        snapshots.append(berth.snapshot("cbt-2", volume))
        first, second = snapshots

        allocated = stream(berth, "GetMetadataAllocated", {"snapshot_id": first})
        assert chunks_of(allocated, chunk) == WRITTEN_FIRST
        allocated = stream(berth, "GetMetadataAllocated", {"snapshot_id": second})
        assert chunks_of(allocated, chunk) == ALLOCATED_SECOND

        delta = stream(berth, "GetMetadataDelta", {"base_snapshot_id": first, "target_snapshot_id": second})
        assert chunks_of(delta, chunk) == CHANGED, "the delta is not exactly the chunks written, overwritten, discarded"

        paged = stream(berth, "GetMetadataDelta", {"base_snapshot_id": first, "target_snapshot_id": second,
                                                   "max_results": 2})  # fmt: skip
        assert all(len(r.get("block_metadata", [])) <= 2 for r in paged) and ranges_of(paged) == ranges_of(delta)
        resumed = stream(berth, "GetMetadataDelta", {"base_snapshot_id": first, "target_snapshot_id": second,
                                                     "starting_offset": str(50 * chunk + 1)})  # fmt: skip
        assert chunks_of(resumed, chunk) == {50, 51, 60}

        lvs = [snapshot.split("/")[1] for snapshot in snapshots]
        for lv in lvs:  # active already (Berth clears the activation skip); harmless if so
            lab.run("storage", f"lvchange --activate y --ignoreactivationskip berth/{lv}")
        job = json.dumps([f"/dev/berth/{lvs[0]}", f"/dev/berth/{lvs[1]}", ranges_of(delta)])
        result = json.loads(lab.run("storage", f"python3 -c {shlex.quote(ROUND_TRIP)}", input=job, timeout=300).stdout)
        assert result == {"equal_before": False, "equal_after": True}, result

        held = lab.run("storage", "dmsetup status berth-pool-tpool").stdout.split()
        assert held[6] == "-", f"a metadata snapshot is still held: {held}"  # <held metadata root>
    finally:
        for snapshot in reversed(snapshots):
            berth.delete_snapshot(snapshot)
        berth.unstage(volume, "node1")
        berth.unpublish(volume, "node1")
        berth.delete(volume)
        lab.run("storage", "rm -f /tmp/cbt-restore", check=False)


def test_errors_on_the_real_stack(restricted: Berth):
    berth = restricted
    missing = {"snapshot_id": "lab-iscsi/snap-" + "0" * 20}
    unknown = berth.call("node1", "SnapshotMetadata.GetMetadataAllocated", missing)
    assert not unknown.ok and unknown.body["code"] == "NOT_FOUND", unknown.body
    volume = berth.create("cbt-errors", 64 * MiB, block())
    try:
        snapshot = berth.snapshot("cbt-errors-1", volume)
        pair = {"base_snapshot_id": snapshot, "target_snapshot_id": snapshot}
        past_the_end = {**pair, "starting_offset": str(64 * MiB + 1)}
        beyond = berth.call("node1", "SnapshotMetadata.GetMetadataDelta", past_the_end)
        assert not beyond.ok and beyond.body["code"] == "OUT_OF_RANGE", beyond.body
        assert ranges_of(stream(berth, "GetMetadataDelta", pair), 64 * MiB) == []
        berth.delete_snapshot(snapshot)
    finally:
        berth.delete(volume)
