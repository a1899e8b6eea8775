"""deploy/: the Kubernetes manifests parse, agree with each other, and agree with Berth's own code.

No cluster is needed: each rule is a function that returns the problems it finds, run once on the real
manifests (must find none) and once on a deliberately broken copy (must find the break), so a rule that
silently stopped checking anything would fail here too.
"""

from __future__ import annotations

import copy
import posixpath
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from csi_driver import __version__
from csi_driver.cli import build_parser
from csi_driver.config import Config, ConfigError, parse_config
from csi_driver.services.controller import IGNORED_PARAMETER_PREFIX, KNOWN_PARAMETERS
from csi_driver.storage.iscsi import chap_from_secrets

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAMESPACE = "berth-system"
EXAMPLE_SUFFIX = "-example.yaml"  # shown to the operator, never applied (would overwrite real secrets)
CONTROLLER_SIDECARS = ("csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer")
CLUSTER_SCOPED = {"Namespace", "CSIDriver", "ClusterRole", "ClusterRoleBinding", "StorageClass", "VolumeSnapshotClass"}
CHAP_BLOCK = re.compile(r"^# BEGIN berth-iscsi-chap\n(?P<body>.*?)^# END berth-iscsi-chap$", re.M | re.S)

Obj = dict[str, Any]


# --- loading ---------------------------------------------------------------------------------------------------


