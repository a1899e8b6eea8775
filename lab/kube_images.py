"""Build and cache the lab cluster's container images as OCI archives, with no registry.

- **Berth**: a Debian bookworm root (mmdebstrap) with deploy/image/install.sh run in it, the script the
  Containerfile runs too, so the lab's image and the one a user pushes come from one definition; the runtime
  settings (ENV, ENTRYPOINT, CMD) are read from the Containerfile. Two layers: the base (Debian packages and the
  dependency venv) is cached by deploy/image and Berth's requirements, so a code change only rebuilds the thin
  top layer with Berth itself.
- **The CSI sidecars**: one static binary from lab.kube_build each, as the entrypoint.
- **busybox-static** from the host: containerd's pause image and the smoke tests' workload image; with
  agnhost (lab.kube_build) added, the e2e suite's main test image.
- **The VM launcher**: Debian's qemu-system-x86 (no recommends) on the essential package set, for the
  KubeVirt-shaped migration test (tests/k8s/test_migration.py); never part of Berth's image.

Each archive names its images in index.json (`org.opencontainers.image.ref.name` is the full reference), so
`ctr -n k8s.io images import FILE` tags them; images.json lists the same references for an importer that tags
by itself. Cache layout under CACHE/images, every directory and archive built in a temp path and renamed:
    base/<key>/               the Berth base (OCI layout) and the wheels its top layer is built with
    oci/<name>-<key>.tar      one archive per image and inputs
    <key>/                    the current set: hard links to its archives, and images.json
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab import config, kube_build
from lab.image import chroot, chroot_pip_env, deb_cache_args, mirrors, run, unmount_under

ROOT = config.CACHE / "images"
IMAGE_DIR = "deploy/image"  # relative to the repository
BERTH_REPO = "registry.example.com/berth/berth"  # what deploy/ names (docs/deploy.md)
SIDECAR_REPO = "registry.k8s.io/sig-storage"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
# containerd's sandbox_image in Debian's containerd 1.6 (`containerd config default`), the current pause
# release, the workload image of the smoke tests, and the e2e suite's pause and busybox (the names and tags of
# test/utils/image/manifest.go in the pinned Kubernetes release: the suite's pods find them already present).
# The storage suite also starts nginx pods (volumes' exec test), only to run shell commands in them: busybox
# stands in. Its jessie-dnsutils pods (multiVolume) write raw block volumes with GNU dd's `oflag=nocache`, which
# busybox's dd refuses: the Debian launcher image (coreutils, util-linux) stands in for that one.
E2E_REPO = "registry.k8s.io/e2e-test-images"
E2E_SHELL_IMAGES = ("busybox:1.37.0-1", "nginx:1.14-4")
JESSIE_DNSUTILS_REF = f"{E2E_REPO}/jessie-dnsutils:1.7"
BUSYBOX_REFS = ("registry.k8s.io/pause:3.6", "registry.k8s.io/pause:3.10", "docker.io/library/busybox:1.36",
                "registry.k8s.io/pause:3.10.1", *(f"{E2E_REPO}/{name}" for name in E2E_SHELL_IMAGES))  # fmt: skip
AGNHOST_REF = f"{E2E_REPO}/agnhost:2.59"
LAUNCHER_REF = "registry.example.com/berth/lab-launcher:qemu"
LAUNCHER_PACKAGES = ("qemu-system-x86",)
KEEP_SETS, KEEP_BASES = 3, 2  # older sets and bases are pruned after a build


def log(msg: str) -> None:
    print(f"[lab images] {msg}", file=sys.stderr, flush=True)


def _hash(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update((p.encode() if isinstance(p, str) else p) + b"\0")
    return h.hexdigest()[:16]


def _files_digest(root: Path, files: list[Path]) -> str:
    return _hash(*(part for f in files for part in (str(f.relative_to(root)), f.read_bytes())))


@dataclass(frozen=True)
class ImageSpec:
    name: str  # archive file stem
    refs: tuple[str, ...]
    key: str  # hash of everything the archive is built from

    @property
    def archive(self) -> str:
        return f"{self.name}-{self.key}.tar"


def berth_sources(repo: Path) -> list[Path]:
    """What the thin layer is built from (and what the Containerfile copies)."""
    code = sorted(f for f in (repo / "csi_driver").rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    return [repo / "pyproject.toml", repo / "README.md", *code]


def base_key(repo: Path = config.REPO) -> str:
    """The Berth base: deploy/image, Berth's requirements and build requirements, and the recipe below."""
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    project = pyproject["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["node"], *pyproject["build-system"]["requires"]]
    image_files = sorted(f for f in (repo / IMAGE_DIR).iterdir() if f.is_file())
    recipe = inspect.getsource(_build_base) + inspect.getsource(customize_base)
    return _hash(config.SUITE, json.dumps(reqs), _files_digest(repo, image_files), recipe)


def _module_digest() -> str:
    return _hash(Path(__file__).read_bytes())


def berth_spec(repo: Path = config.REPO) -> ImageSpec:
    sources = berth_sources(repo)
    key = _hash(base_key(repo), _files_digest(repo, sources), (repo / "Containerfile").read_bytes(), _module_digest())
    version = re.search(r'^__version__ = "([^"]+)"', (repo / "csi_driver/__init__.py").read_text(), re.M)
    if not version:
        raise RuntimeError("csi_driver/__init__.py has no __version__")
    # The package version (what deploy/ and the chart name) and a tag per build, for a rollout after a change.
    return ImageSpec("berth", (f"{BERTH_REPO}:{version.group(1)}", f"{BERTH_REPO}:lab-{key}"), key)


def image_specs(repo: Path = config.REPO) -> list[ImageSpec]:
    binaries = kube_build.inputs_hash()  # names the cached bin directory the sidecars come from
    sidecars = [
        ImageSpec(name, (f"{SIDECAR_REPO}/{name}:{version}",), _hash(binaries, name, version, _module_digest()))
        for name, (_, version) in kube_build.SIDECARS.items()
    ]
    busybox = ImageSpec("busybox", BUSYBOX_REFS, _hash(BUSYBOX.read_bytes(), *BUSYBOX_REFS, _module_digest()))
    agnhost = ImageSpec("agnhost", (AGNHOST_REF,), _hash(binaries, BUSYBOX.read_bytes(), _module_digest()))
    launcher_refs = (LAUNCHER_REF, JESSIE_DNSUTILS_REF)
    launcher_key = _hash(config.SUITE, *LAUNCHER_PACKAGES, *launcher_refs, _module_digest())
    launcher = ImageSpec("launcher", launcher_refs, launcher_key)
    return [berth_spec(repo), *sidecars, busybox, agnhost, launcher]


def set_key(specs: list[ImageSpec]) -> str:
    return _hash(*(f"{s.name} {s.key} {' '.join(s.refs)}" for s in specs))


def manifest(specs: list[ImageSpec]) -> list[dict]:
    """images.json: which references each archive holds."""
    return [{"file": f"{s.name}.tar", "refs": list(s.refs)} for s in specs]


def ensure_images(force: bool = False) -> Path:
    """The cached image set for the current inputs, built first if missing. Safe to call concurrently.
    `force` rebuilds the archives (not the Berth base, which has its own key)."""
    return _ensure_set(image_specs(), force)


def _ensure_set(specs: list[ImageSpec], force: bool = False) -> Path:
    final = ROOT / set_key(specs)
    if (final / "images.json").exists() and not force:
        return final
    (ROOT / "oci").mkdir(parents=True, exist_ok=True)
    with open(ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "images.json").exists() and not force:
            return final
        for spec in specs:
            archive = ROOT / "oci" / spec.archive
            if not archive.exists() or force:
                _build_archive(spec, archive)
        tmp = Path(tempfile.mkdtemp(dir=ROOT, prefix=".set-"))
        try:
            for spec in specs:
                os.link(ROOT / "oci" / spec.archive, tmp / f"{spec.name}.tar")
            (tmp / "images.json").write_text(json.dumps(manifest(specs), indent=2) + "\n")
            os.chmod(tmp, 0o755)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune()
    return final


def _build_archive(spec: ImageSpec, archive: Path) -> None:
    builders: dict[str, Callable[[ImageSpec, Path], None]] = {
        "berth": _build_berth, "busybox": _build_busybox, "agnhost": _build_agnhost, "launcher": _build_launcher,
    }  # fmt: skip
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(dir=ROOT, prefix=".build-"))
    try:
        builders.get(spec.name, _build_sidecar)(spec, tmp)
        os.rename(tmp / "image.tar", archive)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{spec.name}: {archive.stat().st_size / 1e6:.1f} MB in {time.monotonic() - t0:.0f} s")


