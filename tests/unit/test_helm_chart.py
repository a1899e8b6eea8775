"""The Helm chart deploy/helm/berth, rendered with helm (the lab's, lab.kube_build) in several value variants.

No cluster is needed: the objects are validated offline against the Kubernetes 1.35 OpenAPI schemas
(kubernetes-validate; the CRD kinds by their known shape), `helm lint` runs, the value variants are checked for
what they must change, and deploy/*.yaml must equal a fresh render (deploy/render.py).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import tempfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from csi_driver import __version__
from csi_driver.config import parse_config
from lab import kube_build
from tests.unit.manifests import (
    CHART,
    DEPLOY,
    NAMESPACE,
    Obj,
    binding_problems,
    config_text,
    container,
    controller,
    find,
    flag,
    load_file,
    node,
    one,
    parse,
    propagation_problems,
    registration_problems,
    render,
    service_account_problems,
    workload,
)

KUBE_SCHEMA_VERSION = kube_build.KUBERNETES_VERSION  # the lab cluster's; kubernetes-validate has 1.35 schemas
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@pytest.fixture(scope="module")
def helm() -> Path:
    """The lab's helm. scripts/setup builds it; CI (or BERTH_REQUIRE_HELM=1) fails without it, others skip."""
    binary = render.helm_binary()
    if binary is None:
        message = f"no helm in {kube_build.bin_dir()} (python3 -m lab.kube_build builds it)"
        if os.environ.get("CI") == "true" or os.environ.get("BERTH_REQUIRE_HELM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def template(*sets: str, values: Obj | None = None) -> list[Obj]:
    """The chart rendered with --set arguments (e.g. "kubevirt.createStorageProfiles=true") and a values file."""
    args = [arg for value in sets for arg in ("--set", value)]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values_file:
        yaml.safe_dump(values or {}, values_file)
        values_file.flush()
        return parse(render.template("--values", values_file.name, *args))


@pytest.fixture(scope="module")
def defaults(helm: Path) -> list[Obj]:
    """The chart with its default values, as `helm install` creates it."""
    return template()


def with_chap_class(namespace: str = "") -> Obj:
    """Values adding a CHAP StorageClass berth-iscsi-chap to the default classes (a list replaces the default)."""
    classes = yaml.safe_load((CHART / "values.yaml").read_text())["storageClasses"]
    chap_secret = {"name": "berth-chap", **({"namespace": namespace} if namespace else {})}
    return {
        "storageClasses": [
            *classes,
            {"name": "berth-iscsi-chap", "backend": "storage1-iscsi", "chapSecret": chap_secret},
        ]
    }


# --- schemas ---------------------------------------------------------------------------------------------------


def schema_problems(objs: list[Obj]) -> list[str]:
    """Kubernetes' own kinds against the 1.35 OpenAPI schemas; the CRD kinds by their known shape."""
    problems = []
    for obj in objs:
        where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        check = CRD_CHECKS.get((obj.get("apiVersion"), obj.get("kind")))
        if check is not None:
            problems += [f"{where}: {p}" for p in check(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.absolute_path)
            problems.append(f"{where}: {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(f"{where}: {err.message}")
    return problems


def _crd_object_problems(obj: Obj, allowed: set[str]) -> list[str]:
    problems = [f"unexpected field {key}" for key in sorted(obj.keys() - allowed)]
    metadata = obj.get("metadata", {})
    if not DNS_SUBDOMAIN.match(metadata.get("name", "")):
        problems.append(f"name {metadata.get('name')!r} is not a DNS subdomain")
    if "namespace" in metadata:
        problems.append("cluster-scoped, but has a namespace")
    for key in ("labels", "annotations"):
        if not all(isinstance(v, str) for v in metadata.get(key, {}).values()):
            problems.append(f"metadata.{key} values must be strings")
    return problems


def volume_snapshot_class_problems(obj: Obj) -> list[str]:
    """snapshot.storage.k8s.io/v1 VolumeSnapshotClass (external-snapshotter's CRD)."""
    problems = _crd_object_problems(obj, {"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"})
    if not isinstance(obj.get("driver"), str) or not obj["driver"]:
        problems.append("driver is required")
    if obj.get("deletionPolicy") not in ("Delete", "Retain"):
        problems.append(f"deletionPolicy {obj.get('deletionPolicy')!r} is not Delete or Retain")
    if not all(isinstance(v, str) for v in (obj.get("parameters") or {}).values()):
        problems.append("parameters values must be strings")
    return problems


def storage_profile_problems(obj: Obj) -> list[str]:
    """cdi.kubevirt.io/v1beta1 StorageProfile (CDI's CRD): the spec fields a user may set."""
    problems = _crd_object_problems(obj, {"apiVersion", "kind", "metadata", "spec"})
    spec = obj.get("spec", {})
    problems += [f"unexpected spec.{key}" for key in sorted(spec.keys() - STORAGE_PROFILE_SPEC)]
    if spec.get("cloneStrategy", "copy") not in ("copy", "snapshot", "csi-clone"):
        problems.append(f"cloneStrategy {spec['cloneStrategy']!r}")
    for i, claim in enumerate(spec.get("claimPropertySets", [])):
        if not set(claim.get("accessModes", [])) <= ACCESS_MODES:
            problems.append(f"claimPropertySets[{i}].accessModes {claim.get('accessModes')}")
        if claim.get("volumeMode") not in ("Block", "Filesystem"):
            problems.append(f"claimPropertySets[{i}].volumeMode {claim.get('volumeMode')!r}")
    return problems


STORAGE_PROFILE_SPEC = {"claimPropertySets", "cloneStrategy", "dataImportCronSourceFormat", "snapshotClass"}


ACCESS_MODES = {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}


CRD_CHECKS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): volume_snapshot_class_problems,
    ("cdi.kubevirt.io/v1beta1", "StorageProfile"): storage_profile_problems,
}


# --- tests -----------------------------------------------------------------------------------------------------


def test_deploy_is_the_chart_rendered(helm: Path) -> None:
    problems = render.drift()
    assert not problems, "deploy/ drifted from the chart; run deploy/render.py:\n" + "\n".join(problems)


def test_helm_lint_passes(helm: Path) -> None:
    result = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_app_version_is_berths(helm: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == __version__


def test_sidecar_versions_are_the_ones_the_lab_builds() -> None:
    """The lab runs the chart with the sidecar images it built from these releases (lab/kube_build.py)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = {
        entry["image"]["repository"].rsplit("/", 1)[-1]: entry["image"]["tag"]
        for entry in values["sidecars"].values()
        if isinstance(entry, dict) and "image" in entry
    }
    chart["snapshot-controller"] = values["snapshotController"]["image"]["tag"]
    assert chart == {name: version for name, (_, version) in kube_build.SIDECARS.items()}


VARIANTS = {
    "defaults": [],
    "namespace": ["namespace.create=true"],
    "kubevirt": ["kubevirt.createStorageProfiles=true", "kubevirt.defaultVirtClass=berth-iscsi-block-rwx"],
    "snapshot-controller": ["snapshotController.enabled=true"],
    "kubelet-dir": ["kubeletDir=/var/lib/k0s/kubelet", "controller.replicas=2"],
}


@pytest.mark.parametrize("variant", [*VARIANTS, "chap"])
def test_rendered_objects_match_the_kubernetes_schemas(helm: Path, variant: str) -> None:
    objs = template(values=with_chap_class("tenant-a")) if variant == "chap" else template(*VARIANTS[variant])
    assert objs
    assert schema_problems(objs) == []


def test_schema_rule_catches_invalid_objects(defaults: list[Obj]) -> None:
    broken = copy.deepcopy(defaults)
    container(node(broken), "berth")["livenessProbe"]["httpGet"]["port"] = [9809]  # neither int nor string
    one(broken, "CSIDriver")["spec"]["attachRequired"] = "yes"
    one(broken, "VolumeSnapshotClass")["deletionPolicy"] = "Keep"
    container(controller(broken), "csi-attacher")["volumeMountz"] = []  # a typo: strict schemas know every field
    profile = copy.deepcopy(find(template("kubevirt.createStorageProfiles=true"), "StorageProfile")[0])
    profile["spec"]["cloneStrategy"] = "csi-copy"
    profile["spec"]["claimPropertySets"][0]["volumeMode"] = "Raw"
    problems = schema_problems([*broken, profile])
    assert len(problems) == 6, problems


def test_default_install_has_no_extras(defaults: list[Obj]) -> None:
    kinds = {o["kind"] for o in defaults}
    assert "Namespace" not in kinds, "helm install needs the namespace first; the chart must not own it by default"
    assert "StorageProfile" not in kinds
    assert [s["metadata"]["name"] for s in find(defaults, "Deployment")] == ["berth-controller"]
    assert not any("storageclass.kubevirt.io/is-default-virt-class" in sc["metadata"].get("annotations", {})
                   for sc in find(defaults, "StorageClass"))  # fmt: skip
    assert not find(defaults, "Secret"), "the chart refers to existing Secrets, it never carries credentials"


def default_config_text() -> str:
    return yaml.safe_load((CHART / "values.yaml").read_text())["config"]


def test_config_changes_restart_the_pods(defaults: list[Obj]) -> None:
    """Berth reads its config once: a changed config must change the pod templates (checksum annotation)."""
    changed = template(
        values={"config": default_config_text().replace("max_volumes_per_node: 0", "max_volumes_per_node: 7")}
    )
    for kind in ("Deployment", "DaemonSet"):
        before = one(defaults, kind)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        after = one(changed, kind)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        assert before != after, kind


def test_own_config_replaces_the_example_whole(helm: Path) -> None:
    """As YAML text or as a mapping, a config leaves none of the example's backends behind (no Helm map merge)."""
    own = {
        "default_backend": "san1",
        "backends": {
            "san1": {
                "protocol": "iscsi",
                "host": {"address": "10.20.0.5"},
                "lvm": {"volume_group": "vg", "thin_pool": "pool"},
                "iscsi": {"portals": ["10.20.0.5:3260"]},
            }
        },
    }
    classes = [{"name": "berth-iscsi-block-rwx"}]  # no backend: the config's default_backend
    for config in (own, yaml.safe_dump(own)):
        objs = template(values={"config": config, "storageClasses": classes})
        parsed = parse_config(yaml.safe_load(config_text(objs)))
        assert list(parsed.backends) == ["san1"]
        assert parsed.driver_name == "berth.csi.io"
        assert parsed.node.state_dir == "/var/lib/kubelet/plugins/berth.csi.io"
        assert one(objs, "StorageClass")["parameters"] == {"backend": "san1"}


def test_kubevirt_extras(helm: Path) -> None:
    objs = template("kubevirt.createStorageProfiles=true", "kubevirt.defaultVirtClass=berth-iscsi-block-rwx")
    annotated = [
        sc["metadata"]["name"]
        for sc in find(objs, "StorageClass")
        if sc["metadata"].get("annotations", {}).get("storageclass.kubevirt.io/is-default-virt-class") == "true"
    ]
    assert annotated == ["berth-iscsi-block-rwx"]
    profiles = {p["metadata"]["name"]: p["spec"] for p in find(objs, "StorageProfile")}
    assert set(profiles) == {sc["metadata"]["name"] for sc in find(objs, "StorageClass")}, "one profile per class"
    assert profiles["berth-iscsi-block-rwx"] == {
        "claimPropertySets": [{"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}],
        "cloneStrategy": "csi-clone",
    }
    assert profiles["berth-nfs"]["claimPropertySets"] == [
        {"accessModes": ["ReadWriteMany"], "volumeMode": "Filesystem"}
    ]


def test_snapshot_controller_is_optional_and_complete(helm: Path) -> None:
    objs = template("snapshotController.enabled=true")
    spec = workload(objs, "Deployment", "berth-snapshot-controller")
    (snapshot_controller,) = spec["containers"]
    assert (
        snapshot_controller["image"]
        == f"registry.k8s.io/sig-storage/snapshot-controller:{kube_build.SIDECARS['snapshot-controller'][1]}"
    )
    assert flag(snapshot_controller, "leader-election") == "true"
    assert flag(snapshot_controller, "feature-gates") == "CSIVolumeGroupSnapshot=false"
    assert service_account_problems(objs) == [] and binding_problems(objs) == []
    assert spec["serviceAccountName"] == "berth-snapshot-controller"
    runner = one(objs, "ClusterRole", "berth-snapshot-controller-runner")
    assert any("volumesnapshotcontents" in r["resources"] and "create" in r["verbs"] for r in runner["rules"])
    assert not find(objs, "CustomResourceDefinition"), "the snapshot CRDs come from external-snapshotter, not us"


def test_custom_kubelet_dir_moves_every_kubelet_path(helm: Path) -> None:
    kubelet_dir = "/var/lib/k0s/kubelet"
    objs = template(f"kubeletDir={kubelet_dir}/")  # a trailing slash must not matter
    node_spec = node(objs)
    assert registration_problems(node_spec, kubelet_dir) == []
    assert propagation_problems(objs, kubelet_dir) == []
    plugin_dir = f"{kubelet_dir}/plugins/berth.csi.io"
    assert flag(container(node_spec, "berth"), "kubelet-csi-endpoint") == f"{plugin_dir}/csi.sock"
    assert parse_config(yaml.safe_load(config_text(objs))).node.state_dir == plugin_dir
    host_paths = [v["hostPath"]["path"] for v in node_spec["volumes"] if "hostPath" in v]
    assert not any(p.startswith("/var/lib/kubelet") for p in host_paths), host_paths


def test_chap_class_refers_to_the_secret_and_the_attacher_may_read_it(helm: Path) -> None:
    secret = one(load_file(DEPLOY / "secret-example.yaml"), "Secret", "berth-chap")
    objs = template(values=with_chap_class("tenant-a"))
    params = one(objs, "StorageClass", "berth-iscsi-chap")["parameters"]
    for side in ("controller-publish", "node-stage"):
        assert params[f"csi.storage.k8s.io/{side}-secret-name"] == secret["metadata"]["name"]
        assert params[f"csi.storage.k8s.io/{side}-secret-namespace"] == "tenant-a"
    readable = {r["metadata"]["namespace"] for r in find(objs, "Role", "berth-external-attacher-secrets")}
    assert readable == {NAMESPACE, "tenant-a"}
    assert binding_problems(objs) == []
    same_namespace = one(template(values=with_chap_class()), "StorageClass", "berth-iscsi-chap")["parameters"]
    assert same_namespace["csi.storage.k8s.io/node-stage-secret-namespace"] == secret["metadata"]["namespace"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"storageClasses": [{"name": "berth-x", "backend": "san2"}]}, 'berth-x: backend "san2" is not in config'),
        ({"kubevirt": {"defaultVirtClass": "berth-fast"}}, '"berth-fast" is not in storageClasses'),
        ({"config": default_config_text() + "driver_name: other.csi.io\n"}, "differs from driverName"),
        ({"config": "backends: [unclosed"}, "config is not valid YAML"),
    ],
)
def test_chart_refuses_inconsistent_values(helm: Path, values: Obj, message: str) -> None:
    with pytest.raises(render.RenderError, match=re.escape(message)):
        template(values=values)
