"""Restarts under a running workload, through kubelet and the sidecars, one StorageClass each.

A writer pod on node1 appends numbered records to a Berth volume and prints each number once it is on stable
storage (fsync). While it writes, something restarts: kubelet, the Berth node pod, or the whole node guest. The
writer must go on (or, after the reboot, come back on node1 and resume). Then the writer is deleted, a reader pod
on node2 checks that records 0..n-1 are all there with n at least the last acknowledged record, the PVC is deleted,
and neither the storage host nor the nodes hold anything of the volume. A fourth test deletes the Berth controller
pod in the middle of a burst of PVC creations: every PVC binds, and no LV, target or export is left over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.k8s.install import NAMESPACE
from tests.k8s.kube import Kube
from tests.k8s.workloads import DEVICE, MOUNT, Profile, node_leftovers, pod, pvc, storage_leftovers

pytestmark = [pytest.mark.lab, pytest.mark.k8s]

ISCSI_FS = Profile("berth-iscsi-fs", "ReadWriteOnce", "Filesystem", "256Mi")
ISCSI_BLOCK = Profile("berth-iscsi-block-rwx", "ReadWriteMany", "Block", "64Mi")
NFS = Profile("berth-nfs", "ReadWriteMany", "Filesystem", "512Mi")  # xfs needs 300 MiB

# The writers print a record's number once fsync has returned: the last line of the pod's log is the last
# acknowledged record. Each resumes after the records already there (a container restarted after a reboot).
LOG = f"{MOUNT}/log"
FS_WRITER = f"""touch {LOG}; i=$(wc -l < {LOG})
while true; do echo $i >> {LOG} && sync && echo $i; i=$((i+1)); sleep 1; done"""
FS_COUNT = f"wc -l < {LOG}"
# Block: record i is sector i, its number right-aligned in 511 bytes and a newline (one 512-byte write).
BLOCK_RECORD = f"""[ "$(dd if={DEVICE} bs=512 skip=$i count=1 2>/dev/null | tr -d ' ')" = "$i" ]"""
BLOCK_COUNT = f"i=0; while {BLOCK_RECORD}; do i=$((i+1)); done; echo $i"
BLOCK_WRITER = f"""i=$({BLOCK_COUNT})
while true; do
  printf '%511d\\n' $i | dd of={DEVICE} bs=512 seek=$i count=1 conv=notrunc,fsync 2>/dev/null && echo $i
  i=$((i+1)); sleep 1
done"""


def reader_script(p: Profile, at_least: int) -> str:
    """Succeeds when records 0..n-1 are all there, in order, with n >= at_least."""
    if p.volume_mode == "Block":
        count = BLOCK_COUNT
        check = "true"
    else:
        count = FS_COUNT
        check = f"seq 0 $((n-1)) | cmp -s - {LOG}"
    return f'n=$({count}); echo "records: $n"; [ "$n" -ge {at_least} ] && {check} && echo verified'


def acknowledged(kube: Kube, name: str) -> int:
    """How many records the writer has acknowledged: its log's last number + 1 (0 before the first)."""
    lines = kube.kubectl("logs", name, "--tail=1", check=False).split()
    return int(lines[-1]) + 1 if lines and lines[-1].isdigit() else 0


def wait_writing(kube: Kube, name: str, beyond: int, timeout: float) -> int:
    """Wait until the writer has acknowledged more than `beyond` + 2 records; returns the count."""

    def progressed() -> int:
        n = acknowledged(kube, name)
        return n if n > beyond + 2 else 0

    return int(kube.wait_for(f"{name} writes past record {beyond + 2}", progressed, timeout, interval=3))


def bound_pvc(kube: Kube, name: str, p: Profile) -> str:
    """Create the PVC, wait until it is Bound; returns the PV's volume handle."""
    kube.apply(pvc(name, p))
    kube.wait_for(f"PVC {name} Bound", lambda: (kube.get("pvc", name) or {}).get("status", {}).get("phase")
                  == "Bound", timeout=300)  # fmt: skip
    return kube.get("pv", kube.get("pvc", name)["spec"]["volumeName"])["spec"]["csi"]["volumeHandle"]


