"""deploy/: the manifests `kubectl apply -k deploy/` creates (the Helm chart rendered with its default values;
test_helm_chart.py keeps them equal to a fresh render) parse, agree with each other, and agree with Berth's own
code. No cluster and no helm needed; the rules are in manifests.py.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import pytest
import yaml

from csi_driver import __version__
from csi_driver.cli import build_parser
from csi_driver.config import Config, ConfigError, parse_config
from csi_driver.storage.iscsi import chap_from_secrets
from lab import kube_build
from tests.unit.manifests import (
    CONTROLLER_SIDECARS,
    DEPLOY,
    EXAMPLE_SUFFIX,
    NAMESPACE,
    Obj,
    binding_problems,
    config_text,
    container,
    controller,
    driver_name_problems,
    find,
    flag,
    health_problems,
    host_path_of,
    image_problems,
    kustomization_problems,
    load_file,
    location,
    node,
    one,
    parse,
    propagation_problems,
    registration_problems,
    service_account_problems,
    socket_problems,
    storage_class_problems,
    volume,
    workload,
    workloads,
)

CLUSTER_SCOPED = {
    "Namespace",
    "CSIDriver",
    "ClusterRole",
    "ClusterRoleBinding",
    "StorageClass",
    "VolumeSnapshotClass",
    "StorageProfile",
}


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


# --- the manifests ---------------------------------------------------------------------------------------------


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


def kubectl() -> str | None:
    lab_kubectl = kube_build.bin_dir() / "kubectl"
    return str(lab_kubectl) if lab_kubectl.is_file() else shutil.which("kubectl")


@pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed")
def test_kustomize_builds_exactly_the_listed_objects(applied: list[Obj]) -> None:
    result = subprocess.run(
        [str(kubectl()), "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = parse(result.stdout)

    def keys(objs: list[Obj]) -> list[tuple[str, str, str]]:
        return sorted((o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objs)

    assert keys(rendered) == keys(applied)


def test_objects_are_unique_and_namespaced_in_berths_namespace(applied: list[Obj], examples: list[Obj]) -> None:
    seen = set()
    for obj in applied + examples:
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, f"{key} defined twice"
        seen.add(key)
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], f"{key}: cluster-scoped objects take no namespace"
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{key} is not in {NAMESPACE}"


def test_namespace_allows_the_privileged_node_plugin(applied: list[Obj]) -> None:
    namespace = one(applied, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_images_are_pinned(applied: list[Obj]) -> None:
    assert image_problems(applied) == []


def test_berth_image_tag_is_the_package_version(applied: list[Obj]) -> None:
    for _, spec in workloads(applied):
        image = container(spec, "berth")["image"]
        assert image.endswith(f":{__version__}"), f"{image} is not tagged {__version__}"
    sidecars = [c["image"] for _, spec in workloads(applied) for c in spec["containers"] if c["name"] != "berth"]
    assert all(image.startswith("registry.k8s.io/sig-storage/") for image in sidecars), sidecars


def test_berth_does_its_own_registration_and_health_checks(applied: list[Obj]) -> None:
    """No node-driver-registrar, no livenessprobe: Berth serves both (the module proxy has neither)."""
    assert [c["name"] for c in node(applied)["containers"]] == ["berth"]
    assert [c["name"] for c in controller(applied)["containers"]] == ["berth", *CONTROLLER_SIDECARS]


def test_driver_name_is_the_same_everywhere(applied: list[Obj]) -> None:
    assert driver_name_problems(applied) == []
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


def test_configmap_config_validates(config: Config) -> None:
    assert config.backends, "the example config defines no backend"
    assert config.default_backend in config.backends
    assert {b.protocol for b in config.backends.values()} == {"iscsi", "nfs"}
    assert config.node.state_dir == "/var/lib/kubelet/plugins/berth.csi.io"


def test_config_ssh_files_come_from_the_ssh_secret(applied: list[Obj], examples: list[Obj], config: Config) -> None:
    controller_spec = controller(applied)
    berth = container(controller_spec, "berth")
    secret_example = one(examples, "Secret", "berth-ssh")
    for name, backend in config.backends.items():
        for path in (backend.host.ssh_identity_file, backend.host.ssh_known_hosts_file):
            assert path, f"backend {name}: SSH key and known_hosts must be configured"
            where = location(berth, path)
            assert where is not None, f"{path} is on no volume of the controller"
            ssh_volume = volume(controller_spec, where[0])
            assert ssh_volume["secret"]["secretName"] == "berth-ssh"
            assert where[1] in {item["path"] for item in ssh_volume["secret"]["items"]}
            assert where[1] in secret_example["stringData"], f"secret-example.yaml has no key {where[1]}"
        assert backend.host.ssh_strict_host_key_checking == "yes"
    ssh_volume = volume(controller_spec, "ssh")
    assert ssh_volume["secret"]["defaultMode"] == 0o400
    assert {item["key"] for item in ssh_volume["secret"]["items"]} == set(secret_example["stringData"])


def test_config_mount_matches_berth_config_flag(applied: list[Obj]) -> None:
    for wl, spec in workloads(applied):
        berth = container(spec, "berth")
        where = location(berth, flag(berth, "config") or "")
        assert where is not None, f"{wl['metadata']['name']}: --config is on no volume"
        assert volume(spec, where[0])["configMap"]["name"] == "berth-config"
        assert where[1] == "config.yaml"


def test_sidecars_use_the_socket_berth_serves(applied: list[Obj]) -> None:
    assert socket_problems(controller(applied)) == []


def test_berth_registers_the_socket_kubelet_can_reach(applied: list[Obj]) -> None:
    assert registration_problems(node(applied), "/var/lib/kubelet") == []


def test_kubelet_dir_is_bidirectional_on_node_berth_only(applied: list[Obj]) -> None:
    assert propagation_problems(applied, "/var/lib/kubelet") == []


def test_stage_records_live_on_the_host(applied: list[Obj], config: Config) -> None:
    node_spec = node(applied)
    assert host_path_of(node_spec, container(node_spec, "berth"), config.node.state_dir) == config.node.state_dir


def test_node_plugin_shares_the_hosts_namespaces_it_needs(applied: list[Obj]) -> None:
    node_spec = node(applied)
    assert node_spec["hostNetwork"] is True  # iscsid/multipathd abstract sockets, NFS transports, node addresses
    assert node_spec.get("hostPID", False) is False
    host_paths = {v["hostPath"]["path"] for v in node_spec["volumes"] if "hostPath" in v}
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
    berth = container(node_spec, "berth")
    for path in ("/dev", "/sys", "/run/udev", "/lib/modules", "/etc/iscsi", "/run/lock"):
        assert host_path_of(node_spec, berth, path) == path, f"node berth does not see the host's {path} at {path}"
    assert next(m for m in berth["volumeMounts"] if m["mountPath"] == "/lib/modules").get("readOnly") is True


def test_berth_arguments_are_flags_berth_knows(applied: list[Obj]) -> None:
    modes = {}
    for wl, spec in workloads(applied):
        berth = container(spec, "berth")
        args, unknown = build_parser().parse_known_args(berth["args"])
        assert unknown == [], f"{wl['metadata']['name']}: berth does not know {unknown}"
        modes[wl["kind"]] = args.mode
        assert args.log_format == "json"
        # Berth's node ID is "<initiator IQN>|<addresses>" from NodeGetInfo, not a Kubernetes node name.
        assert args.node_id is None, f"{wl['metadata']['name']}: no --node-id"
    assert modes == {"Deployment": "controller", "DaemonSet": "node"}


def test_controller_sidecars_elect_a_leader(applied: list[Obj]) -> None:
    assert one(applied, "Deployment", "berth-controller")["spec"]["replicas"] >= 1
    spec = controller(applied)
    for name in CONTROLLER_SIDECARS:
        assert flag(container(spec, name), "leader-election") in ("", "true"), f"{name} without --leader-election"
        # Not the sidecars' 10 s: a lease update that waits on a busy API server must not end the sidecar.
        assert flag(container(spec, name), "leader-election-renew-deadline") == "40s", name
    provisioner = container(spec, "csi-provisioner")
    for wanted in ("extra-create-metadata", "enable-capacity"):
        assert flag(provisioner, wanted) == "", f"csi-provisioner without --{wanted}"
    assert flag(provisioner, "capacity-ownerref-level") == "2"
    assert flag(provisioner, "default-fstype") == "ext4"
    assert flag(provisioner, "timeout") == "120s"
    assert {e["name"] for e in provisioner["env"]} >= {"NAMESPACE", "POD_NAME"}  # needed by --enable-capacity
    assert flag(container(spec, "csi-resizer"), "handle-volume-inuse-error") == "false"
    assert flag(container(spec, "csi-snapshotter"), "feature-gates") == "CSIVolumeGroupSnapshot=false"


@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_liveness_probes_reach_berths_health_port(applied: list[Obj], kind: str) -> None:
    assert health_problems(workload(applied, kind)) == []


def test_health_ports_are_9808_in_the_pod_and_9809_on_the_host(applied: list[Obj]) -> None:
    assert flag(container(controller(applied), "berth"), "health-port") == "9808"
    assert flag(container(node(applied), "berth"), "health-port") == "9809"  # hostNetwork: clear of others' 9808


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
    assert {spec["serviceAccountName"] for _, spec in workloads(applied)} == {"berth-controller", "berth-node"}


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
    assert not allowed("ClusterRole", "", "secrets", "get"), "secrets stay namespaced"


def test_storage_classes_use_configured_backends_and_known_parameters(applied: list[Obj], config: Config) -> None:
    classes = find(applied, "StorageClass")
    assert {sc["metadata"]["name"] for sc in classes} == {"berth-iscsi-block-rwx", "berth-iscsi-fs", "berth-nfs"}
    assert storage_class_problems(classes, config) == []
    for sc in classes:
        assert sc["allowVolumeExpansion"] is True
        assert sc["volumeBindingMode"] == "Immediate"
        assert sc["reclaimPolicy"] == "Delete"
    assert one(applied, "StorageClass", "berth-iscsi-fs")["parameters"]["csi.storage.k8s.io/fstype"] == "ext4"
    assert one(applied, "VolumeSnapshotClass", "berth-snapshots")["deletionPolicy"] == "Delete"


def test_chap_example_secret_is_complete(examples: list[Obj]) -> None:
    secret = one(examples, "Secret", "berth-chap")
    chap = chap_from_secrets(secret["stringData"])
    assert chap is not None and chap.mutual_user, "berth-chap must be a complete mutual CHAP example"
    assert set(secret["stringData"]) == {
        "node.session.auth.username",
        "node.session.auth.password",
        "node.session.auth.username_in",
        "node.session.auth.password_in",
    }
    assert all("PLACEHOLDER" in value for value in secret["stringData"].values())


# --- each rule catches the break it exists for ----------------------------------------------------------------


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
    spec = controller(broken)
    container(spec, "csi-attacher")["image"] = "registry.k8s.io/sig-storage/csi-attacher:latest"
    container(spec, "csi-resizer")["image"] = "registry.k8s.io/sig-storage/csi-resizer"
    container(spec, "berth")["image"] = "localhost:5000/berth"  # a registry port is not a tag
    assert len(image_problems(broken)) == 3


def test_driver_name_rule_catches_a_mismatch(applied: list[Obj]) -> None:
    broken = copy.deepcopy(applied)
    one(broken, "StorageClass", "berth-nfs")["provisioner"] = "berth.csi.example"
    berth = container(node(broken), "berth")
    berth["args"] = [
        "--kubelet-csi-endpoint=/var/lib/kubelet/plugins/other.csi.io/csi.sock"
        if a.startswith("--kubelet-csi-endpoint")
        else a
        for a in berth["args"]
    ]
    problems = driver_name_problems(broken)
    assert len(problems) == 2, problems


def test_socket_and_registration_rules_catch_a_socket_elsewhere(applied: list[Obj]) -> None:
    broken = copy.deepcopy(applied)
    spec = controller(broken)
    container(spec, "csi-snapshotter")["args"][0] = "--csi-address=/run/csi/socket"
    container(spec, "csi-attacher")["volumeMounts"] = []
    assert len(socket_problems(spec)) == 2
    node_spec = node(broken)
    volume(node_spec, "plugin-dir")["hostPath"]["path"] = "/var/lib/kubelet/plugins/elsewhere"
    volume(node_spec, "registration-dir")["hostPath"]["path"] = "/var/lib/kubelet/plugins"
    assert len(registration_problems(node_spec, "/var/lib/kubelet")) == 2


def test_propagation_rule_catches_a_missing_or_misplaced_bidirectional(applied: list[Obj]) -> None:
    broken = copy.deepcopy(applied)
    berth = container(node(broken), "berth")
    next(m for m in berth["volumeMounts"] if m["name"] == "kubelet-dir")["mountPropagation"] = "HostToContainer"
    container(controller(broken), "csi-attacher")["volumeMounts"][0]["mountPropagation"] = "Bidirectional"
    assert len(propagation_problems(broken, "/var/lib/kubelet")) == 2


def test_health_rule_catches_a_probe_on_another_port(applied: list[Obj]) -> None:
    broken = copy.deepcopy(applied)
    berth = container(node(broken), "berth")
    berth["args"] = ["--health-port=9808" if a.startswith("--health-port") else a for a in berth["args"]]
    berth["livenessProbe"]["httpGet"]["path"] = "/"
    assert len(health_problems(node(broken))) == 2


def test_rbac_rules_catch_dangling_references(applied: list[Obj]) -> None:
    broken = copy.deepcopy(applied)
    node(broken)["serviceAccountName"] = "berth-nodes"
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
    next(sc for sc in broken if sc["metadata"]["name"] == "berth-nfs")["parameters"].pop("csi.storage.k8s.io/fstype")
    assert len(storage_class_problems(broken, config)) == 3


def test_config_check_catches_the_unquoted_yes(applied: list[Obj]) -> None:
    text = config_text(applied)
    assert 'ssh_strict_host_key_checking: "yes"' in text or "ssh_strict_host_key_checking: 'yes'" in text
    with pytest.raises(ConfigError, match="ssh_strict_host_key_checking"):
        parse_config(
            yaml.safe_load(
                re.sub(r"ssh_strict_host_key_checking: ['\"]yes['\"]", "ssh_strict_host_key_checking: yes", text)
            )
        )
