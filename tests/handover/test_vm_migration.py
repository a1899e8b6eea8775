"""A VM, for real: QEMU on node1 runs a tiny guest whose disk is a Berth RWX block volume, live-migrates it to node2
with QEMU's own migration over the lab network, and the migrated guest checks its data.

The guest (vm/guest.asm, a boot sector) writes 64 sectors once at boot, then generation after generation of a known
pattern to 64 other sectors, and reads both regions back before writing the next generation; its serial log says
which generations it verified. So:
the joined serial logs of source and target must show generations 1, 2, 3, ... with none missing, repeated or bad
(the one in flight at the switch-over was written on node1 and verified on node2); node1 then lets the volume go
(NodeUnpublish, NodeUnstage, ControllerUnpublish) while the VM keeps running on node2 without an I/O error; and the
disk, read with O_DIRECT on node2 once the VM is stopped, holds the last verified generation (or the next one) and
the boot-time sectors.
"""

from __future__ import annotations

import json
import time

import pytest

from lab.config import REPO
from tests.berth_lab.conftest import MiB, block, target_path
from tests.handover.vm.pattern import parse_serial
from tests.handover.vm_lab import VM, assert_verified, final_state, install_guest

pytestmark = [pytest.mark.lab, pytest.mark.handover]
PORT = 4444
TARGET_ADDRESS = "198.18.0.12"  # node2 on data link 0
ARTIFACTS = REPO / "artifacts" / "handover"


def test_vm_live_migrates_between_nodes_on_a_berth_volume(lab, berth):
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 2)
        return now

    rwx = block("MULTI_NODE_MULTI_WRITER")
    volume = berth.create("vm-disk", 64 * MiB, rwx)
    source, target = VM(lab, "node1", "src"), VM(lab, "node2", "dst")
    attached = []
    try:
        t = time.monotonic()
        disk = {}
        for node in ("node1", "node2"):
            berth.attach(volume, node, rwx)
            disk[node] = target_path(volume)
            attached.append(node)
            t = mark(f"attach {node} (ControllerPublish, NodeStage, NodePublish)", t)
        install_guest(lab, "node1", disk["node1"])

        t = mark("write the boot sector", t)
        source.start(disk["node1"])
        t = mark("start qemu on node1", t)
        target.start(disk["node2"], incoming=PORT)
        t = mark("start qemu -incoming on node2", t)
        booted = source.wait(1)
        assert booted["generations"] and not booted["errors"], booted
        t = mark("boot to first verified generation", t)
        before = source.wait(booted["generations"][-1] + 5)
        assert not before["errors"], before
        t = mark("5 more generations on node1", t)

        stats = source.migrate(f"tcp:{TARGET_ADDRESS}:{PORT}")
        t = mark("migration (as seen by the test)", t)
        assert stats["status"] == "completed" and stats["source_status"] == "postmigrate", stats
        last_on_source = parse_serial(source.serial_text())["generations"][-1]
        after = target.wait(last_on_source + 3)
        assert not after["errors"] and after["generations"], after
        target_status = target.qmp("query-status")
        assert target_status["status"] == "running", target_status
        t = mark("3 generations on node2", t)

        source.quit()
        failures = berth.detach(volume, "node1")
        attached.remove("node1")
        assert not failures, failures
        t = mark("detach node1 (NodeUnpublish, NodeUnstage, ControllerUnpublish)", t)
        now = target.serial()["generations"][-1]
        later = target.wait(now + 3)
        assert not later["errors"] and later["alive"], later
        t = mark("3 generations on node2 after node1 detached", t)

        joined, regions = final_state(lab, source, target, disk["node2"])
        timings["total"] = round(time.monotonic() - t0, 2)
        report = {
            "timings_s": timings,
            "qemu_migration": {k: stats.get(k) for k in ("total-time", "downtime", "setup-time")}
            | {"transferred_bytes": stats["ram"]["transferred"], "mbps": stats["ram"]["mbps"]},
            "generations": {"on_source": last_on_source, "total": joined["generations"][-1],
                            "first_on_target": parse_serial(target.serial_text())["generations"][:1]},
            "disk_generations": {name: sorted(set(gens), key=str) for name, gens in regions.items()},
        }  # fmt: skip
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "vm_migration.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report))
        assert_verified(joined, regions)
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for vm in (source, target):
            (ARTIFACTS / f"vm_serial_{vm.node}.log").write_text(vm.serial_text())
        source.quit()
        target.quit()
        for node in attached:
            berth.detach(volume, node)
        berth.delete(volume)