def _prune() -> None:
    """Keep the newest sets and bases; drop archives no set links any more."""

    def newest_first(d: Path) -> list[Path]:
        return sorted(d.iterdir() if d.is_dir() else [], key=lambda p: p.stat().st_mtime, reverse=True)

    # Temp directories are stale here (builds hold the lock): left by a killed build, perhaps with its mounts.
    stale = [*ROOT.glob(".build-*"), *ROOT.glob(".set-*"), *ROOT.glob("base/.build-*")]
    sets = [d for d in newest_first(ROOT) if re.fullmatch(r"[0-9a-f]{16}", d.name)]
    bases = [d for d in newest_first(ROOT / "base") if not d.name.startswith(".")]
    for d in stale + sets[KEEP_SETS:] + bases[KEEP_BASES:]:
        unmount_under(d)
        shutil.rmtree(d)
    for f in (ROOT / "oci").glob("*.tar"):
        if f.stat().st_nlink == 1:
            f.unlink()


# --- Berth ------------------------------------------------------------------------------------------------


def _ensure_base(repo: Path) -> Path:
    base = ROOT / "base" / base_key(repo)
    if not (base / "layout/index.json").exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base.parent, prefix=".build-"))
        os.chmod(tmp, 0o755)  # apt in the chroot downloads as _apt
        try:
            _build_base(repo, tmp)
            os.rename(tmp, base)
        finally:
            unmount_under(tmp)  # never rmtree through a mount mmdebstrap failed to undo
            shutil.rmtree(tmp, ignore_errors=True)
    return base


