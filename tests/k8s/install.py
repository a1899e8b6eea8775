"""Berth installed into the lab cluster with `helm install`, the way a storage admin installs it.

The chart is deploy/helm/berth with the values in values-lab.yaml (the lab's storage guest as the storage host);
the image refs come from the images the lab imported. The SSH key is the lab's and goes into a Secret, with the
storage guest's host key as known_hosts, as docs/deploy.md tells an admin to do. Used by the tests/k8s fixtures
and by e2e/run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from lab import config
from lab.topology import Lab
from tests.k8s.kube import Kube

NAMESPACE = "berth"
RELEASE = "berth"
CHART = config.REPO / "deploy" / "helm" / "berth"
VALUES = Path(__file__).with_name("values-lab.yaml")


def berth_image_ref(lab: Lab) -> tuple[str, str]:
    """(repository, tag) of the Berth image the lab imported."""
    assert lab.cluster
    images = json.loads((Path(lab.cluster.state["images"]) / "images.json").read_text())
    ref = next(r for img in images for r in img["refs"] if "/berth:" in r)
    repo, tag = ref.rsplit(":", 1)
    return repo, tag


def helm(lab: Lab, *args: str, timeout: float = 900) -> str:
    assert lab.cluster
    cp = lab.cluster.control_plane
    env = {**os.environ, "KUBECONFIG": str(cp.admin_kubeconfig), "HELM_CACHE_HOME": str(cp.d / "helm"),
           "HELM_CONFIG_HOME": str(cp.d / "helm"), "HELM_DATA_HOME": str(cp.d / "helm")}  # fmt: skip
    r = subprocess.run([str(cp.bin / "helm"), *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, f"helm {' '.join(args)}: {r.stderr}\n{r.stdout}"
    return r.stdout


def install_berth(lab: Lab) -> Kube:
    """`helm upgrade --install` Berth; returns once it is registered with every kubelet and its controller is
    ready."""
    k = Kube(lab)
    host_key = lab.run("storage", "cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2]
    ssh_secret = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "berth-ssh"},
        "stringData": {"id_ed25519": (lab.image / "id_ed25519").read_text(),
                       "known_hosts": f"198.18.0.1 {' '.join(host_key)}\n"},
    }  # fmt: skip
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": {
        "pod-security.kubernetes.io/enforce": "privileged"}}}  # fmt: skip
    k.apply(namespace)
    k.apply(ssh_secret, NAMESPACE)
    repo, tag = berth_image_ref(lab)
    helm(lab, "upgrade", "--install", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(VALUES),
         "--set", f"image.repository={repo}", "--set", f"image.tag={tag}")  # fmt: skip
    nodes = set(lab.node_names)

    def registered() -> bool:
        out = k.get("csinodes") or {"items": []}
        have = {n["metadata"]["name"] for n in out["items"]
                if any(d["name"] == "berth.csi.io" for d in n["spec"].get("drivers") or [])}  # fmt: skip
        return have >= nodes

    k.wait_for("Berth registered with every kubelet (CSINode)", registered, timeout=600, interval=5)
    k.wait_for("Berth controller ready", lambda: controller_ready(k), timeout=600, interval=5)
    return k


def controller_ready(k: Kube) -> bool:
    out = k.kubectl("get", "deployment", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=controller",
                    "-o", "json")  # fmt: skip
    items = json.loads(out)["items"]
    return bool(items) and all(d["status"].get("readyReplicas", 0) >= 1 for d in items)
