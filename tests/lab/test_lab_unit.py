"""Fast checks of the lab's own machinery (no qemu needed; marked `lab` so they run in the lab CI step)."""

import gzip
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from lab import config, image
from lab.guest import GuestSpec, listening_ports
from lab.topology import tree_tarball

pytestmark = pytest.mark.lab


def test_guest_requirements_follow_pyproject(tmp_path):
    py = tmp_path / "pyproject.toml"
    py.write_text(
        '[project]\nname = "x"\ndependencies = ["grpcio>=1"]\n'
        '[project.optional-dependencies]\nnode = ["os-brick>=7"]\ntest = ["pytest>=8", "ruff"]\n'
    )
    assert image.guest_requirements(py) == ["grpcio>=1", "os-brick>=7", "pytest>=8"]
    real = image.guest_requirements()
    assert any(r.startswith("os-brick") for r in real) and any(r.startswith("pyudev") for r in real)


def test_image_hash_changes_with_each_input():
    base = image.Inputs(("a", "b"), ("linux-image-x", "1"), ("grpcio",), "v5.5.0", "code")
    assert base.digest() == image.Inputs(("a", "b"), ("linux-image-x", "1"), ("grpcio",), "v5.5.0", "code").digest()
    variants = [
        image.Inputs(("a", "b", "c"), base.kernel, base.requirements, base.csi_sanity, base.code_digest),
        image.Inputs(base.packages, ("linux-image-x", "2"), base.requirements, base.csi_sanity, base.code_digest),
        image.Inputs(base.packages, base.kernel, ("grpcio", "pyudev"), base.csi_sanity, base.code_digest),
        image.Inputs(base.packages, base.kernel, base.requirements, "v5.6.0", base.code_digest),
        image.Inputs(base.packages, base.kernel, base.requirements, base.csi_sanity, "other"),
    ]
    assert len({v.digest() for v in variants} | {base.digest()}) == 6


def test_module_closure_orders_dependencies_first(tmp_path):
    mods = tmp_path / "lib/modules/k"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text(
        "kernel/virtio_blk.ko: kernel/virtio_ring.ko kernel/virtio.ko\n"
        "kernel/virtio_pci.ko: kernel/virtio_ring.ko kernel/virtio.ko\n"
        "kernel/virtio_ring.ko: kernel/virtio.ko\n"
        "kernel/virtio.ko:\n"
    )
    order = image.module_closure(tmp_path, "k", ["virtio_pci", "virtio_blk", "ext4"])
    assert order == ["kernel/virtio.ko", "kernel/virtio_ring.ko", "kernel/virtio_pci.ko", "kernel/virtio_blk.ko"]


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox-static not installed")
def test_initrd_is_a_valid_newc_cpio(tmp_path, monkeypatch):
    mods = tmp_path / "lib/modules/k/kernel"
    mods.mkdir(parents=True)
    (mods / "virtio_blk.ko").write_bytes(b"\x7fELF fake")
    (tmp_path / "lib/modules/k/modules.dep").write_text("kernel/virtio_blk.ko:\n")
    cpio = tmp_path / "initrd.cpio"
    cpio.write_bytes(gzip.decompress(image.make_initrd(tmp_path, "k")))
    listing = subprocess.run(
        ["/bin/busybox", "cpio", "-t"], stdin=cpio.open("rb"), capture_output=True, text=True, check=True
    ).stdout.split()
    assert {"init", "bin/busybox", "modules/virtio_blk.ko", "modules.list"} <= set(listing)


def test_tree_tarball_leaves_out_caches_and_vcs():
    with tarfile.open(fileobj=io.BytesIO(tree_tarball(config.REPO))) as tar:
        names = tar.getnames()
    assert "pyproject.toml" in names and any(n.startswith("csi_driver/") for n in names)
    assert not [n for n in names if n.split("/")[0] in {".git", ".venv"} or n.startswith(("lab/cache", "lab/run"))]
    assert not [n for n in names if "__pycache__" in n]


def test_guest_spec_round_trips_and_ports_parse():
    spec = GuestSpec("node1", "node", 11, 2222, "ab" * 16, link_ports=[[1], [2]])
    assert GuestSpec.from_dict(spec.to_dict()) == spec
    assert isinstance(listening_ports(), set)
