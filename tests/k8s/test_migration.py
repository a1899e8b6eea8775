"""A KubeVirt-shaped live migration through kubelet and the CSI sidecars, for each RWX volume kind.

How it maps to KubeVirt (docs/kubernetes.md, "Live migration"):
- a launcher pod ("virt-launcher") runs QEMU on node1 with the VM's disk from a Berth RWX PVC: a raw block device
  through `volumeDevices`, or `disk.img` on an NFS filesystem volume through `volumeMounts`;
- a second launcher pod with the same PVC starts on node2 while the first runs, QEMU there waiting with
  `-incoming` (KubeVirt's target pod); kubelet attaches the volume on node2 for it;
- QEMU migrates over the node network (hostNetwork, 198.18.0.x); the test drives QMP through a unix socket in a
  hostPath directory from the node, as virt-handler drives virt-launcher;
- the source pod is deleted: kubelet unpublishes and unstages on node1, the attacher unpublishes (the
  VolumeAttachment goes), while the VM keeps running on node2.

The VM is the hand-over tests' boot-sector guest (tests/handover/vm): its generations must continue across the
switch-over and the disk must verify afterwards (tests/handover/vm_lab.py's checks). Timings come from the
Kubernetes objects (creation and container start times, the attach event) and QEMU's `query-migrate`; each run
writes them to artifacts/k8s/migration/ as JSON and as one summary line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePath

import pytest

from lab.config import REPO
from lab.kube_images import LAUNCHER_REF
from tests.handover.vm.pattern import parse_serial
from tests.handover.vm.vmctl import ROOT, qemu_argv
from tests.handover.vm_lab import VM, assemble_guest, assert_verified, final_state
from tests.k8s.kube import Kube
from tests.k8s.workloads import Profile, node_leftovers, pvc

pytestmark = [pytest.mark.lab, pytest.mark.k8s]

VM_ROOT = str(ROOT)  # /run/berth-vm: one directory per VM (vmctl.py)
PORT = 4444  # QEMU's migration listener on node2 (hostNetwork)
TARGET_ADDRESS = "198.18.0.12"  # node2 on data link 0
BOOT_SECTOR = f"{VM_ROOT}/guest.img"  # on node1, assembled there and shared with the source pod by hostPath
ARTIFACTS = REPO / "artifacts" / "k8s" / "migration"
KUBELET = "/var/lib/kubelet"
KUBEVIRT_DISKS = "/run/kubevirt-private/vmi-disks"  # where virt-launcher mounts a VM's Filesystem PVCs

# Runs in the launcher's init container (fixed text; the values arrive as arguments): clear the VM's directory of
# an earlier run and, in the source pod, lay the boot sector on the disk (creating disk.img on a filesystem volume,
# as CDI would have).
PREPARE = """set -eu
mkdir -p "$1"
rm -f "$1/serial.log" "$1/qmp.sock" "$1/qemu.pid"
if [ "$3" = boot ]; then
  [ -b "$2" ] || truncate -s 64M "$2"
  dd if="$4" of="$2" bs=512 count=1 conv=notrunc oflag=direct status=none
fi
"""


@dataclass(frozen=True)
class Case:
    profile: Profile
    disk: str  # the VM's disk inside the launcher: the device, or disk.img on the mounted volume


CASES = [
    Case(Profile("berth-iscsi-block-rwx", "ReadWriteMany", "Block", "64Mi"), "/dev/vm-disk"),
    # KubeVirt's Filesystem layout: disk.img at the volume root. qemu runs as root here, so with Berth's default
    # root_squash disk.img belongs to nobody, and both launchers (root, squashed alike) open it read-write.
    Case(Profile("berth-nfs", "ReadWriteMany", "Filesystem", "512Mi"), f"{KUBEVIRT_DISKS}/disk0/disk.img"),
]


def launcher_pod(name: str, vm: str, node: str, claim: str, case: Case, incoming: int | None = None) -> dict:
    """A virt-launcher-like pod: QEMU as the `compute` container's process, its QMP socket and serial log in a
    hostPath directory the node reaches; hostPID so that qemu's pid file means something there."""
    vm_dir = f"{VM_ROOT}/{vm}"
    container: dict = {"image": LAUNCHER_REF, "imagePullPolicy": "Never",
                       "volumeMounts": [{"name": "vms", "mountPath": VM_ROOT}]}  # fmt: skip
    if case.profile.volume_mode == "Block":
        container["volumeDevices"] = [{"name": "disk", "devicePath": case.disk}]
    else:
        container["volumeMounts"].append({"name": "disk", "mountPath": str(PurePath(case.disk).parent)})
    role = "migration-target" if incoming else "boot"
    prepare = ["sh", "-c", PREPARE, "prepare", vm_dir, case.disk, role, BOOT_SECTOR]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "berth-vm-launcher", "vm": claim}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},  # through the scheduler, as KubeVirt's pods go
            "hostNetwork": True, "hostPID": True, "restartPolicy": "Never", "terminationGracePeriodSeconds": 10,
            "initContainers": [{"name": "prepare", **container, "command": prepare}],
            "containers": [{"name": "compute", **container,
                            "command": qemu_argv(vm, case.disk, incoming, daemonize=False)}],
            "volumes": [{"name": "disk", "persistentVolumeClaim": {"claimName": claim}},
                        {"name": "vms", "hostPath": {"path": VM_ROOT, "type": "DirectoryOrCreate"}}],
        },
    }  # fmt: skip