def _build_base(repo: Path, out: Path) -> None:
    """mmdebstrap + `install.sh deps` in its customize hook, packed as one layer."""
    t0 = time.monotonic()
    packages = re.sub(r"#.*", "", (repo / IMAGE_DIR / "packages").read_text()).split()
    rootfs = out / "rootfs"
    debs = config.CACHE / "debs"  # shared with the lab image
    debs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(config.REPO), "BERTH_IMAGE_REPO": str(repo), "BERTH_IMAGE_OUT": str(out)}
    log(f"base: mmdebstrap {config.SUITE} + {IMAGE_DIR}/install.sh deps")
    run(
        [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            "--format=directory",
            "--include=" + ",".join(packages),  # install.sh finds them installed; apt gets them from the cache
            f"--dpkgopt={repo / IMAGE_DIR / 'dpkg-slim.cfg'}",
            # Merged /usr the way debian:bookworm-slim has it, without the usrmerge package (and its perl).
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            *deb_cache_args(debs),
            f'--customize-hook={sys.executable} -m lab.kube_images customize-base "$1"',
            config.SUITE,
            str(rootfs),
            *mirrors(),
        ],
        env=env,
    )
    unmount_under(rootfs)
    for d in ("dev", "proc", "sys", "run", "tmp"):  # the runtime mounts these; leave them empty
        for entry in (rootfs / d).iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    layout = out / "layout"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:berth"])
    created_by = f"{IMAGE_DIR}/install.sh deps (mmdebstrap {config.SUITE})"
    run(["umoci", "insert", "--image", f"{layout}:berth", "--history.created_by", created_by, str(rootfs), "/"])
    # The root stays next to the layout: the top layer is built on it through overlayfs, with no unpacking.
    log(f"base built in {time.monotonic() - t0:.0f} s")


def customize_base(root: Path) -> None:
    """mmdebstrap customize hook: run install.sh deps in the chroot, keep the top layer's build wheels."""
    repo, out = Path(os.environ["BERTH_IMAGE_REPO"]), Path(os.environ["BERTH_IMAGE_OUT"])
    work = root / "tmp/berth-image"
    shutil.copytree(repo / IMAGE_DIR, work)
    shutil.copy(repo / "pyproject.toml", work)
    pip_env = chroot_pip_env(root)
    chroot(root, *pip_env, "sh", "/tmp/berth-image/install.sh", "deps", "/tmp/berth-image/pyproject.toml")
    # Berth's build backend, fetched once here: the top layer then builds offline, in seconds.
    build_reqs = tomllib.loads((repo / "pyproject.toml").read_text())["build-system"]["requires"]
    chroot(root, *pip_env, "/opt/berth/bin/pip", "-q", "download", "--no-cache-dir", "-d", "/tmp/wheels", *build_reqs)
    shutil.move(root / "tmp/wheels", out / "wheels")
    shutil.rmtree(work)
    (root / "tmp/host-ca.crt").unlink(missing_ok=True)


