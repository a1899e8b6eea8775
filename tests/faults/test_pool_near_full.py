"""A thin pool near full (issue #13, fault 6; docs/configuration.md, "A thin pool near full"): a backend on a small
thin pool of its own (1 GiB, generous metadata so that only data counts) with full_threshold_percent 20; writing
250 MiB into one of its volumes on the storage host pushes the pool over it; then CreateVolume and CreateSnapshot
answer RESOURCE_EXHAUSTED and GetCapacity offers nothing, while the volume stays healthy; once the data is
discarded, creating works again."""

from __future__ import annotations

import pytest
import yaml

from sanity.runner import csicall, lab_config_text, start_berth, stop_berth

pytestmark = [pytest.mark.lab, pytest.mark.faults]

MiB = 1 << 20
POOL = "nearfull"
THRESHOLD = 20.0
WRITE_MIB = 250  # about 24% of the pool, nearly all of the volume


def pool_use(lab, pool: str = POOL) -> float:
    return float(lab.run("storage", f"sync; lvs --noheadings -o data_percent berth/{pool}").stdout.strip())


def config_with_threshold(pool: str = POOL, threshold: float = THRESHOLD) -> str:
    config = yaml.safe_load(lab_config_text("lab-iscsi"))
    # Over-provisioned 4x: the volumes' sizes may exceed what lies below the threshold (as thin pools do).
    config["backends"]["lab-iscsi"]["lvm"] = {"volume_group": "berth", "thin_pool": pool, "over_provisioning_ratio": 4,
                                             "full_threshold_percent": threshold}  # fmt: skip
    return yaml.safe_dump(config, sort_keys=False)


def call(lab, rpc: str, request: dict) -> tuple[bool, dict]:
    return csicall(lab, "node1", rpc, request)


def create(lab, name: str, size: int = 256 * MiB) -> tuple[bool, dict]:
    return call(lab, "Controller.CreateVolume", {
        "name": name, "capacity_range": {"required_bytes": str(size)},
        "volume_capabilities": [{"block": {}, "access_mode": {"mode": "SINGLE_NODE_WRITER"}}],
        "parameters": {"backend": "lab-iscsi"}})  # fmt: skip


def capacity(lab) -> int:
    ok, body = call(lab, "Controller.GetCapacity", {"parameters": {"backend": "lab-iscsi"}})
    assert ok, body
    return int(body.get("available_capacity", 0))


def test_new_volumes_and_snapshots_stop_at_the_threshold(lab):
    lab.run("storage", f"lvcreate -q --type thin-pool -L 1G --poolmetadatasize 64M -n {POOL} berth", timeout=300)
    start_berth(lab, "node1", mode="all", config=config_with_threshold())
    created: list[str] = []
    threshold = THRESHOLD
    try:
        ok, body = create(lab, "near-full-a")
        assert ok, body
        volume_id = body["volume"]["volume_id"]
        created.append(volume_id)
        assert capacity(lab) > 0
        lv = volume_id.split("/")[1]
        lab.run("storage", f"dd if=/dev/zero of=/dev/berth/{lv} bs=1M count={WRITE_MIB} oflag=direct status=none",
                timeout=600)  # fmt: skip
        used = pool_use(lab)
        assert used >= threshold, f"the pool is at {used}%, not above {threshold}%: nothing was tested"

        ok, body = create(lab, "near-full-b")
        assert not ok and body["code"] == "RESOURCE_EXHAUSTED", body
        assert "full_threshold_percent" in body["details"], body
        ok, body = call(lab, "Controller.CreateSnapshot", {"name": "near-full-snap", "source_volume_id": volume_id})
        assert not ok and body["code"] == "RESOURCE_EXHAUSTED", body
        assert capacity(lab) == 0
        ok, body = call(lab, "Controller.ControllerGetVolume", {"volume_id": volume_id})
        assert ok and not body["status"]["volume_condition"].get("abnormal", False), body

        lab.run("storage", f"blkdiscard /dev/berth/{lv}", timeout=300)
        ok, body = create(lab, "near-full-b")
        assert ok, f"still refused after the data was discarded ({pool_use(lab)}% used): {body}"
        created.append(body["volume"]["volume_id"])
        print(f"\nthreshold {threshold:g}%, pool at {used:.2f}% after {WRITE_MIB} MiB written")
    finally:
        for volume_id in created:
            call(lab, "Controller.DeleteVolume", {"volume_id": volume_id})
        stop_berth(lab, "node1")
        lab.run("storage", f"lvremove -q -f berth/{POOL}", timeout=300)


def test_a_volume_on_a_full_pool_reports_an_abnormal_condition(lab):
    """No threshold this time: a 64 MiB pool, a 128 MiB volume, and 100 MiB written into it. The pool runs out of data
    space (set to fail writes at once, not to queue them for 60 s), the write fails, and ControllerGetVolume says
    why; once the data is discarded the volume is healthy again."""
    pool = "filled"
    lab.run("storage", f"lvcreate -q --type thin-pool -L 64M --poolmetadatasize 8M -n {pool} berth && "
                       f"lvchange -q --errorwhenfull y berth/{pool}", timeout=300)  # fmt: skip
    start_berth(lab, "node1", mode="all", config=config_with_threshold(pool, threshold=100))
    volume_id = None
    try:
        ok, body = create(lab, "full-pool", size=128 * MiB)
        assert ok, body
        volume_id = body["volume"]["volume_id"]
        ok, body = call(lab, "Controller.ControllerGetVolume", {"volume_id": volume_id})
        assert ok and not body["status"]["volume_condition"].get("abnormal", False), body

        lv = volume_id.split("/")[1]
        write = lab.run("storage", f"dd if=/dev/zero of=/dev/berth/{lv} bs=1M count=100 oflag=direct status=none",
                        timeout=600, check=False)  # fmt: skip
        assert write.rc != 0, f"100 MiB fit into a 64 MiB pool? {pool_use(lab, pool)}% used"
        ok, body = call(lab, "Controller.ControllerGetVolume", {"volume_id": volume_id})
        condition = body["status"]["volume_condition"] if ok else body
        assert ok and condition.get("abnormal") is True and "is full" in condition["message"], body
        print(f"\nfull pool: {condition['message']}")

        lab.run("storage", f"blkdiscard /dev/berth/{lv}", timeout=300)
        ok, body = call(lab, "Controller.ControllerGetVolume", {"volume_id": volume_id})
        assert ok and not body["status"]["volume_condition"].get("abnormal", False), body
    finally:
        if volume_id is not None:
            call(lab, "Controller.DeleteVolume", {"volume_id": volume_id})
        stop_berth(lab, "node1")
        lab.run("storage", f"lvremove -q -f berth/{pool}", timeout=300)
