"""NFS volumes through Berth on the real stack: RWX sharing, export ACLs, thin clone cost, snapshots under
writes, exports surviving an nfsd restart. Volumes come from the `lab-nfs` backend (sanity/berth-lab.yaml)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from tests.berth_lab.conftest import Berth, GiB, MiB, mount, pool_used_bytes, target_path, timed

pytestmark = pytest.mark.lab

NFS = "lab-nfs"
VG = "berth"
RWX = mount("MULTI_NODE_MULTI_WRITER")
RWO = mount()
# Written through the NFS mount for the clone cost test (1 GiB over the `sync` export took ~30 s of a 5 min test).
DATA_BYTES = 512 * MiB  # a copy would grow the pool by this; the clones' own xfs writes by about 130 MiB
WRITER_UNIT = "berth-test-writer"


# --- helpers ---


def lv_of(volume_id: str) -> str:
    """`lab-nfs/<lv>` → `<lv>` (the LV in VG berth; also the last part of the export path)."""
    return volume_id.split("/", 1)[1]


def export_of(volume: dict) -> tuple[str, str]:
    context = volume["volume_context"]
    return context["nfsServer"], context["nfsExport"]


def addresses(berth: Berth, node: str) -> set[str]:
    """A node's data addresses, from its node ID `<iqn>|<addr>,<addr>`."""
    return set(berth.node_ids[node].split("|", 1)[1].split(","))


def write_random(lab, node: str, path: str, size: str = "1M") -> str:
    """Write random data, flush it, close; returns its sha256 (read back after close: close-to-open)."""
    return lab.run(node, f"head -c {size} /dev/urandom > {path} && sync {path} && sha256sum < {path}").stdout.split()[0]


def sha256(lab, node: str, path: str) -> str:
    return lab.run(node, f"sha256sum < {path}", timeout=300).stdout.split()[0]


def assert_data(lab, node: str, path: str, digest: str) -> None:
    assert sha256(lab, node, path) == digest, f"{path} on {node} does not hold the data written"


def hand_mount(lab, node: str, volume: dict) -> tuple[int, str]:
    """Mount the export by hand, bypassing Berth (what a node that was never published could try)."""
    server, export = export_of(volume)
    result = lab.run(
        node,
        f"mkdir -p /mnt/x && timeout 120 mount -t nfs -o vers=4.2 {server}:{export} /mnt/x; rc=$?; "
        "umount /mnt/x 2>/dev/null; exit $rc",
        check=False,
        timeout=180,
    )
    return result.rc, result.stderr.strip()


def exported_to(lab, export: str) -> set[str]:
    """Clients the storage host's kernel export table holds for `export` (/var/lib/nfs/etab)."""
    etab = lab.run("storage", "cat /var/lib/nfs/etab").stdout
    return {parts[1].split("(")[0] for parts in map(str.split, etab.splitlines()) if parts and parts[0] == export}


def host_mounts(lab, mountpoint: str, lv: str) -> bool:
    """Whether the storage host has the LV mounted at mountpoint (device-mapper names differ from LV paths)."""
    test = f'test "$(readlink -f "$(findmnt -no SOURCE --mountpoint {mountpoint})")" = "$(readlink -f /dev/{VG}/{lv})"'
    return lab.run("storage", test, check=False).rc == 0


def xfs_uuid(lab, lv: str) -> str:
    return lab.run("storage", f"blkid -p -s UUID -o value /dev/{VG}/{lv}").stdout.strip()


def start_writer(lab, node: str, directory: str) -> str:
    """Write 2 MiB files (f.1, f.2, ...) with fsync in a loop, in the background; returns the files' sha256."""
    write = f"dd if=/tmp/writer-chunk of={directory}/f.$i bs=1M conv=fsync status=none"
    script = f"i=0; while :; do i=$((i+1)); {write}; done\n"
    # A script file: systemd would expand the loop's $i itself if it were on the systemd-run command line.
    lab.run(node, "head -c 2M /dev/urandom > /tmp/writer-chunk && cat > /tmp/writer.sh", input=script)
    lab.run(node, f"systemd-run --unit={WRITER_UNIT} --quiet sh /tmp/writer.sh")
    return sha256(lab, node, "/tmp/writer-chunk")


