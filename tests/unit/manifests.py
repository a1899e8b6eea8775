"""Reading Kubernetes manifests, and the cross-checks test_deploy.py and test_helm_chart.py run on them.

Each rule is a function that returns the problems it finds; the tests run it once on the real objects (must find
none) and once on a deliberately broken copy (must find the break), so a rule that silently stopped checking
anything would fail too.
"""

from __future__ import annotations

import importlib.util
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from csi_driver.config import Config, parse_config
from csi_driver.services.controller import IGNORED_PARAMETER_PREFIX, KNOWN_PARAMETERS

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "berth"
EXAMPLE_SUFFIX = "-example.yaml"  # shown to the operator, never applied (would overwrite real secrets)
CONTROLLER_SIDECARS = ("csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer")

Obj = dict[str, Any]


def _load_render():
    spec = importlib.util.spec_from_file_location("berth_deploy_render", DEPLOY / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()  # deploy/render.py: helm, the chart's rendering, the drift check
NAMESPACE = render.NAMESPACE


# --- loading and finding ---------------------------------------------------------------------------------------


def load_file(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def parse(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def config_text(objs: list[Obj]) -> str:
    return one(objs, "ConfigMap", "berth-config")["data"]["config.yaml"]


def workloads(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod spec) of every Deployment and DaemonSet."""
    for obj in objs:
        if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            yield obj, obj["spec"]["template"]["spec"]


def workload(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    return one(objs, kind, name)["spec"]["template"]["spec"]


def controller(objs: list[Obj]) -> Obj:
    return workload(objs, "Deployment", "berth-controller")


def node(objs: list[Obj]) -> Obj:
    return workload(objs, "DaemonSet", "berth-node")


def container(spec: Obj, name: str) -> Obj:
    matches = [c for c in spec["containers"] if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name}"
    return matches[0]


def flag(c: Obj, name: str) -> str | None:
    """Value of --name=value (or -name=value) in a container's args."""
    for arg in c.get("args", []):
        key, sep, value = arg.lstrip("-").partition("=")
        if key == name:
            return value if sep else ""
    return None


def volume(spec: Obj, name: str) -> Obj:
    return next(v for v in spec["volumes"] if v["name"] == name)


def location(c: Obj, path: str) -> tuple[str, str] | None:
    """(volume name, path inside that volume) of a path in a container, via its deepest volume mount."""
    best = None
    for mount in c.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if path == root or path.startswith(root + "/"):
            if best is None or len(root) > len(best[0]):
                best = (root, mount["name"], mount.get("subPath", ""))
    if best is None:
        return None
    root, name, sub_path = best
    return name, posixpath.normpath(posixpath.join(sub_path, posixpath.relpath(path, root)))


def berth_socket(spec: Obj) -> tuple[str, str] | None:
    endpoint = flag(container(spec, "berth"), "endpoint") or ""
    assert endpoint.startswith("unix://"), f"berth --endpoint {endpoint!r} is not a unix socket"
    return location(container(spec, "berth"), endpoint.removeprefix("unix://"))


def host_path_of(spec: Obj, c: Obj, path: str) -> str | None:
    """The host path behind a container path, when it lies on a hostPath volume."""
    where = location(c, path)
    if where is None or "hostPath" not in volume(spec, where[0]):
        return None
    return posixpath.normpath(posixpath.join(volume(spec, where[0])["hostPath"]["path"], where[1]))


# --- rules: each returns the problems it finds ----------------------------------------------------------------


def kustomization_problems(kustomization: Obj, file_names: set[str]) -> list[str]:
    listed = kustomization.get("resources", [])
    problems = [f"listed twice: {name}" for name in sorted({n for n in listed if listed.count(n) > 1})]
    manifests = {n for n in file_names if n.endswith((".yaml", ".yml")) and n != "kustomization.yaml"}
    for name in sorted(manifests - set(listed)):
        if not name.endswith(EXAMPLE_SUFFIX):
            problems.append(f"{name} is in deploy/ but not in kustomization.yaml")
    for name in sorted(set(listed) - manifests):
        problems.append(f"kustomization.yaml lists {name}, which is not a YAML file in deploy/")
    for name in sorted(n for n in listed if n.endswith(EXAMPLE_SUFFIX)):
        problems.append(f"{name} is an example and must not be applied")
    problems += [f"{name}: use .yaml" for name in sorted(file_names) if name.endswith(".yml")]
    return problems


def image_problems(objs: list[Obj]) -> list[str]:
    problems = []
    for wl, spec in workloads(objs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            image = c.get("image", "")
            last = image.rsplit("/", 1)[-1]
            if "@sha256:" in last:
                continue
            name, sep, tag = last.partition(":")
            if not sep or not tag:
                problems.append(f"{wl['metadata']['name']}/{c['name']}: image {image!r} has no tag")
            elif tag == "latest":
                problems.append(f"{wl['metadata']['name']}/{c['name']}: image {image!r} is not pinned")
    return problems


def driver_name_problems(objs: list[Obj]) -> list[str]:
    drivers = find(objs, "CSIDriver")
    if len(drivers) != 1:
        return [f"expected one CSIDriver, found {len(drivers)}"]
    name = drivers[0]["metadata"]["name"]
    problems = []
    configured = parse_config(yaml.safe_load(config_text(objs))).driver_name
    if configured != name:
        problems.append(f"config driver_name {configured!r} != CSIDriver {name!r}")
    for sc in find(objs, "StorageClass"):
        if sc["provisioner"] != name:
            problems.append(f"StorageClass {sc['metadata']['name']}: provisioner {sc['provisioner']!r}")
    for vsc in find(objs, "VolumeSnapshotClass"):
        if vsc["driver"] != name:
            problems.append(f"VolumeSnapshotClass {vsc['metadata']['name']}: driver {vsc['driver']!r}")
    for wl, spec in workloads(objs):
        for c in spec["containers"]:
            if flag(c, "driver-name") not in (None, name):
                problems.append(f"{c['name']}: --driver-name={flag(c, 'driver-name')}")
            kubelet_endpoint = flag(c, "kubelet-csi-endpoint")
            if kubelet_endpoint is not None and f"/plugins/{name}/" not in kubelet_endpoint:
                problems.append(f"{c['name']}: --kubelet-csi-endpoint={kubelet_endpoint} is not under plugins/{name}/")
        for v in spec.get("volumes", []):
            path = v.get("hostPath", {}).get("path", "")
            if "/plugins/" in path and posixpath.basename(path) not in (name, "plugins_registry", "plugins"):
                problems.append(f"{wl['metadata']['name']}: plugin hostPath {path} is not named after {name}")
    return problems


def socket_problems(spec: Obj) -> list[str]:
    """Every other container reaches Berth's socket through the same volume and path Berth serves it on."""
    socket = berth_socket(spec)
    if socket is None:
        return ["berth's --endpoint is on no volume mount: sidecars cannot share it"]
    problems = []
    for c in spec["containers"]:
        if c["name"] == "berth":
            continue
        address = flag(c, "csi-address")
        if address is None:
            problems.append(f"{c['name']}: no --csi-address")
        elif location(c, address) != socket:
            problems.append(f"{c['name']}: --csi-address={address} is {location(c, address)}, berth serves {socket}")
    return problems


def registration_problems(spec: Obj, kubelet_dir: str) -> list[str]:
    """Berth registers with kubelet itself: the registration dir is kubelet's, the socket path it names is real."""
    berth = container(spec, "berth")
    socket_host_path = host_path_of(spec, berth, (flag(berth, "endpoint") or "").removeprefix("unix://"))
    if socket_host_path is None:
        return ["berth's socket is not on a hostPath volume: kubelet cannot reach it"]
    problems = []
    told = flag(berth, "kubelet-csi-endpoint")
    if told != socket_host_path:
        problems.append(f"--kubelet-csi-endpoint={told}, but the socket is at {socket_host_path} on the host")
    registration_dir = flag(berth, "kubelet-registration-dir")
    if registration_dir is None:
        problems.append("node berth has no --kubelet-registration-dir: kubelet would never find it")
    elif host_path_of(spec, berth, registration_dir) != f"{kubelet_dir}/plugins_registry":
        problems.append(
            f"--kubelet-registration-dir={registration_dir} is not the host's {kubelet_dir}/plugins_registry"
        )
    return problems


def propagation_problems(objs: list[Obj], kubelet_dir: str) -> list[str]:
    """Node berth mounts the host's kubelet dir at the same path, Bidirectional, privileged; nobody else."""
    problems = []
    node_spec = node(objs)
    berth = container(node_spec, "berth")
    kubelet_mounts = [
        m
        for m in berth.get("volumeMounts", [])
        if volume(node_spec, m["name"]).get("hostPath", {}).get("path", "").rstrip("/") == kubelet_dir
    ]
    if len(kubelet_mounts) != 1:
        problems.append(f"node berth mounts the host's {kubelet_dir} {len(kubelet_mounts)} times")
    for m in kubelet_mounts:
        if m.get("mountPropagation") != "Bidirectional":
            problems.append(f"node berth {kubelet_dir} propagation is {m.get('mountPropagation', 'None')}")
        if m["mountPath"].rstrip("/") != kubelet_dir:
            problems.append(f"kubelet's paths are host paths: mount {kubelet_dir} at itself, not {m['mountPath']}")
    if not berth.get("securityContext", {}).get("privileged"):
        problems.append("node berth is not privileged (Bidirectional propagation requires it)")
    for wl, spec in workloads(objs):
        for c in spec["containers"]:
            if c is berth:
                continue
            for m in c.get("volumeMounts", []):
                if m.get("mountPropagation") == "Bidirectional":
                    problems.append(f"{wl['metadata']['name']}/{c['name']} needs no Bidirectional mount ({m['name']})")
    return problems


def health_problems(spec: Obj) -> list[str]:
    """kubelet's liveness probe reaches the port Berth serves /healthz on."""
    berth = container(spec, "berth")
    probe = berth.get("livenessProbe", {}).get("httpGet")
    if probe is None:
        return ["berth has no httpGet livenessProbe"]
    ports = {p["name"]: p["containerPort"] for p in berth.get("ports", [])}
    port = ports.get(probe["port"], probe["port"])
    problems = []
    if str(port) != flag(berth, "health-port"):
        problems.append(f"livenessProbe port {probe['port']} ({port}) != --health-port={flag(berth, 'health-port')}")
    if probe.get("path") != "/healthz":
        problems.append(f"livenessProbe path {probe.get('path')}")
    return problems


def service_account_problems(objs: list[Obj]) -> list[str]:
    accounts = {(sa["metadata"].get("namespace"), sa["metadata"]["name"]) for sa in find(objs, "ServiceAccount")}
    problems = []
    for wl, spec in workloads(objs):
        wanted = (wl["metadata"].get("namespace"), spec.get("serviceAccountName", "default"))
        if wanted not in accounts:
            problems.append(f"{wl['kind']} {wl['metadata']['name']} runs as missing ServiceAccount {wanted}")
    return problems


def binding_problems(objs: list[Obj]) -> list[str]:
    accounts = {(sa["metadata"].get("namespace"), sa["metadata"]["name"]) for sa in find(objs, "ServiceAccount")}
    cluster_roles = {r["metadata"]["name"] for r in find(objs, "ClusterRole")}
    roles = {(r["metadata"].get("namespace"), r["metadata"]["name"]) for r in find(objs, "Role")}
    problems, bound = [], set()
    for binding in find(objs, "ClusterRoleBinding") + find(objs, "RoleBinding"):
        where = f"{binding['kind']} {binding['metadata']['name']}"
        ref = binding["roleRef"]
        if ref.get("apiGroup") != "rbac.authorization.k8s.io":
            problems.append(f"{where}: roleRef apiGroup {ref.get('apiGroup')!r}")
        if ref["kind"] == "ClusterRole":
            known = ref["name"] in cluster_roles
            bound.add(("ClusterRole", None, ref["name"]))
        elif ref["kind"] == "Role" and binding["kind"] == "RoleBinding":
            known = (binding["metadata"].get("namespace"), ref["name"]) in roles
            bound.add(("Role", binding["metadata"].get("namespace"), ref["name"]))
        else:
            known = False
        if not known:
            problems.append(f"{where}: refers to missing {ref['kind']} {ref['name']}")
        for subject in binding.get("subjects", []):
            if subject["kind"] != "ServiceAccount":
                problems.append(f"{where}: subject {subject['kind']} {subject['name']} is not a ServiceAccount")
            elif (subject.get("namespace"), subject["name"]) not in accounts:
                problems.append(f"{where}: subject ServiceAccount {subject.get('namespace')}/{subject['name']} missing")
    for name in sorted(cluster_roles):
        if ("ClusterRole", None, name) not in bound:
            problems.append(f"ClusterRole {name} is bound to nobody")
    for namespace, name in sorted(roles):
        if ("Role", namespace, name) not in bound:
            problems.append(f"Role {namespace}/{name} is bound to nobody")
    return problems


def storage_class_problems(classes: list[Obj], config: Config) -> list[str]:
    problems = []
    for sc in classes:
        name, params = sc["metadata"]["name"], sc.get("parameters", {})
        unknown = sorted(k for k in params if k not in KNOWN_PARAMETERS and not k.startswith(IGNORED_PARAMETER_PREFIX))
        if unknown:
            problems.append(f"{name}: Berth would reject parameters {unknown}")
        backend_name = params.get("backend") or config.default_backend
        backend = config.backends.get(backend_name or "")
        if backend is None:
            problems.append(f"{name}: backend {backend_name!r} is not in Berth's config")
            continue
        fs_type = params.get("csi.storage.k8s.io/fstype")
        if backend.protocol == "nfs" and fs_type != "nfs":
            # Without it the provisioner's --default-fstype=ext4 would ask for ext4 on an NFS volume.
            problems.append(f"{name}: NFS class needs csi.storage.k8s.io/fstype: nfs, has {fs_type!r}")
        if backend.protocol == "iscsi" and fs_type not in (None, "ext4", "xfs"):
            problems.append(f"{name}: fstype {fs_type!r} on iSCSI")
        expected_protocol = "nfs" if "nfs" in name else "iscsi"
        if backend.protocol != expected_protocol:
            problems.append(f"{name}: named for {expected_protocol} but backend {backend_name} is {backend.protocol}")
    return problems
