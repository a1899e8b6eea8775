"""lab/kube_images.py: cache keys, image references, the set layout, and valid OCI archives (umoci)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from csi_driver import __version__
from lab import config, kube_build, kube_images

needs_busybox = pytest.mark.skipif(not kube_images.BUSYBOX.exists(), reason="busybox-static not installed")
needs_umoci = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed (lab/ci-setup.sh)")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of what the Berth image is built from, to edit freely."""
    root = tmp_path / "repo"
    shutil.copytree(config.REPO / "csi_driver", root / "csi_driver", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(config.REPO / kube_images.IMAGE_DIR, root / kube_images.IMAGE_DIR)
    for f in ("pyproject.toml", "README.md", "Containerfile"):
        shutil.copy(config.REPO / f, root / f)
    return root


def keys(repo: Path) -> tuple[str, str]:
    return kube_images.base_key(repo), kube_images.berth_spec(repo).key


def test_code_changes_rebuild_only_the_thin_layer(repo: Path) -> None:
    base, berth = keys(repo)
    assert keys(repo) == (base, berth)
    node = repo / "csi_driver/node/__init__.py"
    node.write_text(node.read_text() + "# a change\n")
    base2, berth2 = keys(repo)
    assert base2 == base and berth2 != berth
    (repo / "csi_driver/new_module.py").write_text("X = 1\n")
    base3, berth3 = keys(repo)
    assert base3 == base and berth3 not in (berth, berth2)


def test_bytecode_and_mtimes_do_not_change_the_key(repo: Path) -> None:
    before = keys(repo)
    (repo / "csi_driver/__pycache__").mkdir()
    (repo / "csi_driver/__pycache__/cli.cpython-311.pyc").write_bytes(b"\0")
    os.utime(repo / "csi_driver/cli.py", (0, 0))
    assert keys(repo) == before


def test_pyproject_changes(repo: Path) -> None:
    pyproject = repo / "pyproject.toml"
    text = pyproject.read_text()
    base, berth = keys(repo)
    pyproject.write_text(text.replace('description = "Berth:', 'description = "Berth, changed:'))
    assert keys(repo)[0] == base and keys(repo)[1] != berth  # metadata: the thin layer only
    pyproject.write_text(text.replace('"PyYAML>=6",', '"PyYAML>=6",\n    "tenacity>=8",'))
    assert keys(repo)[0] != base  # a new dependency: the base


@pytest.mark.parametrize("name", ["packages", "install.sh", "dpkg-slim.cfg"])
def test_image_definition_changes_rebuild_the_base(repo: Path, name: str) -> None:
    base, berth = keys(repo)
    f = repo / kube_images.IMAGE_DIR / name
    f.write_text(f.read_text() + "\n# changed\n")
    assert keys(repo)[0] != base and keys(repo)[1] != berth


def test_containerfile_changes_rebuild_berth(repo: Path) -> None:
    base, berth = keys(repo)
    cf = repo / "Containerfile"
    cf.write_text(cf.read_text().replace('CMD ["--help"]', 'CMD ["--version"]'))
    base2, berth2 = keys(repo)
    assert base2 == base and berth2 != berth


@needs_busybox
def test_references(repo: Path) -> None:
    specs = {s.name: s for s in kube_images.image_specs(repo)}
    berth = specs.pop("berth")
    assert berth.refs == (
        f"registry.example.com/berth/berth:{__version__}",
        f"registry.example.com/berth/berth:lab-{berth.key}",
    )
    assert specs.pop("launcher").refs == (
        "registry.example.com/berth/lab-launcher:qemu",
        "registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7",
    )
    assert specs.pop("busybox").refs == (
        "registry.k8s.io/pause:3.6",
        "registry.k8s.io/pause:3.10",
        "docker.io/library/busybox:1.36",
        "registry.k8s.io/pause:3.10.1",
        "registry.k8s.io/e2e-test-images/busybox:1.37.0-1",
        "registry.k8s.io/e2e-test-images/nginx:1.14-4",
    )
    assert specs.pop("agnhost").refs == ("registry.k8s.io/e2e-test-images/agnhost:2.59",)
    assert {name: s.refs for name, s in specs.items()} == {
        name: (f"registry.k8s.io/sig-storage/{name}:{version}",) for name, (_, version) in kube_build.SIDECARS.items()
    }
    assert specs["csi-provisioner"].refs == ("registry.k8s.io/sig-storage/csi-provisioner:v6.3.0",)


def test_containerfile_runtime_config() -> None:
    opts = kube_images.containerfile_config(config.REPO / "Containerfile")
    assert "--config.entrypoint=/opt/berth/bin/berth" in opts
    assert "--config.cmd=--help" in opts
    path = next(o for o in opts if o.startswith("--config.env=PATH="))
    assert path.startswith("--config.env=PATH=/opt/berth/bin:") and ":/usr/sbin:" in path


def test_containerfile_parsing(tmp_path: Path) -> None:
    cf = tmp_path / "Containerfile"
    cf.write_text(
        "FROM x\nRUN echo ENV=no\nENV A=1 \\\n# a comment inside\n    B='two words'\n"
        'WORKDIR /w\nENTRYPOINT ["/bin/tool", "--flag"]\nCMD ["run"]\n'
    )
    assert kube_images.containerfile_config(cf) == [
        "--config.env=A=1",
        "--config.env=B=two words",
        "--config.workingdir=/w",
        "--config.entrypoint=/bin/tool",
        "--config.entrypoint=--flag",
        "--config.cmd=run",
    ]
    cf.write_text("ENV A 1\n")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        kube_images.containerfile_config(cf)


def test_containerfile_runs_the_shared_recipe() -> None:
    """One definition: the Containerfile installs through deploy/image/install.sh, both phases."""
    runs = [line for line in (config.REPO / "Containerfile").read_text().splitlines() if line.startswith("RUN ")]
    assert [r.split()[1:3] for r in runs] == [
        ["/tmp/berth-image/install.sh", "deps"],
        ["/tmp/berth-image/install.sh", "berth"],
    ]


def fake_specs(berth_key: str = "b1") -> list[kube_images.ImageSpec]:
    return [
        kube_images.ImageSpec("berth", ("example/berth:1",), berth_key),
        kube_images.ImageSpec("busybox", ("example/pause:1", "example/busybox:1"), "k2"),
    ]


def test_image_set_is_cached_and_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_images, "ROOT", tmp_path)
    built: list[str] = []

    def fake_build(spec: kube_images.ImageSpec, tmp: Path) -> None:
        built.append(spec.key)
        (tmp / "image.tar").write_text(spec.key)

    monkeypatch.setattr(kube_images, "_build_berth", fake_build)
    monkeypatch.setattr(kube_images, "_build_busybox", fake_build)

    (tmp_path / ".build-killed/merged").mkdir(parents=True)  # left by a build that was killed
    first = kube_images._ensure_set(fake_specs())
    assert first.parent == tmp_path and sorted(built) == ["b1", "k2"]
    assert not (tmp_path / ".build-killed").exists()
    assert json.loads((first / "images.json").read_text()) == [
        {"file": "berth.tar", "refs": ["example/berth:1"]},
        {"file": "busybox.tar", "refs": ["example/pause:1", "example/busybox:1"]},
    ]
    assert (first / "berth.tar").stat().st_ino == (tmp_path / "oci/berth-b1.tar").stat().st_ino
    assert kube_images._ensure_set(fake_specs()) == first and len(built) == 2  # warm: nothing rebuilt

    sets = [first]
    for n in range(2, kube_images.KEEP_SETS + 2):
        os.utime(sets[-1], (n, n))  # make the order of creation visible to the pruner
        sets.append(kube_images._ensure_set(fake_specs(f"b{n}")))
    assert built[2:] == [f"b{n}" for n in range(2, kube_images.KEEP_SETS + 2)]  # busybox reused each time
    assert not first.exists() and all(d.is_dir() for d in sets[1:])
    assert not (tmp_path / "oci/berth-b1.tar").exists() and (tmp_path / "oci/busybox-k2.tar").exists()
    assert not list(tmp_path.glob(".build-*")) + list(tmp_path.glob(".set-*"))


