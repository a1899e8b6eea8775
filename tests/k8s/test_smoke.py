"""Smoke test per StorageClass, through kubelet and the sidecars: a PVC binds, a pod on node1 writes, the pod is
deleted, a pod on node2 reads the same data, the PVC is deleted, and nothing is left on the storage host or on
the nodes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from lab.topology import Lab
from tests.k8s.kube import Kube

pytestmark = [pytest.mark.lab, pytest.mark.k8s]

IMAGE = "docker.io/library/busybox:1.36"
DEVICE = "/dev/xvda"
MOUNT = "/data"


@dataclass(frozen=True)
class Profile:
    storage_class: str
    access_mode: str
    volume_mode: str  # Filesystem or Block
    size: str


PROFILES = [
    Profile("berth-iscsi-fs", "ReadWriteOnce", "Filesystem", "256Mi"),
    Profile("berth-iscsi-block-rwx", "ReadWriteMany", "Block", "64Mi"),
    Profile("berth-nfs", "ReadWriteMany", "Filesystem", "512Mi"),  # xfs needs 300 MiB
]


def pvc(name: str, p: Profile) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"storageClassName": p.storage_class, "accessModes": [p.access_mode], "volumeMode": p.volume_mode,
                 "resources": {"requests": {"storage": p.size}}},
    }  # fmt: skip


def pod(name: str, claim: str, node: str, p: Profile, script: str) -> dict:
    container: dict = {"name": "c", "image": IMAGE, "imagePullPolicy": "Never", "command": ["sh", "-c", script]}
    if p.volume_mode == "Block":
        container["volumeDevices"] = [{"name": "v", "devicePath": DEVICE}]
    else:
        container["volumeMounts"] = [{"name": "v", "mountPath": MOUNT}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                 "containers": [container], "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]},
    }  # fmt: skip


def write_script(p: Profile, token: str) -> str:
    if p.volume_mode == "Block":
        return f"printf '%-4096s' {token} | dd of={DEVICE} bs=4096 count=1 conv=fsync && echo wrote"
    return f"echo {token} > {MOUNT}/token && sync && echo wrote"


def read_script(p: Profile, token: str) -> str:
    if p.volume_mode == "Block":
        return f"dd if={DEVICE} bs=4096 count=1 2>/dev/null | grep -q {token} && echo read-ok"
    return f"grep -qx {token} {MOUNT}/token && echo read-ok"


def storage_leftovers(lab: Lab, volume_handle: str) -> str:
    """What the storage host still holds for a deleted volume: its LV, LIO objects, exports, fstab entries."""
    lv = volume_handle.rsplit("/", 1)[-1]
    script = (
        f"lvs --noheadings -o lv_name berth | grep -w {lv}; "
        f"ls /sys/kernel/config/target/iscsi 2>/dev/null | grep {lv}; "
        f"ls /sys/kernel/config/target/core/*/ 2>/dev/null | grep {lv}; "
        f"exportfs -v | grep {lv}; grep {lv} /etc/fstab /etc/exports.d/* 2>/dev/null; true"
    )
    return lab.run("storage", script).stdout.strip()


def node_leftovers(lab: Lab, node: str) -> str:
    """iSCSI sessions, multipath maps and Berth mounts still on a node once no pod uses a Berth volume."""
    script = (
        "iscsiadm -m session 2>/dev/null; multipath -l 2>/dev/null; "
        # kubelet's CSI staging (plugins/kubernetes.io/csi/...) and publish (pods/*/volumes/kubernetes.io~csi/...)
        "grep -E 'kubernetes.io/csi/|kubernetes.io~csi/' /proc/self/mountinfo; true"
    )
    return lab.run(node, script).stdout.strip()


@pytest.mark.parametrize("profile", PROFILES, ids=[p.storage_class for p in PROFILES])
def test_pvc_written_on_one_node_read_on_the_other(kube: Kube, profile: Profile) -> None:
    lab = kube.lab
    name = f"smoke-{profile.storage_class}"
    token = uuid.uuid4().hex
    kube.apply(pvc(name, profile))
    kube.wait_for(f"PVC {name} Bound", lambda: (kube.get("pvc", name) or {}).get("status", {}).get("phase")
                  == "Bound", timeout=300)  # fmt: skip
    pv_name = kube.get("pvc", name)["spec"]["volumeName"]
    handle = kube.get("pv", pv_name)["spec"]["csi"]["volumeHandle"]

    kube.apply(pod(f"{name}-writer", name, "node1", profile, write_script(profile, token)))
    kube.wait_pod_done(f"{name}-writer", timeout=600)
    kube.delete("pod", f"{name}-writer")

    kube.apply(pod(f"{name}-reader", name, "node2", profile, read_script(profile, token)))
    kube.wait_pod_done(f"{name}-reader", timeout=600)
    kube.delete("pod", f"{name}-reader")

    kube.delete("pvc", name)
    kube.wait_for(f"PV {pv_name} deleted", lambda: kube.get("pv", pv_name) is None, timeout=300)
    kube.wait_for("no VolumeAttachment left", lambda: not (kube.get("volumeattachments") or {"items": []})["items"],
                  timeout=300)  # fmt: skip
    assert storage_leftovers(lab, handle) == "", f"storage host still holds {handle}"
    for node in lab.node_names:
        assert node_leftovers(lab, node) == "", f"{node} still holds state after the volume was deleted"