def _build_berth(spec: ImageSpec, tmp: Path, repo: Path = config.REPO) -> None:
    """The base plus one layer: `install.sh berth` run on an overlay over the base's root, whose upper
    directory is exactly that layer."""
    base = _ensure_base(repo)
    layout = tmp / "layout"
    # Blobs are content-addressed and never rewritten: link them; index.json is rewritten, so copy it.
    shutil.copytree(base / "layout", layout, copy_function=os.link)
    for f in ("index.json", "oci-layout"):
        (layout / f).unlink()
        shutil.copy(base / "layout" / f, layout / f)
    upper, merged = tmp / "upper", tmp / "merged"
    for d in (upper, merged, tmp / "work"):
        d.mkdir()
    overlay = f"lowerdir={base / 'rootfs'},upperdir={upper},workdir={tmp / 'work'}"
    try:
        run(["mount", "-t", "overlay", "overlay", "-o", overlay, str(merged)])
        src, work, wheels = merged / "tmp/berth-src", merged / "tmp/berth-image", merged / "tmp/wheels"
        for f in berth_sources(repo):
            (src / f.relative_to(repo)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, src / f.relative_to(repo))
        shutil.copytree(repo / IMAGE_DIR, work)
        shutil.copytree(base / "wheels", wheels)
        offline = ["env", "PIP_NO_INDEX=1", "PIP_FIND_LINKS=/tmp/wheels"]
        chroot(merged, *offline, "sh", "/tmp/berth-image/install.sh", "berth", "/tmp/berth-src")
        for d in (src, work, wheels):
            shutil.rmtree(d)
    finally:
        unmount_under(tmp)
    overlay_layer(upper, tmp / "layer.tar")
    created_by = f"{IMAGE_DIR}/install.sh berth"
    run(
        [
            "umoci",
            "raw",
            "add-layer",
            "--image",
            f"{layout}:berth",
            "--history.created_by",
            created_by,
            str(tmp / "layer.tar"),
        ]
    )
    _configure(layout, containerfile_config(repo / "Containerfile"))
    _finish(layout, spec, tmp / "image.tar")


def overlay_layer(upper: Path, out: Path) -> None:
    """An overlayfs upper directory as an OCI layer: its whiteouts (0:0 character devices) and opaque
    directories become .wh. entries, everything else is copied as it is."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirs, files in os.walk(upper):
            dirs.sort()
            here = Path(dirpath)
            rel = here.relative_to(upper)
            if here != upper and _xattr(here, "trusted.overlay.opaque") == b"y":
                tar.addfile(tarfile.TarInfo(str(rel / ".wh..wh..opq")))
            for name in sorted(dirs + files):
                st = os.lstat(here / name)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    tar.addfile(tarfile.TarInfo(str(rel / f".wh.{name}")))
                else:
                    tar.add(here / name, arcname=str(rel / name), recursive=False)


def _xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def containerfile_config(path: Path) -> list[str]:
    """`umoci config` options for the Containerfile's ENV, WORKDIR, ENTRYPOINT and CMD (exec form)."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    opts: list[str] = []
    for instr in re.sub(r"\\\n", " ", text).splitlines():
        word, _, rest = instr.strip().partition(" ")
        word = word.upper()
        if word == "ENV":
            pairs = shlex.split(rest)
            if not all("=" in kv for kv in pairs):
                raise ValueError(f"{path}: only ENV KEY=VALUE ... is understood: {instr!r}")
            opts += [f"--config.env={kv}" for kv in pairs]
        elif word == "WORKDIR":
            opts.append(f"--config.workingdir={rest.strip()}")
        elif word in ("ENTRYPOINT", "CMD"):
            opts += [f"--config.{word.lower()}={arg}" for arg in json.loads(rest)]
    return opts


# --- static images: sidecars and busybox ----------------------------------------------------------------


def _build_sidecar(spec: ImageSpec, tmp: Path) -> None:
    _sidecar_image(spec, tmp, kube_build.ensure_binaries() / spec.name)


def _sidecar_image(spec: ImageSpec, tmp: Path, binary: Path) -> None:
    """The binary as /<name> and the entrypoint; nothing else (no shell: the binaries are static)."""
    layer = tmp / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "tmp", tarfile.DIRTYPE, 0o1777)
        _add(tar, spec.name, tarfile.REGTYPE, 0o755, binary)
    _static_image(tmp, layer, spec, [f"--config.entrypoint=/{spec.name}"])