def load_file(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def files() -> dict[str, list[Obj]]:
    return {path.name: load_file(path) for path in sorted(DEPLOY.glob("*.yaml")) if path.name != "kustomization.yaml"}


@pytest.fixture(scope="module")
def kustomization() -> Obj:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def applied(files: dict[str, list[Obj]], kustomization: Obj) -> list[Obj]:
    """What `kubectl apply -k deploy/` creates."""
    return [obj for name in kustomization["resources"] for obj in files[name]]


@pytest.fixture(scope="module")
def examples(files: dict[str, list[Obj]]) -> list[Obj]:
    return [obj for name, objs in files.items() if name.endswith(EXAMPLE_SUFFIX) for obj in objs]


@pytest.fixture(scope="module")
def config(applied: list[Obj]) -> Config:
    return parse_config(yaml.safe_load(config_text(applied)))


# --- helpers ---------------------------------------------------------------------------------------------------


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


def workload(objs: list[Obj], kind: str) -> Obj:
    return one(objs, kind)["spec"]["template"]["spec"]


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
    manifests = {n for n in file_names if n != "kustomization.yaml"}
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


def driver_name_problems(objs: list[Obj], chap_class: Obj | None = None) -> list[str]:
    drivers = find(objs, "CSIDriver")
    if len(drivers) != 1:
        return [f"expected one CSIDriver, found {len(drivers)}"]
    name = drivers[0]["metadata"]["name"]
    problems = []
    configured = parse_config(yaml.safe_load(config_text(objs))).driver_name
    if configured != name:
        problems.append(f"config driver_name {configured!r} != CSIDriver {name!r}")
    for sc in find(objs, "StorageClass") + ([chap_class] if chap_class else []):
        if sc["provisioner"] != name:
            problems.append(f"StorageClass {sc['metadata']['name']}: provisioner {sc['provisioner']!r}")
    for vsc in find(objs, "VolumeSnapshotClass"):
        if vsc["driver"] != name:
            problems.append(f"VolumeSnapshotClass {vsc['metadata']['name']}: driver {vsc['driver']!r}")
    for wl, spec in workloads(objs):
        for c in spec["containers"]:
            if flag(c, "driver-name") not in (None, name):
                problems.append(f"{c['name']}: --driver-name={flag(c, 'driver-name')}")
            registration = flag(c, "kubelet-registration-path")
            if registration is not None and f"/plugins/{name}/" not in registration:
                problems.append(f"{c['name']}: --kubelet-registration-path={registration} is not under plugins/{name}/")
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


def registration_problems(spec: Obj) -> list[str]:
    """kubelet dials --kubelet-registration-path on the host: it must be where Berth's socket really is."""
    berth = container(spec, "berth")
    socket_host_path = host_path_of(spec, berth, (flag(berth, "endpoint") or "").removeprefix("unix://"))
    if socket_host_path is None:
        return ["berth's socket is not on a hostPath volume: kubelet cannot reach it"]
    registrar = container(spec, "node-driver-registrar")
    problems = []
    if flag(registrar, "kubelet-registration-path") != socket_host_path:
        problems.append(
            f"--kubelet-registration-path={flag(registrar, 'kubelet-registration-path')}, "
            f"socket is at {socket_host_path} on the host"
        )
    if host_path_of(spec, registrar, "/registration") != "/var/lib/kubelet/plugins_registry":
        problems.append("node-driver-registrar: /registration is not the host's /var/lib/kubelet/plugins_registry")
    probe = registrar.get("livenessProbe", {}).get("exec", {}).get("command", [])
    if probe and f"--kubelet-registration-path={socket_host_path}" not in probe:
        problems.append("node-driver-registrar livenessProbe checks another registration path")
    return problems


def propagation_problems(objs: list[Obj]) -> list[str]:
    """Node berth mounts the host's /var/lib/kubelet at the same path, Bidirectional, privileged; nobody else."""
    problems = []
    node = workload(objs, "DaemonSet")
    berth = container(node, "berth")
    kubelet_mounts = [
        m
        for m in berth.get("volumeMounts", [])
        if volume(node, m["name"]).get("hostPath", {}).get("path", "").rstrip("/") == "/var/lib/kubelet"
    ]
    if len(kubelet_mounts) != 1:
        problems.append(f"node berth mounts the host's /var/lib/kubelet {len(kubelet_mounts)} times")
    for m in kubelet_mounts:
        if m.get("mountPropagation") != "Bidirectional":
            problems.append(f"node berth /var/lib/kubelet propagation is {m.get('mountPropagation', 'None')}")
        if m["mountPath"].rstrip("/") != "/var/lib/kubelet":
            problems.append(f"kubelet's paths are host paths: mount /var/lib/kubelet at itself, not {m['mountPath']}")
    if not berth.get("securityContext", {}).get("privileged"):
        problems.append("node berth is not privileged (Bidirectional propagation requires it)")
    for wl, spec in workloads(objs):
        for c in spec["containers"]:
            if wl is one(objs, "DaemonSet") and c is berth:
                continue
            for m in c.get("volumeMounts", []):
                if m.get("mountPropagation") == "Bidirectional":
                    problems.append(f"{wl['metadata']['name']}/{c['name']} needs no Bidirectional mount ({m['name']})")
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
            problems.append(f"{name}: backend {backend_name!r} is not in config.yaml")
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


def chap_class_text() -> str:
    match = CHAP_BLOCK.search((DEPLOY / "storageclasses.yaml").read_text())
    assert match, "storageclasses.yaml has no '# BEGIN berth-iscsi-chap' ... '# END berth-iscsi-chap' block"
    return "\n".join(re.sub(r"^# ?", "", line) for line in match["body"].splitlines())


# --- tests: the real manifests ---------------------------------------------------------------------------------


def test_every_yaml_file_parses_into_kubernetes_objects(files: dict[str, list[Obj]]) -> None:
    assert files, "deploy/ has no YAML files"
    for name, objs in files.items():
        assert objs, f"{name} holds no object"
        for obj in objs:
            assert isinstance(obj, dict), f"{name}: {obj!r} is not a mapping"
            assert {"apiVersion", "kind", "metadata"} <= obj.keys(), f"{name}: incomplete object {obj.get('kind')}"
            assert obj["metadata"].get("name"), f"{name}: a {obj['kind']} without a name"
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"


def test_kustomization_lists_every_manifest_and_no_example(kustomization: Obj) -> None:
    assert kustomization_problems(kustomization, {p.name for p in DEPLOY.iterdir() if p.is_file()}) == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_exactly_the_listed_objects(applied: list[Obj]) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def keys(objs: list[Obj]) -> list[tuple[str, str, str]]:
        return sorted((o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objs)

    assert keys(rendered) == keys(applied)


def test_objects_are_unique_and_namespaced_in_berth_system(applied: list[Obj], examples: list[Obj]) -> None:
    seen = set()
    for obj in applied + examples:
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, f"{key} defined twice"
        seen.add(key)
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], f"{key}: cluster-scoped objects take no namespace"
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{key} is not in {NAMESPACE}"
    assert one(applied, "Namespace")["metadata"]["name"] == NAMESPACE


def test_images_are_pinned(applied: list[Obj]) -> None:
    assert image_problems(applied) == []


def test_berth_image_tag_is_the_package_version(applied: list[Obj]) -> None:
    for _, spec in workloads(applied):
        image = container(spec, "berth")["image"]
        assert image.endswith(f":{__version__}"), f"{image} is not tagged {__version__}"
    sidecars = [c["image"] for _, spec in workloads(applied) for c in spec["containers"] if c["name"] != "berth"]
    assert all(image.startswith("registry.k8s.io/sig-storage/") for image in sidecars), sidecars


def test_driver_name_is_the_same_everywhere(applied: list[Obj]) -> None:
    chap_class = yaml.safe_load(chap_class_text())
    assert driver_name_problems(applied, chap_class) == []
    assert one(applied, "CSIDriver")["metadata"]["name"] == "berth.csi.io"


def test_csidriver_spec(applied: list[Obj]) -> None:
    spec = one(applied, "CSIDriver")["spec"]
    assert spec["attachRequired"] is True  # ControllerPublish does the LUN masking / export ACL
    assert spec["podInfoOnMount"] is False
    assert spec["fsGroupPolicy"] == "File"
    assert spec["volumeLifecycleModes"] == ["Persistent"]
    assert spec["requiresRepublish"] is False
    assert spec["seLinuxMount"] is False
    # No topology from NodeGetInfo -> no CSIStorageCapacity per node: the scheduler must not wait for them.
    assert spec["storageCapacity"] is False


def test_configmap_config_validates(applied: list[Obj], config: Config) -> None:
    assert config.backends, "the example config defines no backend"
    assert config.default_backend in config.backends
    assert {b.protocol for b in config.backends.values()} == {"iscsi", "nfs"}
    assert config.node.state_dir == "/var/lib/kubelet/plugins/berth.csi.io"


def test_config_ssh_files_come_from_the_ssh_secret(applied: list[Obj], examples: list[Obj], config: Config) -> None:
    controller = workload(applied, "Deployment")
    berth = container(controller, "berth")
    secret_example = one(examples, "Secret", "berth-ssh")
    for name, backend in config.backends.items():
        for path in (backend.host.ssh_identity_file, backend.host.ssh_known_hosts_file):
            assert path, f"backend {name}: SSH key and known_hosts must be configured"
            where = location(berth, path)
            assert where is not None, f"{path} is on no volume of the controller"
            ssh_volume = volume(controller, where[0])
            assert ssh_volume["secret"]["secretName"] == "berth-ssh"
            assert where[1] in {item["path"] for item in ssh_volume["secret"]["items"]}
            assert where[1] in secret_example["stringData"], f"secret-example.yaml has no key {where[1]}"
        assert backend.host.ssh_strict_host_key_checking == "yes"
    ssh_volume = volume(controller, "ssh")
    assert ssh_volume["secret"]["defaultMode"] == 0o400
    assert {item["key"] for item in ssh_volume["secret"]["items"]} == set(secret_example["stringData"])


def test_config_mount_matches_berth_config_flag(applied: list[Obj]) -> None:
    for wl, spec in workloads(applied):
        berth = container(spec, "berth")
        where = location(berth, flag(berth, "config") or "")
        assert where is not None, f"{wl['metadata']['name']}: --config is on no volume"
        assert volume(spec, where[0])["configMap"]["name"] == "berth-config"
        assert where[1] == "config.yaml"


@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_sidecars_use_the_socket_berth_serves(applied: list[Obj], kind: str) -> None:
    assert socket_problems(workload(applied, kind)) == []


def test_registrar_registers_the_socket_on_the_host(applied: list[Obj]) -> None:
    assert registration_problems(workload(applied, "DaemonSet")) == []


def test_kubelet_dir_is_bidirectional_on_node_berth_only(applied: list[Obj]) -> None:
    assert propagation_problems(applied) == []


def test_stage_records_live_on_the_host(applied: list[Obj], config: Config) -> None:
    node = workload(applied, "DaemonSet")
    assert host_path_of(node, container(node, "berth"), config.node.state_dir) == config.node.state_dir


def test_node_plugin_shares_the_hosts_namespaces_it_needs(applied: list[Obj]) -> None:
    node = workload(applied, "DaemonSet")
    assert node["hostNetwork"] is True  # iscsid/multipathd abstract sockets, NFS transports, node addresses
    assert node.get("hostPID", False) is False
    host_paths = {v["hostPath"]["path"] for v in node["volumes"] if "hostPath" in v}
    for path in (
        "/dev",
        "/sys",
        "/run/udev",
        "/lib/modules",
        "/etc/iscsi",
        "/var/lib/iscsi",
        "/run/lock",
        "/etc/multipath",
        "/etc/multipath.conf",
        "/var/lib/kubelet",
        "/var/lib/kubelet/plugins_registry",
    ):
        assert path in host_paths, f"node pod does not mount the host's {path}"
    berth = container(node, "berth")
    for path in ("/dev", "/sys", "/run/udev", "/lib/modules", "/etc/iscsi", "/run/lock"):
        assert host_path_of(node, berth, path) == path, f"node berth does not see the host's {path} at {path}"
    assert (
        location(berth, "/lib/modules")
        and next(m for m in berth["volumeMounts"] if m["mountPath"] == "/lib/modules").get("readOnly") is True
    )


def test_berth_arguments_parse_with_berths_cli(applied: list[Obj]) -> None:
    modes = {}
    for wl, spec in workloads(applied):
        berth = container(spec, "berth")
        args = build_parser().parse_args(berth["args"])
        modes[wl["kind"]] = args.mode
        assert args.log_format == "json"
        # Berth's node ID is "<initiator IQN>|<addresses>" from NodeGetInfo, not a Kubernetes node name.
        assert args.node_id is None, f"{wl['metadata']['name']}: no --node-id"
    assert modes == {"Deployment": "controller", "DaemonSet": "node"}


def test_controller_sidecars_elect_a_leader(applied: list[Obj]) -> None:
    controller_deployment = one(applied, "Deployment")
    spec = workload(applied, "Deployment")
    for name in CONTROLLER_SIDECARS:
        assert flag(container(spec, name), "leader-election") in ("", "true"), f"{name} without --leader-election"
    assert controller_deployment["spec"]["replicas"] >= 1
    provisioner = container(spec, "csi-provisioner")
    for wanted in ("extra-create-metadata", "enable-capacity"):
        assert flag(provisioner, wanted) == "", f"csi-provisioner without --{wanted}"
    assert flag(provisioner, "capacity-ownerref-level") == "2"
    assert flag(provisioner, "default-fstype") == "ext4"
    assert flag(provisioner, "timeout") == "120s"
    assert {e["name"] for e in provisioner["env"]} >= {"NAMESPACE", "POD_NAME"}  # needed by --enable-capacity
    assert flag(container(spec, "csi-resizer"), "handle-volume-inuse-error") == "false"


def test_liveness_probes_reach_the_livenessprobe_sidecar(applied: list[Obj]) -> None:
    for wl, spec in workloads(applied):
        berth = container(spec, "berth")
        port_name = berth["livenessProbe"]["httpGet"]["port"]
        port = next(p["containerPort"] for p in berth["ports"] if p["name"] == port_name)
        assert berth["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert flag(container(spec, "liveness-probe"), "health-port") == str(port), wl["metadata"]["name"]


def test_every_container_has_resources_and_a_security_context(applied: list[Obj]) -> None:
    for wl, spec in workloads(applied):
        for c in spec["containers"]:
            where = f"{wl['metadata']['name']}/{c['name']}"
            assert c["resources"]["requests"].keys() >= {"cpu", "memory"}, where
            assert "memory" in c["resources"]["limits"], where
            context = c["securityContext"]
            if wl["kind"] == "DaemonSet" and c["name"] == "berth":
                assert context["privileged"] is True
            else:
                assert not context.get("privileged"), f"{where} needs no privileges"
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["capabilities"]["drop"] == ["ALL"], where
                assert context["readOnlyRootFilesystem"] is True, where


def test_workloads_run_as_existing_service_accounts(applied: list[Obj]) -> None:
    assert service_account_problems(applied) == []
    names = {spec["serviceAccountName"] for _, spec in workloads(applied)}
    rbac = load_file(DEPLOY / "rbac.yaml")
    assert names <= {sa["metadata"]["name"] for sa in find(rbac, "ServiceAccount")}


def test_role_bindings_refer_to_existing_roles_and_accounts(applied: list[Obj]) -> None:
    assert binding_problems(applied) == []


def test_controller_rbac_covers_what_the_sidecars_need(applied: list[Obj]) -> None:
    def allowed(kind: str, group: str, resource: str, verb: str) -> bool:
        return any(
            group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
            for role in find(applied, kind)
            for rule in role["rules"]
        )

    for group, resource, verb in [
        ("", "persistentvolumes", "create"),  # provisioner
        ("storage.k8s.io", "volumeattachments", "patch"),  # attacher
        ("storage.k8s.io", "volumeattachments/status", "patch"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", "update"),  # snapshotter
        ("", "persistentvolumeclaims/status", "patch"),  # resizer
    ]:
        assert allowed("ClusterRole", group, resource, verb), f"no ClusterRole allows {verb} {resource}"
    for group, resource, verb in [
        ("coordination.k8s.io", "leases", "update"),  # --leader-election
        ("storage.k8s.io", "csistoragecapacities", "create"),  # --enable-capacity
        ("apps", "replicasets", "get"),  # --capacity-ownerref-level=2
        ("", "secrets", "get"),  # CHAP controller-publish secret, read by the attacher
    ]:
        assert allowed("Role", group, resource, verb), f"no Role in {NAMESPACE} allows {verb} {resource}"
    assert not allowed("ClusterRole", "", "secrets", "get"), "secrets stay namespaced (berth-system)"


def test_storage_classes_use_configured_backends_and_known_parameters(applied: list[Obj], config: Config) -> None:
    classes = find(applied, "StorageClass") + [yaml.safe_load(chap_class_text())]
    assert {sc["metadata"]["name"] for sc in classes} == {
        "berth-iscsi-block-rwx",
        "berth-iscsi-fs",
        "berth-nfs",
        "berth-iscsi-chap",
    }
    assert storage_class_problems(classes, config) == []
    for sc in classes:
        assert sc["allowVolumeExpansion"] is True
        assert sc["volumeBindingMode"] == "Immediate"
    assert one(applied, "StorageClass", "berth-iscsi-fs")["parameters"]["csi.storage.k8s.io/fstype"] == "ext4"
    assert one(applied, "VolumeSnapshotClass", "berth-snapshots")["deletionPolicy"] == "Delete"


def test_chap_example_class_and_secret_agree(examples: list[Obj]) -> None:
    chap_class = yaml.safe_load(chap_class_text())
    params = chap_class["parameters"]
    secret = one(examples, "Secret", "berth-chap")
    for side in ("controller-publish", "node-stage"):
        assert params[f"csi.storage.k8s.io/{side}-secret-name"] == secret["metadata"]["name"]
        assert params[f"csi.storage.k8s.io/{side}-secret-namespace"] == secret["metadata"]["namespace"]
    # The keys Berth reads: mutual CHAP with both directions set.
    chap = chap_from_secrets(secret["stringData"])
    assert chap is not None and chap.mutual_user, "berth-chap must be a complete mutual CHAP example"
    assert set(secret["stringData"]) == {
        "node.session.auth.username",
        "node.session.auth.password",
        "node.session.auth.username_in",
        "node.session.auth.password_in",
    }
    assert all("PLACEHOLDER" in value for value in secret["stringData"].values())


# --- tests: each rule catches the break it exists for ---------------------------------------------------------


def test_kustomization_rule_catches_missing_extra_and_example_files(kustomization: Obj) -> None:
    names = {p.name for p in DEPLOY.iterdir() if p.is_file()}
    broken = copy.deepcopy(kustomization)
    broken["resources"].remove("node.yaml")
    broken["resources"] += ["secret-example.yaml", "gone.yaml"]
    problems = kustomization_problems(broken, names | {"extra.yml"})
    assert any("node.yaml is in deploy/" in p for p in problems)
    assert any("gone.yaml" in p for p in problems)
    assert any("secret-example.yaml is an example" in p for p in problems)
    assert any("extra.yml" in p for p in problems)


def test_image_rule_catches_latest_and_untagged(applied: list[Obj]) -> None:
    broken = copy.deepcopy(applied)
    spec = workload(broken, "Deployment")
    container(spec, "csi-attacher")["image"] = "registry.k8s.io/sig-storage/csi-attacher:latest"
    container(spec, "csi-resizer")["image"] = "registry.k8s.io/sig-storage/csi-resizer"
    container(spec, "berth")["image"] = "localhost:5000/berth"  # a registry port is not a tag
    assert len(image_problems(broken)) == 3


def test_driver_name_rule_catches_a_mismatch(applied: list[Obj]) -> None:
    broken = copy.deepcopy(applied)
    one(broken, "StorageClass", "berth-nfs")["provisioner"] = "berth.csi.example"
    registrar = container(workload(broken, "DaemonSet"), "node-driver-registrar")
    registrar["args"] = [
        "--kubelet-registration-path=/var/lib/kubelet/plugins/other.csi.io/csi.sock"
        if a.startswith("--kubelet-registration-path")
        else a
        for a in registrar["args"]
    ]
    problems = driver_name_problems(broken)
    assert len(problems) == 2, problems


def test_socket_rules_catch_a_sidecar_on_another_socket(applied: list[Obj]) -> None:
    broken = copy.deepcopy(applied)
    spec = workload(broken, "Deployment")
    container(spec, "csi-snapshotter")["args"][0] = "--csi-address=/run/csi/socket"
    container(spec, "csi-attacher")["volumeMounts"] = []
    assert len(socket_problems(spec)) == 2
    node = workload(broken, "DaemonSet")
    volume(node, "plugin-dir")["hostPath"]["path"] = "/var/lib/kubelet/plugins/elsewhere"
    assert registration_problems(node)


def test_propagation_rule_catches_a_missing_or_misplaced_bidirectional(applied: list[Obj]) -> None:
    broken = copy.deepcopy(applied)
    berth = container(workload(broken, "DaemonSet"), "berth")
    next(m for m in berth["volumeMounts"] if m["name"] == "kubelet-dir")["mountPropagation"] = "HostToContainer"
    container(workload(broken, "DaemonSet"), "liveness-probe")["volumeMounts"][0]["mountPropagation"] = "Bidirectional"
    assert len(propagation_problems(broken)) == 2


def test_rbac_rules_catch_dangling_references(applied: list[Obj]) -> None:
    broken = copy.deepcopy(applied)
    workload(broken, "DaemonSet")["serviceAccountName"] = "berth-nodes"
    assert len(service_account_problems(broken)) == 1
    one(broken, "ClusterRoleBinding", "berth-external-attacher")["roleRef"]["name"] = "external-attacher-runner"
    one(broken, "RoleBinding", "berth-controller-leader-election")["subjects"][0]["namespace"] = "kube-system"
    problems = binding_problems(broken)
    assert any("missing ClusterRole external-attacher-runner" in p for p in problems)
    assert any("berth-external-attacher-runner is bound to nobody" in p for p in problems)
    assert any("kube-system/berth-controller missing" in p for p in problems)


def test_storage_class_rule_catches_unknown_parameters_and_backends(applied: list[Obj], config: Config) -> None:
    broken = copy.deepcopy(find(applied, "StorageClass"))
    broken[0]["parameters"]["pool"] = "fast"
    broken[1]["parameters"]["backend"] = "storage2"
    del broken[2]["parameters"]["csi.storage.k8s.io/fstype"]
    assert len(storage_class_problems(broken, config)) == 3


def test_config_check_catches_the_unquoted_yes(applied: list[Obj]) -> None:
    text = config_text(applied)
    assert 'ssh_strict_host_key_checking: "yes"' in text
    with pytest.raises(ConfigError, match="ssh_strict_host_key_checking"):
        parse_config(
            yaml.safe_load(text.replace('ssh_strict_host_key_checking: "yes"', "ssh_strict_host_key_checking: yes"))
        )
