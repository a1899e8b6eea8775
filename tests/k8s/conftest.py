"""Berth installed into the lab cluster with `helm install`, the way a storage admin installs it.

The chart is deploy/helm/berth with the values in values-lab.yaml (the lab's storage guest as the storage host);
the image refs come from the images the lab imported. The SSH key is the lab's and goes into a Secret, with the
storage guest's host key as known_hosts, as docs/deploy.md tells an admin to do.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import config
from lab.topology import Lab
from tests.k8s.kube import Kube

NAMESPACE = "berth"
RELEASE = "berth"
CHART = config.REPO / "deploy" / "helm" / "berth"
VALUES = Path(__file__).with_name("values-lab.yaml")
ARTIFACTS = config.REPO / "artifacts" / "k8s"
_kube: Kube | None = None


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


@pytest.fixture(scope="session")
def kube(kube_lab: Lab) -> Iterator[Kube]:
    """The cluster with Berth installed by helm and registered on every node."""
    global _kube
    k = Kube(kube_lab)
    _kube = k
    host_key = kube_lab.run("storage", "cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2]
    ssh_secret = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "berth-ssh"},
        "stringData": {"id_ed25519": (kube_lab.image / "id_ed25519").read_text(),
                       "known_hosts": f"198.18.0.1 {' '.join(host_key)}\n"},
    }  # fmt: skip
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": {
        "pod-security.kubernetes.io/enforce": "privileged"}}}  # fmt: skip
    k.apply(namespace)
    k.apply(ssh_secret, NAMESPACE)
    repo, tag = berth_image_ref(kube_lab)
    helm(kube_lab, "upgrade", "--install", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(VALUES),
         "--set", f"image.repository={repo}", "--set", f"image.tag={tag}")  # fmt: skip
    nodes = set(kube_lab.node_names)

    def registered() -> bool:
        out = k.get("csinodes") or {"items": []}
        have = {n["metadata"]["name"] for n in out["items"]
                if any(d["name"] == "berth.csi.io" for d in n["spec"].get("drivers") or [])}  # fmt: skip
        return have >= nodes

    k.wait_for("Berth registered with every kubelet (CSINode)", registered, timeout=600, interval=5)
    k.wait_for("Berth controller ready", lambda: controller_ready(k), timeout=600, interval=5)
    yield k
    _kube = None


def controller_ready(k: Kube) -> bool:
    out = k.kubectl("get", "deployment", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=controller",
                    "-o", "json")  # fmt: skip
    items = json.loads(out)["items"]
    return bool(items) and all(d["status"].get("readyReplicas", 0) >= 1 for d in items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.failed and report.when in ("setup", "call") and _kube is not None:
        dest = ARTIFACTS / re.sub(r"[^\w.-]+", "_", item.nodeid).strip("_")
        try:
            _kube.save_evidence(dest)
            report.sections.append(("k8s artifacts", f"events, objects and Berth/sidecar logs in {dest}"))
        except Exception as e:  # noqa: BLE001 - never mask the test's own failure
            report.sections.append(("k8s artifacts", f"collecting failed: {e}"))
    return report