def test_failed_build_leaves_no_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_images, "ROOT", tmp_path)

    def broken(spec: kube_images.ImageSpec, tmp: Path) -> None:
        (tmp / "image.tar").write_text("half")
        raise RuntimeError("mmdebstrap failed")

    monkeypatch.setattr(kube_images, "_build_berth", broken)
    with pytest.raises(RuntimeError):
        kube_images._ensure_set(fake_specs())
    assert not list((tmp_path / "oci").iterdir()) and not list(tmp_path.glob(".build-*"))


def umoci_json(layout: Path, ref: str) -> dict:
    out = subprocess.run(["umoci", "stat", "--json", "--image", f"{layout}:{ref}"], check=True, capture_output=True)
    return json.loads(out.stdout)


def image_config(layout: Path, ref: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == ref]
    manifest = json.loads((layout / "blobs/sha256" / desc["digest"].split(":")[1]).read_text())
    return json.loads((layout / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_text())


def extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="tar")
    return dest


@needs_umoci
@needs_busybox
def test_busybox_archive_is_a_valid_oci_layout(tmp_path: Path) -> None:
    spec = kube_images.ImageSpec("busybox", kube_images.BUSYBOX_REFS, "k")
    (tmp_path / "build").mkdir()
    kube_images._build_busybox(spec, tmp_path / "build")
    layout = extract(tmp_path / "build/image.tar", tmp_path / "layout")
    for ref in spec.refs:
        assert len(umoci_json(layout, ref)["history"]) >= 1
    cfg = image_config(layout, "registry.k8s.io/pause:3.6")
    assert cfg["config"]["Cmd"] == ["/bin/sleep", "2147483647"] and cfg["architecture"] == "amd64"
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:docker.io/library/busybox:1.36", str(bundle)], check=True)
    rootfs = bundle / "rootfs"
    assert os.readlink(rootfs / "bin/sh") == "/bin/busybox" and os.readlink(rootfs / "bin/sleep") == "/bin/busybox"
    assert (rootfs / "bin/busybox").read_bytes() == kube_images.BUSYBOX.read_bytes()
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777