def delete_and_audit(kube: Kube, claim: str, handle: str) -> None:
    """Delete the PVC; its PV and VolumeAttachments go, and nothing of it stays on the storage host or a node."""
    pv_name = kube.get("pvc", claim)["spec"]["volumeName"]
    kube.delete("pvc", claim)
    kube.wait_for(f"PV {pv_name} deleted", lambda: kube.get("pv", pv_name) is None, timeout=300)
    kube.wait_for("no VolumeAttachment left", lambda: not (kube.get("volumeattachments") or {"items": []})["items"],
                  timeout=300)  # fmt: skip
    assert storage_leftovers(kube.lab, handle) == "", f"the storage host still holds {handle}"
    for node in kube.lab.node_names:
        assert node_leftovers(kube.lab, node) == "", f"{node} still holds state after the volume was deleted"


def restarts(kube: Kube, pod_name: str) -> int:
    return sum(c.get("restartCount", 0) for c in kube.get("pod", pod_name)["status"].get("containerStatuses") or [])


def survives(kube: Kube, name: str, p: Profile, disrupt: Callable[[], None], writer_restarts: bool = False) -> None:
    """The scenario in the module's docstring; `writer_restarts`: the disruption restarts the writer's container
    (a reboot), else it must have kept running."""
    handle = bound_pvc(kube, name, p)
    writer = f"{name}-writer"
    script = BLOCK_WRITER if p.volume_mode == "Block" else FS_WRITER
    kube.apply(pod(writer, name, "node1", p, script, restart="Always"))
    before = wait_writing(kube, writer, 0, timeout=600)

    disrupt()
    acked = wait_writing(kube, writer, before, timeout=600)
    assert kube.get("pod", writer)["spec"]["nodeName"] == "node1"
    if not writer_restarts:
        assert restarts(kube, writer) == 0, "the writer's container was restarted"
    kube.delete("pod", writer)

    reader = f"{name}-reader"
    kube.apply(pod(reader, name, "node2", p, reader_script(p, acked)))
    try:
        kube.wait_pod_done(reader, timeout=600)
    finally:
        print(f"\n{name}: {acked} records acknowledged, reader: {kube.kubectl('logs', reader, check=False).strip()}")
    kube.delete("pod", reader)
    delete_and_audit(kube, name, handle)


def node_pod(kube: Kube, node: str) -> dict | None:
    pods = kube.get("pods", namespace=NAMESPACE) or {"items": []}
    return next((p for p in pods["items"] if p["spec"].get("nodeName") == node
                 and p["metadata"]["labels"].get("app.kubernetes.io/component") == "node"
                 and not p["metadata"].get("deletionTimestamp")), None)  # fmt: skip