def k8s_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def compute_started(kube: Kube, pod: str) -> float | None:
    """When the pod's `compute` container (QEMU) started, by kubelet's record; None while it has not."""
    status = (kube.get("pod", pod) or {}).get("status", {})
    for c in status.get("containerStatuses", []):
        running = c["state"].get("running")
        if c["name"] == "compute" and running:
            return k8s_time(running["startedAt"])
    return None


def attach_event_time(kube: Kube, pod: str) -> float | None:
    """The attachdetach controller's SuccessfulAttachVolume event for the pod (the VolumeAttachment is attached)."""
    events = json.loads(kube.kubectl("get", "events", "--field-selector", f"involvedObject.name={pod}", "-o", "json"))
    times = [k8s_time(e.get("lastTimestamp") or e["eventTime"]) for e in events["items"]
             if e["reason"] == "SuccessfulAttachVolume"]  # fmt: skip
    return max(times) if times else None


def attached_nodes(kube: Kube, pv: str) -> set[str]:
    items = (kube.get("volumeattachments") or {"items": []})["items"]
    return {va["spec"]["nodeName"] for va in items if va["spec"]["source"].get("persistentVolumeName") == pv}


def qemu_status(vm: VM) -> str:
    try:
        return vm.qmp("query-status")["status"]
    except AssertionError:  # no QMP socket yet
        return ""


def target_state(vm: VM) -> dict:
    """QEMU's run state, its disk as QEMU sees it, and the last migration's status, for a failure message."""
    state: dict = {}
    for command in ("query-status", "query-block", "query-migrate"):
        try:
            state[command] = vm.qmp(command)
        except AssertionError as e:
            state[command] = str(e)
    # Where QEMU's threads wait in the kernel (an NFS lock or write shows here), and the node's NFS lock count.
    threads = f"p=$(cat {VM_ROOT}/{vm.name}/qemu.pid) && for t in /proc/$p/task/*; do cat $t/wchan; echo; done"
    waits = vm.lab.run(vm.node, f"{threads} | sort | uniq -c; wc -l < /proc/locks", check=False).stdout
    state["threads, then /proc/locks lines"] = " ".join(waits.split())
    return state


def disk_on_node(case: Case, pv: str, pod_uid: str) -> str:
    """Where kubelet published the volume for the pod on its node (the CSI NodePublish target)."""
    if case.profile.volume_mode == "Block":
        return f"{KUBELET}/plugins/kubernetes.io/csi/volumeDevices/publish/{pv}/{pod_uid}"
    return f"{KUBELET}/pods/{pod_uid}/volumes/kubernetes.io~csi/{pv}/mount/{PurePath(case.disk).name}"