@needs_umoci
def test_sidecar_archive_runs_the_binary(tmp_path: Path) -> None:
    binary = tmp_path / "csi-resizer"
    binary.write_bytes(b"\x7fELF static")
    spec = kube_images.ImageSpec("csi-resizer", ("registry.k8s.io/sig-storage/csi-resizer:v2.2.0",), "k")
    (tmp_path / "build").mkdir()
    kube_images._sidecar_image(spec, tmp_path / "build", binary)
    layout = extract(tmp_path / "build/image.tar", tmp_path / "layout")
    assert image_config(layout, spec.refs[0])["config"]["Entrypoint"] == ["/csi-resizer"]
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{spec.refs[0]}", str(tmp_path / "b")], check=True)
    assert sorted(p.name for p in (tmp_path / "b/rootfs").iterdir()) == ["csi-resizer", "tmp"]
    assert (tmp_path / "b/rootfs/csi-resizer").stat().st_mode & 0o777 == 0o755


@needs_umoci
@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts are character devices: mknod needs root")
def test_overlay_upper_dir_becomes_a_layer_with_whiteouts(tmp_path: Path) -> None:
    def layer_from(root: Path, name: str) -> Path:
        out = tmp_path / name
        kube_images.overlay_layer(root, out)
        return out

    lower = tmp_path / "lower"
    for f in ("keep/a", "keep/gone", "opaque/old"):
        (lower / f).parent.mkdir(parents=True, exist_ok=True)
        (lower / f).write_text(f)
    upper = tmp_path / "upper"
    (upper / "keep").mkdir(parents=True)
    (upper / "keep/new").write_text("new")
    os.mknod(upper / "keep/gone", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # how overlayfs records a removal
    (upper / "opaque").mkdir()
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    (upper / "opaque/fresh").write_text("fresh")

    layout = tmp_path / "layout"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:t"], check=True)
    for layer in (layer_from(lower, "1.tar"), layer_from(upper, "2.tar")):
        subprocess.run(["umoci", "raw", "add-layer", "--image", f"{layout}:t", str(layer)], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", str(tmp_path / "b")], check=True)
    rootfs = tmp_path / "b/rootfs"
    assert sorted(p.name for p in (rootfs / "keep").iterdir()) == ["a", "new"]
    assert sorted(p.name for p in (rootfs / "opaque").iterdir()) == ["fresh"]


def test_e2e_refs_are_the_pinned_suites_own() -> None:
    """The e2e images carry the names and tags of the pinned release's image manifest, so its pods find them."""
    modcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True).stdout.strip()
    manifest = Path(modcache) / f"k8s.io/kubernetes@{kube_build.KUBERNETES_VERSION}/test/utils/image/manifest.go"
    if not manifest.is_file():
        pytest.skip(f"{manifest} not in the Go module cache (scripts/setup builds the lab's programs)")
    configs = dict(re.findall(r'configs\[(\w+)\] = Config\{list\.\w+, "([^"]+", "[^"]+)"\}', manifest.read_text()))
    tag = {name: value.replace('", "', ":") for name, value in configs.items()}
    for image in ("BusyBox", "Nginx"):
        assert f"{kube_images.E2E_REPO}/{tag[image]}" in kube_images.BUSYBOX_REFS
    assert kube_images.JESSIE_DNSUTILS_REF == f"{kube_images.E2E_REPO}/{tag['JessieDnsutils']}"
    assert f"registry.k8s.io/{tag['Pause']}" in kube_images.BUSYBOX_REFS
    assert kube_images.AGNHOST_REF == f"{kube_images.E2E_REPO}/{tag['Agnhost']}"