def stop_writer(lab, node: str) -> None:
    lab.run(node, f"systemctl stop {WRITER_UNIT} 2>/dev/null; systemctl reset-failed {WRITER_UNIT} 2>/dev/null; true",
            check=False)  # fmt: skip


def files_written(lab, node: str, directory: str) -> int:
    return int(lab.run(node, f"ls {directory} | grep -c '^f\\.' ; true").stdout.strip() or 0)


def wait_for_files(lab, node: str, directory: str, count: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while (n := files_written(lab, node, directory)) < count:
        assert time.monotonic() < deadline, f"the writer wrote only {n} files in {timeout:g} s"
        time.sleep(1)
    return n


def clean_up(berth: Berth, volumes: list[dict], snapshots: Sequence[str] = (), nodes: Sequence[str] = ()) -> None:
    """Detach the first volume from `nodes` (the only one attached), delete the volumes (last made first),
    then the snapshots. Deletes must succeed: a leftover would spoil the next test."""
    failed = [failure for node in nodes for failure in berth.detach(volumes[0], node)]
    assert not failed, f"detach failed: {failed}"
    for volume in reversed(volumes):
        berth.delete(volume)
    for snapshot_id in snapshots:
        assert berth.delete_snapshot(snapshot_id).ok, f"DeleteSnapshot {snapshot_id} failed"


# --- tests ---


def test_two_nodes_share_an_rwx_volume(lab, berth):
    volume = berth.create("nfs-shared", 64 * MiB, RWX, backend=NFS)
    try:
        for node in ("node1", "node2"):
            berth.attach(volume, node, RWX)
        target = target_path(volume)
        server, export = export_of(volume)
        for node in ("node1", "node2"):
            found = lab.run(node, f"findmnt -no FSTYPE,SOURCE,OPTIONS {target}").stdout.split()
            assert found[:2] == ["nfs4", f"{server}:{export}"] and "vers=4.2" in found[2], found
        # Each node writes and closes, the other opens afterwards: close-to-open consistency.
        for writer, reader in (("node1", "node2"), ("node2", "node1")):
            digest = write_random(lab, writer, f"{target}/from-{writer}")
            assert sha256(lab, reader, f"{target}/from-{writer}") == digest, f"{reader} misses {writer}'s write"
            # And it is in the volume's filesystem on the storage host, not only in a client cache.
            assert sha256(lab, "storage", f"{export}/from-{writer}") == digest
    finally:
        clean_up(berth, [volume], nodes=("node1", "node2"))


def test_a_node_that_was_never_published_cannot_mount(lab, berth):
    volume = berth.create("nfs-acl", 64 * MiB, RWX, backend=NFS)
    try:
        context = berth.publish(volume, "node1", RWX).body["publish_context"]
        assert (context["nfsServer"], context["nfsExport"]) == export_of(volume), context
        assert exported_to(lab, context["nfsExport"]) == addresses(berth, "node1")
        rc, error = hand_mount(lab, "node2", volume)
        assert rc != 0, "node2 mounted the export without being published"
        # NodeStage without ControllerPublish: refused by the server, and the error has to say so.
        answer = berth.stage(volume, "node2", RWX, context)
        print(f"\nhand mount on node2: rc {rc}: {error}\nNodeStage on node2: {answer.body}")
        assert not answer.ok, "NodeStage succeeded on a node the volume is not published to"
        assert answer.body["code"] != "OK" and context["nfsExport"] in answer.details, answer.body
        assert any(word in answer.details.lower() for word in ("denied", "published")), answer.details
        berth.unstage(volume, "node2")

        assert berth.publish(volume, "node2", RWX).ok
        assert hand_mount(lab, "node2", volume)[0] == 0, "a published node must be able to mount"
        assert berth.stage(volume, "node2", RWX, context).ok
    finally:
        clean_up(berth, [volume], nodes=("node1", "node2"))


def test_snapshot_and_clone_cost_does_not_grow_with_data(lab, berth):
    empty = berth.create("nfs-empty-2g", 2 * GiB, RWO, backend=NFS)
    full = berth.create("nfs-full-2g", 2 * GiB, RWO, backend=NFS)
    volumes, snapshots = [full, empty], []  # full first: clean_up detaches volumes[0]
    try:
        berth.attach(full, "node1", RWO)
        chunks = DATA_BYTES // (64 * MiB)
        # 64 MiB of random data written `chunks` times (urandom itself is slow under TCG), through the NFS mount.
        write_seconds = timed(lambda: lab.run(
            "node1", f"dd if=/dev/urandom of=/tmp/chunk bs=1M count=64 status=none && for i in $(seq 1 {chunks}); "
                     f"do cat /tmp/chunk; done | dd of={target_path(full)}/data bs=1M conv=fsync status=none",
            timeout=1200))  # fmt: skip
        used = lab.run("storage", f"lvs --noheadings -o data_percent {VG}/{lv_of(full['volume_id'])}").stdout
        print(f"\nwrote {DATA_BYTES // MiB} MiB over NFS in {write_seconds:.0f} s; the LV is {used.strip()}% full")
        berth.detach(full, "node1")

        costs: dict[str, float] = {}
        used_before = pool_used_bytes(lab)
        for label, volume in (("empty", empty), ("full", full)):
            started = time.monotonic()
            snapshots.append(berth.snapshot(f"nfs-snap-{label}", volume))
            costs[f"snapshot {label}"] = time.monotonic() - started
            started = time.monotonic()
            source = {"volume": {"volume_id": volume["volume_id"]}}
            volumes.append(berth.create(f"nfs-clone-{label}", 2 * GiB, RWO, backend=NFS, source=source))
            costs[f"clone {label}"] = time.monotonic() - started
        grown = pool_used_bytes(lab) - used_before
        seconds = ", ".join(f"{k} {v:.1f}" for k, v in costs.items())
        print(f"NFS thin snapshot/clone seconds ({DATA_BYTES // MiB} MiB written vs empty): {seconds}; "
              f"the pool grew {grown // MiB} MiB")  # fmt: skip
        # A copy of the data would take as much again of the pool; thin snapshots and clones share its chunks. What
        # does grow: each clone's xfs replays its log and gets a new UUID when the storage host mounts it, and every
        # block it touches copies a whole pool chunk (130 MiB in all, measured).
        assert grown < DATA_BYTES // 2, f"the pool grew {grown // MiB} MiB for two snapshots and two clones"
        # The clone of the full volume has the data (checked on the storage host: both are mounted there).
        clone_export = export_of(volumes[-1])[1]
        assert sha256(lab, "storage", f"{clone_export}/data") == sha256(lab, "storage", f"{export_of(full)[1]}/data")
    finally:
        clean_up(berth, volumes, snapshots, nodes=("node1",))


def test_snapshot_taken_during_writes_gives_a_clean_filesystem(lab, berth):
    volume = berth.create("nfs-busy", 512 * MiB, RWO, backend=NFS)
    volumes, snapshots = [volume], []
    target = target_path(volume)
    try:
        berth.attach(volume, "node1", RWO)
        digest = start_writer(lab, "node1", target)
        wait_for_files(lab, "node1", target, 3)
        snapshots.append(berth.snapshot("nfs-busy-snap", volume))
        before = files_written(lab, "node1", target)
        # The writer goes on after the snapshot: nothing was left frozen.
        wait_for_files(lab, "node1", target, before + 2, timeout=60)
        stop_writer(lab, "node1")

        clone = berth.create("nfs-busy-clone", 512 * MiB, RWO, backend=NFS,
                             source={"snapshot": {"snapshot_id": snapshots[0]}})  # fmt: skip
        volumes.append(clone)
        origin_lv, clone_lv = lv_of(volume["volume_id"]), lv_of(clone["volume_id"])
        origin_mp, clone_mp = export_of(volume)[1], export_of(clone)[1]

        # Origin and clone are mounted side by side on the storage host: the clone got its own xfs UUID.
        assert host_mounts(lab, origin_mp, origin_lv) and host_mounts(lab, clone_mp, clone_lv)
        assert xfs_uuid(lab, origin_lv) != xfs_uuid(lab, clone_lv)

        # Every file the writer had finished (fsynced) before the snapshot is complete in the clone;
        # only the newest one may be partial.
        listing = lab.run("storage", f"cd {clone_mp} && ls | grep '^f\\.' | sort -t. -k2 -n").stdout.split()
        assert len(listing) >= 3, listing
        sums = {sha256(lab, "storage", f"{clone_mp}/{name}") for name in listing[:-1]}
        assert sums == {digest}, f"damaged files in the clone of a snapshot taken during writes: {listing}"

        # xfs_repair -n (check only) needs the filesystem unmounted: the clone is published nowhere, so Berth's
        # host mount is taken away for the check and put back from Berth's fstab line.
        lab.run("storage", f"umount {clone_mp}")
        try:
            repair = lab.run("storage", f"xfs_repair -n /dev/{VG}/{clone_lv}", check=False, timeout=300)
        finally:
            lab.run("storage", f"mount {clone_mp}")
        print(f"\nxfs_repair -n of the clone: rc {repair.rc}\n{repair.stdout[-1500:]}{repair.stderr[-1500:]}")
        assert repair.rc == 0, repair.stdout + repair.stderr
        # The snapshot LV itself (read-only, never mounted), for the record only: a frozen-then-snapshotted xfs
        # may still have a log to replay, which xfs_repair -n reports (rc 1); the clone above replayed it.
        snap = lab.run("storage", f"xfs_repair -n /dev/{VG}/{lv_of(snapshots[0])}", check=False, timeout=300)
        print(f"xfs_repair -n of the snapshot LV: rc {snap.rc}\n{snap.stderr[-800:]}")
    finally:
        stop_writer(lab, "node1")
        clean_up(berth, volumes, snapshots, nodes=("node1",))


def test_exports_survive_an_nfs_server_restart(lab, berth):
    volume = berth.create("nfs-restart", 64 * MiB, RWX, backend=NFS)
    target, export = target_path(volume), export_of(volume)[1]
    try:
        berth.attach(volume, "node1", RWX)
        digest = write_random(lab, "node1", f"{target}/before")
        lab.run("storage", "systemctl restart nfs-server", timeout=180)
        assert exported_to(lab, export) == addresses(berth, "node1"), "the restart lost or widened the export"
        # The live mount goes on (after nfsd's grace period, if the client has state to reclaim) ...
        read = timed(lambda: assert_data(lab, "node1", f"{target}/before", digest))
        # ... and a fresh mount against the restarted server works: unstage, then stage again.
        assert berth.node_unpublish(volume, "node1").ok and berth.unstage(volume, "node1").ok
        restage = timed(lambda: berth.attach(volume, "node1", RWX))
        assert_data(lab, "node1", f"{target}/before", digest)
        print(f"\nafter an nfs-server restart: read through the old mount {read:.1f} s, re-stage {restage:.1f} s")

        # exportfs -ra (what an admin runs after editing /etc/exports) keeps exactly the published clients.
        lab.run("storage", "exportfs -ra")
        assert exported_to(lab, export) == addresses(berth, "node1")
        assert hand_mount(lab, "node2", volume)[0] != 0, "exportfs -ra exported the volume to an unpublished node"
        assert_data(lab, "node1", f"{target}/before", digest)
    finally:
        clean_up(berth, [volume], nodes=("node1",))
