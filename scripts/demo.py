#!/usr/bin/env python3
"""The Berth demo in the storage lab: an RWX raw-block volume shared by two nodes, as KubeVirt live migration needs.

Steps, each timed: create the volume, publish and stage it on node1 and node2, write on node1 and read the same
bytes on node2 (O_DIRECT, no cache in between), snapshot, clone from the snapshot, expand online, tear down.
Uses a running lab (`python -m lab up`) or starts one for the demo.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.topology import Lab, LabError  # noqa: E402
from sanity.runner import csicall, start_berth, stop_berth  # noqa: E402

MiB = 1 << 20
RWX_BLOCK = {"block": {}, "access_mode": {"mode": "MULTI_NODE_MULTI_WRITER"}}
timings: list[tuple[str, float]] = []


def csi(lab: Lab, node: str, rpc: str, request: dict | None = None) -> dict:
    ok, answer = csicall(lab, node, rpc, request)
    if not ok:
        raise RuntimeError(f"{rpc} on {node} failed: {answer}")
    return answer


def step(title: str):
    class Timer:
        def __enter__(self):
            print(f"\n== {title}", flush=True)
            self.started = time.monotonic()

        def __exit__(self, *exc):
            elapsed = time.monotonic() - self.started
            timings.append((title, elapsed))
            print(f"   done in {elapsed:.1f}s", flush=True)

    return Timer()


def attach(lab: Lab, node: str, volume: dict, node_id: str) -> str:
    volume_id = volume["volume_id"]
    published = csi(lab, "node1", "Controller.ControllerPublishVolume",
                    {"volume_id": volume_id, "node_id": node_id, "volume_capability": RWX_BLOCK})  # fmt: skip
    print(f"   {node}: publish_context {published.get('publish_context')}")
    safe = volume_id.replace("/", "_")
    staging, target = f"/var/lib/berth-demo/staging/{safe}", f"/var/lib/berth-demo/publish/{safe}"
    lab.run(node, f"mkdir -p {staging} /var/lib/berth-demo/publish")
    common = {
        "volume_id": volume_id,
        "volume_capability": RWX_BLOCK,
        "volume_context": volume.get("volume_context", {}),
    }
    context = published.get("publish_context", {})
    csi(lab, node, "Node.NodeStageVolume", {**common, "staging_target_path": staging, "publish_context": context})
    csi(lab, node, "Node.NodePublishVolume",
        {**common, "staging_target_path": staging, "target_path": target,
         "publish_context": context})  # fmt: skip
    return target


def detach(lab: Lab, node: str, volume_id: str, node_id: str) -> None:
    safe = volume_id.replace("/", "_")
    csi(lab, node, "Node.NodeUnpublishVolume",
        {"volume_id": volume_id, "target_path": f"/var/lib/berth-demo/publish/{safe}"})  # fmt: skip
    csi(lab, node, "Node.NodeUnstageVolume",
        {"volume_id": volume_id, "staging_target_path": f"/var/lib/berth-demo/staging/{safe}"})  # fmt: skip
    csi(lab, "node1", "Controller.ControllerUnpublishVolume", {"volume_id": volume_id, "node_id": node_id})


def demo(lab: Lab) -> None:
    with step("start berth: controller+node on node1, node on node2"):
        start_berth(lab, "node1", mode="all")
        start_berth(lab, "node2", mode="node")
        node_ids = {n: csi(lab, n, "Node.NodeGetInfo")["node_id"] for n in ("node1", "node2")}
        for node, node_id in node_ids.items():
            print(f"   {node}: node_id {node_id}")
    with step("create a 256 MiB ReadWriteMany raw-block volume (thin LV on the storage host)"):
        volume = csi(lab, "node1", "Controller.CreateVolume",
                     {"name": "demo-vm-disk", "capacity_range": {"required_bytes": str(256 * MiB)},
                      "volume_capabilities": [RWX_BLOCK], "parameters": {"backend": "lab-iscsi"}},
                     )["volume"]  # fmt: skip
        print(f"   volume_id {volume['volume_id']}, {int(volume['capacity_bytes']) // MiB} MiB, "
              f"context {volume.get('volume_context')}")  # fmt: skip
    volume_id = volume["volume_id"]
    targets = {}
    for node in ("node1", "node2"):
        with step(f"publish + stage + publish on {node} (iSCSI login over two portals, multipath)"):
            targets[node] = attach(lab, node, volume, node_ids[node])
            print(
                "   "
                + lab.run(node, f"lsblk -no NAME,SIZE,TYPE $(readlink -f {targets[node]}) | head -3").stdout.strip()
            )
    with step("write 16 MiB on node1 with O_DIRECT, read it back on node2 with O_DIRECT"):
        lab.run("node1", f"head -c {16 * MiB} /dev/urandom > /tmp/demo.bin && "
                         f"dd if=/tmp/demo.bin of={targets['node1']} bs=1M oflag=direct conv=fsync status=none",
                )  # fmt: skip
        wrote = lab.run("node1", "sha256sum < /tmp/demo.bin").stdout.split()[0]
        read = lab.run(
            "node2", f"dd if={targets['node2']} bs=1M count=16 iflag=direct status=none | sha256sum"
        ).stdout.split()[0]
        print(f"   node1 wrote {wrote[:16]}…, node2 read {read[:16]}…")
        if wrote != read:
            raise RuntimeError("node2 read different data than node1 wrote")
    with step("snapshot the volume (thin snapshot: no data copied)"):
        snapshot = csi(lab, "node1", "Controller.CreateSnapshot",
                       {"name": "demo-snap", "source_volume_id": volume_id})["snapshot"]  # fmt: skip
        print(f"   snapshot_id {snapshot['snapshot_id']}, ready_to_use {snapshot.get('ready_to_use', False)}")
    with step("clone a new volume from the snapshot"):
        clone = csi(lab, "node1", "Controller.CreateVolume",
                    {"name": "demo-clone", "volume_capabilities": [RWX_BLOCK], "parameters": {"backend": "lab-iscsi"},
                     "volume_content_source": {"snapshot": {"snapshot_id": snapshot["snapshot_id"]}}},
                    )["volume"]  # fmt: skip
        print(f"   clone {clone['volume_id']}, {int(clone['capacity_bytes']) // MiB} MiB")
    with step("expand the shared volume to 512 MiB online; both nodes see the new size"):
        grown = csi(lab, "node1", "Controller.ControllerExpandVolume",
                    {"volume_id": volume_id, "capacity_range": {"required_bytes": str(512 * MiB)}})  # fmt: skip
        for node in ("node1", "node2"):
            csi(lab, node, "Node.NodeExpandVolume", {"volume_id": volume_id, "volume_path": targets[node],
                                                     "capacity_range": {"required_bytes": str(512 * MiB)}})  # fmt: skip
            size = int(lab.run(node, f"blockdev --getsize64 {targets[node]}").stdout)
            print(f"   {node}: {size // MiB} MiB (controller says {int(grown['capacity_bytes']) // MiB} MiB)")
    with step("tear down: unpublish both nodes, delete clone, snapshot and volume"):
        for node in ("node1", "node2"):
            detach(lab, node, volume_id, node_ids[node])
        csi(lab, "node1", "Controller.DeleteVolume", {"volume_id": clone["volume_id"]})
        csi(lab, "node1", "Controller.DeleteSnapshot", {"snapshot_id": snapshot["snapshot_id"]})
        csi(lab, "node1", "Controller.DeleteVolume", {"volume_id": volume_id})
        sessions = lab.run("node2", "iscsiadm -m session 2>&1 || true").stdout.strip()
        print(f"   node2 iSCSI sessions left: {sessions or 'none'}")
    stop_berth(lab, "node1")
    stop_berth(lab, "node2")


def main() -> int:
    try:
        lab, owned = Lab.attach(), False
        lab.sync()
    except LabError:
        lab, owned = Lab(), True
        with step("start the lab: storage guest + two nodes (qemu, software emulation)"):
            lab.up()
    try:
        demo(lab)
    finally:
        if owned:
            lab.down()
    print("\nstep timings:")
    for title, seconds in timings:
        print(f"  {seconds:6.1f}s  {title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