def ready(obj: dict | None) -> bool:
    """A pod's or a node's Ready condition is True."""
    conditions = (obj or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def node_ready(kube: Kube, node: str) -> bool:
    return ready(kube.get("node", node))


def test_kubelet_restart_with_a_mounted_volume(kube: Kube) -> None:
    def restart_kubelet() -> None:
        kube.lab.run("node1", "systemctl restart kubelet")
        kube.wait_for("node1 Ready after the kubelet restart", lambda: node_ready(kube, "node1"), timeout=300)

    survives(kube, "restart-kubelet", ISCSI_FS, restart_kubelet)


@pytest.mark.slow  # run by hand: CI's time budget (scripts/test)
def test_berth_node_pod_deleted_and_recreated(kube: Kube) -> None:
    def recreate_node_pod() -> None:
        old = node_pod(kube, "node1")
        assert old, "no Berth node pod on node1"
        kube.delete("pod", old["metadata"]["name"], NAMESPACE)
        kube.wait_for("a new Berth node pod Ready on node1", lambda: ready(node_pod(kube, "node1")), timeout=300)

    survives(kube, "restart-node-pod", ISCSI_BLOCK, recreate_node_pod)


@pytest.mark.slow  # run by hand: CI's time budget (scripts/test)
def test_node_guest_rebooted(kube: Kube) -> None:
    def reboot_node1() -> None:
        seconds = kube.lab.reboot("node1")
        print(f"\nnode1 back after {seconds:.0f} s")
        kube.wait_for("node1 Ready after the reboot", lambda: node_ready(kube, "node1"), timeout=600)
        kube.wait_for("the Berth node pod Ready on node1", lambda: ready(node_pod(kube, "node1")), timeout=600)

    survives(kube, "restart-reboot", NFS, reboot_node1, writer_restarts=True)


# --- the controller pod deleted during a burst of PVC creations ---

BURST = [ISCSI_BLOCK] * 4 + [NFS] * 2


def berth_lvs(kube: Kube) -> set[str]:
    return set(kube.lab.run("storage", "lvs --noheadings -o lv_name berth").stdout.split())


def orphan_report(kube: Kube) -> dict:
    """`berth orphans` in the controller pod, counting every leftover however young (docs/orphans.md)."""
    out = kube.kubectl("exec", "-n", NAMESPACE, "deploy/berth-controller", "-c", "berth", "--",
                       "/opt/berth/bin/berth", "orphans", "--config", "/etc/berth/config.yaml", "--older-than", "0",
                       "--json", check=False, timeout=300)  # fmt: skip
    return json.loads(out)


@pytest.mark.slow  # run by hand: CI's time budget (scripts/test)
def test_controller_pod_deleted_during_a_pvc_burst(kube: Kube) -> None:
    names = [f"burst-{i}" for i in range(len(BURST))]
    before = berth_lvs(kube)
    kube.apply([pvc(name, p) for name, p in zip(names, BURST, strict=True)])
    # Kill the controller once the first LV exists: the provisioner has CreateVolume calls in flight.
    kube.wait_for("the first new LV", lambda: berth_lvs(kube) - before, timeout=300, interval=1)
    phases = [(kube.get("pvc", n) or {}).get("status", {}).get("phase") for n in names]
    kube.kubectl("delete", "pod", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=controller",
                 "--grace-period=0", "--force", "--wait=false")  # fmt: skip
    killed_at = time.monotonic()
    assert phases.count("Bound") < len(names), "every PVC was bound before the controller died: nothing was tested"

    def all_bound() -> bool:
        return all((kube.get("pvc", n) or {}).get("status", {}).get("phase") == "Bound" for n in names)

    kube.wait_for("every PVC of the burst Bound", all_bound, timeout=900, interval=5)
    print(f"\nburst: {phases.count('Bound')}/{len(names)} bound when the controller died, "
          f"all bound {time.monotonic() - killed_at:.0f} s later")  # fmt: skip
    handles = {n: kube.get("pv", kube.get("pvc", n)["spec"]["volumeName"])["spec"]["csi"]["volumeHandle"]
               for n in names}  # fmt: skip
    created = berth_lvs(kube) - before
    assert created == {h.rsplit("/", 1)[-1] for h in handles.values()}, f"LVs beyond the PVs' volumes: {created}"
    report = orphan_report(kube)
    assert not report["orphans"] and not report["errors"], f"berth orphans: {report}"

    for name in names:
        kube.kubectl("delete", "pvc", name, "--wait=false")
    kube.wait_for("every PV of the burst deleted", lambda: not (berth_lvs(kube) - before), timeout=600, interval=5)
    for handle in handles.values():
        assert storage_leftovers(kube.lab, handle) == "", f"the storage host still holds {handle}"
    report = orphan_report(kube)
    assert not report["orphans"] and not report["errors"], f"berth orphans after the deletes: {report}"