@pytest.mark.parametrize("case", CASES, ids=[c.profile.storage_class for c in CASES])
def test_vm_live_migrates_between_launcher_pods(kube: Kube, case: Case) -> None:
    lab = kube.lab
    claim = f"vm-{case.profile.storage_class}"
    src_pod, dst_pod = f"{claim}-launcher-src", f"{claim}-launcher-dst"
    source, target = VM(lab, "node1", f"{claim}-src"), VM(lab, "node2", f"{claim}-dst")
    t_start = time.time()
    try:
        kube.apply(pvc(claim, case.profile))
        kube.wait_for(f"PVC {claim} Bound", lambda: (kube.get("pvc", claim) or {}).get("status", {}).get("phase")
                      == "Bound", timeout=300)  # fmt: skip
        pv = kube.get("pvc", claim)["spec"]["volumeName"]
        assemble_guest(lab, "node1", BOOT_SECTOR)

        kube.apply(launcher_pod(src_pod, source.name, "node1", claim, case))
        kube.wait_for(f"{src_pod} running QEMU", lambda: compute_started(kube, src_pod), timeout=600)
        booted = source.wait(1)
        assert booted["generations"] and not booted["errors"], f"{json.dumps(booted)}\n{source.serial_text()}"
        source.wait(booted["generations"][-1] + 3)

        kube.apply(launcher_pod(dst_pod, target.name, "node2", claim, case, incoming=PORT))
        dst_created = k8s_time(kube.get("pod", dst_pod)["metadata"]["creationTimestamp"])
        dst_started = kube.wait_for(f"{dst_pod} running QEMU", lambda: compute_started(kube, dst_pod), timeout=600,
                                    interval=1)  # fmt: skip
        assert isinstance(dst_started, float)
        kube.wait_for("QEMU on node2 waiting for the migration", lambda: qemu_status(target) == "inmigrate",
                      timeout=120, interval=1)  # fmt: skip
        dst_attached = attach_event_time(kube, dst_pod)
        before = source.serial()
        assert not before["errors"] and before["alive"], before

        stats = source.migrate(f"tcp:{TARGET_ADDRESS}:{PORT}")
        assert stats["status"] == "completed" and stats["source_status"] == "postmigrate", stats
        last_on_source = parse_serial(source.serial_text())["generations"][-1]
        try:
            after = target.wait(last_on_source + 3, timeout=120)
        except AssertionError as e:  # the guest is silent on node2: say what QEMU there was doing
            raise AssertionError(f"{e}; QEMU on node2: {target_state(target)}") from None
        assert not after["errors"] and after["generations"], after
        assert qemu_status(target) == "running", target_state(target)

        # The source pod goes, as KubeVirt deletes it after a completed migration; node1 lets the volume go.
        pod_uid = kube.get("pod", dst_pod)["metadata"]["uid"]
        t_delete = time.time()
        kube.kubectl("delete", "pod", src_pod, "--wait=false")
        teardown: dict[str, float] = {}

        def torn_down() -> bool:
            now = round(time.time() - t_delete, 1)
            if "pod_gone" not in teardown and kube.get("pod", src_pod) is None:
                teardown["pod_gone"] = now
            if "node1_clean" not in teardown and node_leftovers(lab, "node1") == "":
                teardown["node1_clean"] = now
            if "volumeattachment_gone" not in teardown and "node1" not in attached_nodes(kube, pv):
                teardown["volumeattachment_gone"] = now
            return len(teardown) == 3

        kube.wait_for("node1 torn down (pod, sessions and mounts, VolumeAttachment)", torn_down, timeout=300,
                      interval=1)  # fmt: skip
        assert attached_nodes(kube, pv) == {"node2"}
        now = target.serial()["generations"][-1]
        later = target.wait(now + 3)
        assert not later["errors"] and later["alive"], later

        joined, regions = final_state(lab, source, target, disk_on_node(case, pv, pod_uid))
        report = {
            "storage_class": case.profile.storage_class,
            "started": datetime.fromtimestamp(t_start).isoformat(timespec="seconds"),
            "target_pod_s": {"attached (SuccessfulAttachVolume)": dst_attached and round(dst_attached - dst_created),
                             "running (compute started)": round(dst_started - dst_created)},
            "qemu_migration_ms": {k: stats.get(k) for k in ("total-time", "downtime", "setup-time")},
            "transferred_bytes": stats["ram"]["transferred"],
            "source_teardown_s": teardown,
            "generations": {"on_source": last_on_source, "total": joined["generations"][-1]},
            "test_s": round(time.time() - t_start),
        }  # fmt: skip
        write_report(report)
        assert_verified(joined, regions)
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for vm in (source, target):
            (ARTIFACTS / f"{claim}.serial.{vm.node}.log").write_text(vm.serial_text())
        for pod in (src_pod, dst_pod):  # QEMU's own messages (a lock or an I/O error on the disk) go to stderr
            logs = kube.kubectl("logs", pod, "-c", "compute", "--tail", "200", check=False)
            (ARTIFACTS / f"{pod}.compute.log").write_text(logs)
        for pod in (src_pod, dst_pod):
            kube.kubectl("delete", "pod", pod, "--ignore-not-found", "--wait=false")
        for pod in (src_pod, dst_pod):
            kube.delete("pod", pod)
        kube.delete("pvc", claim)
        kube.wait_for("no VolumeAttachment left", lambda: not (kube.get("volumeattachments") or {"items": []})[
            "items"], timeout=300)  # fmt: skip


def summary_line(r: dict) -> str:
    t, m, down = r["target_pod_s"], r["qemu_migration_ms"], r["source_teardown_s"]
    return (
        f"{r['started']} {r['storage_class']}: target pod attached {t['attached (SuccessfulAttachVolume)']} s, "
        f"running {t['running (compute started)']} s; migration {m['total-time']} ms, downtime {m['downtime']} ms; "
        f"source teardown: pod gone {down['pod_gone']} s, node1 clean {down['node1_clean']} s, VolumeAttachment "
        f"gone {down['volumeattachment_gone']} s; generations {r['generations']['total']}; test {r['test_s']} s"
    )


def write_report(report: dict) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = f"{report['storage_class']}-{report['started'].replace(':', '')}.json"
    (ARTIFACTS / name).write_text(json.dumps(report, indent=2) + "\n")
    line = summary_line(report)
    with open(ARTIFACTS / "summary.txt", "a") as f:
        f.write(line + "\n")
    print(f"\n[migration] {line}")