def _busybox_layer(layer: Path, extra: tuple[str, Path] | None = None) -> None:
    """busybox-static with every applet linked, a root user, and optionally one more program at the root."""
    applets = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True).stdout
    links = sorted(a for a in applets.split() if "/" in a and a != "bin/busybox")
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root"):
            _add(tar, d, tarfile.DIRTYPE, 0o755)
        _add(tar, "tmp", tarfile.DIRTYPE, 0o1777)
        _add(tar, "bin/busybox", tarfile.REGTYPE, 0o755, BUSYBOX)
        for link in links:
            _add(tar, link, tarfile.SYMTYPE, 0o777, target="/bin/busybox")
        _add(tar, "etc/passwd", tarfile.REGTYPE, 0o644, data=b"root:x:0:0:root:/root:/bin/sh\n")
        _add(tar, "etc/group", tarfile.REGTYPE, 0o644, data=b"root:x:0:\n")
        if extra:
            _add(tar, extra[0], tarfile.REGTYPE, 0o755, extra[1])


BUSYBOX_PATH = "--config.env=PATH=/bin:/sbin:/usr/bin:/usr/sbin"


def _build_busybox(spec: ImageSpec, tmp: Path) -> None:
    _busybox_layer(tmp / "layer.tar")
    # Sleeping forever is all a pause container does: containerd kills the sandbox with SIGKILL.
    sleep = ["--config.cmd=/bin/sleep", "--config.cmd=2147483647"]
    _static_image(tmp, tmp / "layer.tar", spec, [BUSYBOX_PATH, *sleep])


def _build_agnhost(spec: ImageSpec, tmp: Path) -> None:
    """Like the upstream image where the suite relies on it: /agnhost as the entrypoint, `pause` by default, and
    a shell with nsenter, mount and the usual tools (the suite runs node commands through them)."""
    _busybox_layer(tmp / "layer.tar", ("agnhost", kube_build.ensure_binaries() / "agnhost"))
    opts = [BUSYBOX_PATH, "--config.entrypoint=/agnhost", "--config.cmd=pause"]
    _static_image(tmp, tmp / "layer.tar", spec, opts)


def _build_launcher(spec: ImageSpec, tmp: Path) -> None:
    """One layer: mmdebstrap writes the root as a tar (device nodes, empty /proc and /sys) that is the layer."""
    debs = config.CACHE / "debs"  # shared with the lab image
    debs.mkdir(parents=True, exist_ok=True)
    layer = tmp / "layer.tar"
    run(["mmdebstrap", "--mode=root", "--variant=essential", "--include=" + ",".join(LAUNCHER_PACKAGES),
         f"--dpkgopt={config.REPO / IMAGE_DIR / 'dpkg-slim.cfg'}",
         # Merged /usr without the usrmerge package, which would pull in perl (as for Berth's base).
         "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
         *deb_cache_args(debs), config.SUITE, str(layer), *mirrors()])  # fmt: skip
    _static_image(tmp, layer, spec, ["--config.env=PATH=/usr/sbin:/usr/bin:/sbin:/bin"])


def _add(
    tar: tarfile.TarFile,
    name: str,
    kind: bytes,
    mode: int,
    src: Path | None = None,
    *,
    data: bytes = b"",
    target: str = "",
) -> None:
    """One layer entry owned by root, dated 0: the same inputs give the same layer digest."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, target
    if src is not None:
        info.size = src.stat().st_size
        with open(src, "rb") as f:
            tar.addfile(info, f)
    elif kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _static_image(tmp: Path, layer: Path, spec: ImageSpec, config_opts: list[str]) -> None:
    layout = tmp / "layout"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:{spec.name}"])
    run(["umoci", "raw", "add-layer", "--image", f"{layout}:{spec.name}", str(layer)])
    _configure(layout, config_opts, tag=spec.name)
    _finish(layout, spec, tmp / "image.tar")


def _configure(layout: Path, opts: list[str], tag: str = "berth") -> None:
    run(["umoci", "config", "--image", f"{layout}:{tag}", "--os=linux", "--architecture=amd64", *opts])


def _finish(layout: Path, spec: ImageSpec, out: Path) -> None:
    """Name the image by its full references in index.json, drop unused blobs, and tar the layout."""
    run(["umoci", "gc", "--layout", str(layout)])
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    index["manifests"] = [{**desc, "annotations": {"org.opencontainers.image.ref.name": ref}} for ref in spec.refs]
    (layout / "index.json").write_text(json.dumps(index))
    with tarfile.open(out, "w") as tar:
        for f in ("oci-layout", "index.json", "blobs"):
            tar.add(layout / f, arcname=f)


def main(argv: list[str]) -> int:
    if argv[:1] == ["customize-base"]:
        customize_base(Path(argv[1]))
    else:
        print(ensure_images(force="--force" in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
