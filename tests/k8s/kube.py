"""Driving the lab cluster from tests: kubectl with JSON, bounded waits that fail with the evidence attached."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lab.topology import Lab
from tests.lab.helpers import wait_for

CRICTL = "/opt/kube/bin/crictl"


class WaitFailed(AssertionError):
    pass


class Kube:
    def __init__(self, lab: Lab):
        assert lab.cluster, "the lab runs no Kubernetes"
        self.lab = lab
        self.cp = lab.cluster.control_plane

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> str:
        return self.cp.kubectl(*args, input=input, check=check, timeout=timeout).stdout

    def apply(self, manifest: dict | list[dict], namespace: str = "default") -> None:
        items = manifest if isinstance(manifest, list) else [manifest]
        self.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                            "items": items}))  # fmt: skip

    def get(self, kind: str, name: str = "", namespace: str = "default") -> dict | None:
        """The object as JSON, or None if it does not exist."""
        args = ["get", kind, *([name] if name else []), "-n", namespace, "-o", "json", "--ignore-not-found"]
        out = self.kubectl(*args)
        return json.loads(out) if out.strip() else None

    def wait_for(self, what: str, probe: Callable[[], object], timeout: float, interval: float = 2) -> object:
        """Poll probe() until it returns something truthy; fail after `timeout` s with the cluster's evidence."""
        try:
            return wait_for(probe, timeout, interval, what)
        except AssertionError as timed_out:
            raise WaitFailed(f"{timed_out}\n{self.evidence()}") from None

    def pod_phase(self, name: str, namespace: str = "default") -> str:
        pod = self.get("pod", name, namespace)
        return pod["status"].get("phase", "") if pod else "Gone"

    def wait_pod_done(self, name: str, timeout: float, namespace: str = "default") -> None:
        """Wait until the pod Succeeded; a Failed pod fails at once with its logs."""
        phase = self.wait_for(f"pod {name} finished",
                              lambda: self.pod_phase(name, namespace) in ("Succeeded", "Failed")
                              and self.pod_phase(name, namespace), timeout)  # fmt: skip
        if phase != "Succeeded":
            raise WaitFailed(f"pod {name} {phase}\n{self.evidence()}")

    def delete(self, kind: str, name: str, namespace: str = "default", timeout: float = 300) -> None:
        self.kubectl("delete", kind, name, "-n", namespace, "--ignore-not-found", "--wait=false")
        self.wait_for(f"{kind} {name} deleted", lambda: self.get(kind, name, namespace) is None, timeout)

    # ---- evidence for a failed wait -------------------------------------------------------------------

    def evidence(self) -> str:
        """Events, objects and the Berth and sidecar logs (through crictl: the apiserver cannot reach kubelets)."""
        parts = []
        for title, args in [
            ("events", ["get", "events", "-A", "--sort-by=.lastTimestamp"]),
            ("pods", ["get", "pods", "-A", "-o", "wide"]),
            ("pvc/pv/volumeattachments", ["get", "pvc,pv,volumeattachments", "-A"]),
        ]:
            parts.append(f"--- {title}\n{self.cp.kubectl(*args, check=False).stdout[-6000:]}")
        for node in self.lab.node_names:
            parts.append(f"--- {node}: containers\n{self.node_logs(node, tail=60)}")
        return "\n".join(parts)

    def node_logs(self, node: str, tail: int = 200) -> str:
        """Each Berth-related container's last log lines on one node."""
        script = (
            f"for id in $({CRICTL} ps -a -q); do "
            f"name=$({CRICTL} inspect -o go-template --template '{{{{.status.metadata.name}}}}' $id); "
            'case "$name" in berth*|csi-*|snapshot-*) '
            f'echo "=== $name $id"; {CRICTL} logs --tail {tail} $id 2>&1;; esac; done'
        )
        return self.lab.run(node, script, check=False, timeout=60).stdout[-20000:]

    def save_evidence(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "cluster.txt").write_text(self.evidence())
        for node in self.lab.node_names:
            (dest / f"{node}.containers.log").write_text(self.node_logs(node, tail=2000))
        for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
            src = self.cp.d / f"{name}.log"
            if src.exists():
                (dest / f"{name}.log").write_text(src.read_text(errors="replace")[-200000:])
