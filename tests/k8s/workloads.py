"""What the tests in the lab cluster share: the StorageClass profiles, PVC and pod manifests, and the audits of
the storage host and the nodes for anything a deleted volume left behind."""

from __future__ import annotations

from dataclasses import dataclass

from lab.topology import Lab

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


def pod(name: str, claim: str, node: str, p: Profile, script: str, restart: str = "Never") -> dict:
    container: dict = {"name": "c", "image": IMAGE, "imagePullPolicy": "Never", "command": ["sh", "-c", script]}
    if p.volume_mode == "Block":
        container["volumeDevices"] = [{"name": "v", "devicePath": DEVICE}]
    else:
        container["volumeMounts"] = [{"name": "v", "mountPath": MOUNT}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "restartPolicy": restart, "terminationGracePeriodSeconds": 1,
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
    """What the storage host still holds for a deleted volume: its LV, LIO objects, exports, fstab entries, mounts."""
    lv = volume_handle.rsplit("/", 1)[-1]
    script = (
        f"lvs --noheadings -o lv_name berth | grep -w {lv}; "
        f"ls /sys/kernel/config/target/iscsi 2>/dev/null | grep {lv}; "
        f"ls /sys/kernel/config/target/core/*/ 2>/dev/null | grep {lv}; "
        f"exportfs -v | grep {lv}; grep {lv} /etc/fstab /etc/exports.d/* /proc/mounts 2>/dev/null; true"
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
