"""Build and cache the guest image: a Debian bookworm root disk, the cloud kernel and a tiny initramfs.

The cache directory is keyed by a hash of everything that goes into the image (package list, this file, the
files in lab/files, the kernel version, the guests' Python requirements, the csi-sanity version): nothing
changed -> reuse, anything changed -> rebuild. A build happens in a temp directory that is renamed into place
only when complete, so an interrupted build never leaves a half image that looks valid.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lab import config

PACKAGES = [
    "open-iscsi", "multipath-tools", "nfs-common", "nfs-kernel-server", "targetcli-fb", "python3-rtslib-fb",
    "lvm2", "thin-provisioning-tools", "xfsprogs", "e2fsprogs", "openssh-server", "python3", "python3-venv",
    "kmod", "udev", "systemd", "systemd-sysv", "dbus", "iproute2", "procps", "iputils-ping", "netbase",
    "sg3-utils", "lsscsi", "util-linux", "psmisc",
    # bench/data_path.py: the published multipath device against one raw path.
    "fio",
    # The nested VM of tests/handover (QEMU without Recommends: +~46 packages; nasm assembles its boot sector).
    "qemu-system-x86", "nasm",
    # The lab Kubernetes node (python -m lab up --kubernetes): container runtime, CNI plugins, kube-proxy's tools.
    "containerd", "runc", "containernetworking-plugins", "iptables", "conntrack", "ethtool", "socat",
]  # fmt: skip

# Modules the initramfs loads to reach /dev/vda (ext4 is built into the cloud kernel).
INITRD_MODULES = ["virtio_pci", "virtio_blk", "virtio_net"]
ROOT_SIZE = "3G"
DEFAULT_CA = "/etc/ssl/certs/ca-certificates.crt"
IMAGE_FILES = ("root.raw", "vmlinuz", "initrd.img", "id_ed25519", "id_ed25519.pub", "manifest.json")
# Services a fresh Debian enables that a lab guest does not want at boot (slow boots, surprise I/O).
MASK = [
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service",
    "fstrim.timer", "systemd-networkd-wait-online.service", "systemd-networkd.service",
    "systemd-networkd.socket", "systemd-logind.service", "getty@tty1.service", "nfs-blkmap.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "modprobe@drm.service",
    "modprobe@efi_pstore.service", "sys-kernel-tracing.mount", "sys-kernel-debug.mount", "dev-hugepages.mount",
]  # fmt: skip
DISABLE = [
    "nfs-server.service", "multipathd.service", "multipathd.socket", "rtslib-fb-targetctl.service",
    "open-iscsi.service", "containerd.service",
]  # fmt: skip


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[lab image] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def berth_requirements(pyproject: Path = config.REPO / "pyproject.toml") -> list[str]:
    """Berth's runtime dependencies + the `node` extra: what a node or controller needs to run Berth."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("node", []))


def guest_requirements(pyproject: Path = config.REPO / "pyproject.toml") -> list[str]:
    """berth_requirements + pytest: what the guests' venv gets."""
    extras = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
    pytest_req = [r for r in extras.get("test", []) if re.match(r"pytest\b", r)] or ["pytest"]
    return berth_requirements(pyproject) + pytest_req[:1]


def kernel_package() -> tuple[str, str]:
    """The cloud kernel the meta package points to in the host's apt lists: (package, version)."""
    try:
        out = subprocess.run(
            ["apt-cache", "show", "linux-image-cloud-amd64"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"cannot resolve linux-image-cloud-amd64 with apt-cache (run apt-get update): {e}") from e
    # apt-cache lists the newest version first.
    m = re.search(r"^Depends:.*?(linux-image-[\w.+-]+-cloud-amd64) \(= ([^)]+)\)", out, re.M)
    if not m:
        raise BuildError("apt-cache show linux-image-cloud-amd64: no Depends on a versioned kernel")
    return m.group(1), m.group(2)


@dataclass(frozen=True)
class Inputs:
    packages: tuple[str, ...]
    kernel: tuple[str, str]
    requirements: tuple[str, ...]
    csi_sanity: str
    code_digest: str

    def digest(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def current_inputs() -> Inputs:
    h = hashlib.sha256()
    # The build code and every file copied into the image; not the rest of lab/ (CLI edits need no rebuild).
    for p in [Path(__file__), *sorted(config.FILES_DIR.iterdir())]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return Inputs(
        tuple(PACKAGES), kernel_package(), tuple(guest_requirements()), config.CSI_SANITY_VERSION, h.hexdigest()
    )


def image_dir(inputs: Inputs | None = None) -> Path:
    return config.CACHE / (inputs or current_inputs()).digest()


def is_complete(d: Path) -> bool:
    return all((d / f).exists() for f in IMAGE_FILES)


def latest_image() -> Path | None:
    """Newest complete image in the cache, for when apt-cache cannot be asked."""
    if not config.CACHE.is_dir():
        return None
    done = [d for d in config.CACHE.iterdir() if d.is_dir() and not d.name.startswith(".") and is_complete(d)]
    return max(done, key=lambda d: (d / "manifest.json").stat().st_mtime, default=None)


def ensure_image(force: bool = False) -> Path:
    """Return the cached image directory for the current inputs, building it first if needed."""
    try:
        inputs = current_inputs()
    except BuildError as e:
        # No apt lists to resolve the kernel (offline host): a complete cached image is better than nothing.
        fallback = None if force else latest_image()
        if fallback is None:
            raise
        log(f"{e}; using the newest cached image {fallback}")
        return fallback
    final = image_dir(inputs)
    if is_complete(final) and not force:
        return final
    config.CACHE.mkdir(parents=True, exist_ok=True)
    # One builder per hash; a second caller waits and then reuses the result.
    with open(config.CACHE / f".lock-{final.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(final) and not force:
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=config.CACHE))
        try:
            build(inputs, tmp)
            if final.exists():
                shutil.rmtree(final)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)  # atomic: the image appears complete or not at all
        finally:
            unmount_under(tmp)  # never rmtree through a mount mmdebstrap failed to undo
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune(keep: set[Path]) -> list[Path]:
    """Remove cached images other than the current one and those in `keep` (used by a running lab)."""
    current = image_dir()
    removed = []
    for d in config.CACHE.iterdir() if config.CACHE.is_dir() else []:
        if re.fullmatch(r"[0-9a-f]{16}", d.name) and d != current and d.resolve() not in keep:
            shutil.rmtree(d)
            removed.append(d)
    return removed


def csi_sanity_binary() -> Path:
    """csi-sanity built with `go install` (or taken from $CSI_SANITY), cached per version (~40 s to build)."""
    out = config.CACHE / "tools" / f"csi-sanity-{config.CSI_SANITY_VERSION}"
    if out.exists():
        return out
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if not go:
        raise BuildError("csi-sanity needs Go to build (https://go.dev/dl, or set PATH to include go)")
    out.parent.mkdir(parents=True, exist_ok=True)
    given = os.environ.get("CSI_SANITY")  # scripts/setup builds csi-sanity too: reuse its binary
    if given and Path(given).is_file():
        shutil.copy(given, out.with_suffix(".tmp"))
        os.rename(out.with_suffix(".tmp"), out)
        return out
    with tempfile.TemporaryDirectory(dir=out.parent) as gobin:
        log(f"building csi-sanity {config.CSI_SANITY_VERSION}")
        run(
            [go, "install", f"{config.CSI_SANITY_MODULE}@{config.CSI_SANITY_VERSION}"],
            env={**os.environ, "GOBIN": gobin, "CGO_ENABLED": "0"},
        )
        os.rename(Path(gobin) / "csi-sanity", out)
    return out


def build(inputs: Inputs, out: Path) -> None:
    t0 = time.monotonic()
    for tool in ("mmdebstrap", "mkfs.ext4", "dpkg", "apt-get", "ssh-keygen"):
        if not shutil.which(tool):
            raise BuildError(f"{tool} not found: run lab/ci-setup.sh (apt-get install mmdebstrap ...)")
    sanity = csi_sanity_binary()
    debs = config.CACHE / "debs"
    wheels = config.CACHE / "wheels"
    for d in (debs, wheels):
        d.mkdir(parents=True, exist_ok=True)
    kpkg, kver_deb = inputs.kernel
    kernel_deb = fetch_kernel(kpkg, kver_deb, debs)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "berth-lab", "-f", str(out / "id_ed25519")])

    rootfs = out / "rootfs"
    reqs = out / "requirements.txt"
    reqs.write_text("\n".join(inputs.requirements) + "\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(config.REPO),
        "BERTH_LAB_KERNEL_DEB": str(kernel_deb),
        "BERTH_LAB_OUT": str(out),
        "BERTH_LAB_WHEELS": str(wheels),
        "BERTH_LAB_SANITY": str(sanity),
    }
    hook = f'{sys.executable} -m lab.image customize "$1"'
    log(f"mmdebstrap {config.SUITE} -> {rootfs}")
    run(
        [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            "--format=directory",
            "--include=" + ",".join(inputs.packages),
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            *deb_cache_args(debs),
            f"--customize-hook={hook}",
            config.SUITE,
            str(rootfs),
            *mirrors(),
        ],
        env=env,
    )
    t1 = time.monotonic()

    # mmdebstrap sometimes reports "umount /proc failed" only as a warning; mkfs -d must not copy /proc.
    unmount_under(rootfs)
    kver = kpkg.removeprefix("linux-image-")
    shutil.copy(rootfs / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
    (out / "initrd.img").write_bytes(make_initrd(rootfs, kver))
    log(f"mkfs.ext4 -d rootfs root.raw ({ROOT_SIZE})")
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "berth-root",
            "-E",
            "root_owner=0:0",
            "-d",
            str(rootfs),
            str(out / "root.raw"),
            ROOT_SIZE,
        ]
    )
    shutil.rmtree(rootfs)
    reqs.unlink()
    manifest = {
        "inputs": inputs.__dict__,
        "digest": inputs.digest(),
        "kernel_release": kver,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": {"mmdebstrap": round(t1 - t0, 1), "total": round(time.monotonic() - t0, 1)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"image built in {time.monotonic() - t0:.0f} s")


def deb_cache_args(debs: Path) -> list[str]:
    """mmdebstrap options that share downloaded .debs between builds through `debs` (the man page recipe)."""
    return [
        "--skip=essential/unlink",
        f'--setup-hook=mkdir -p "$1"/var/cache/apt/archives/ && cp -a {debs}/. "$1"/var/cache/apt/archives/',
        f'--customize-hook=cp -a "$1"/var/cache/apt/archives/. {debs}/ && rm -rf {debs}/lock {debs}/partial',
    ]


def unmount_under(path: Path) -> None:
    """Lazily unmount every mount point below `path` (deepest first)."""
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False)


def mirrors() -> list[str]:
    # Same mirrors as the host when it has deb822 sources (so the kernel apt-cache saw is downloadable).
    host = Path("/etc/apt/sources.list.d/debian.sources")
    if host.exists() and f"Suites: {config.SUITE}" in host.read_text():
        return [str(host)]
    return [
        f"deb http://deb.debian.org/debian {config.SUITE} main",
        f"deb http://deb.debian.org/debian {config.SUITE}-updates main",
        f"deb http://deb.debian.org/debian-security {config.SUITE}-security main",
    ]


def fetch_kernel(pkg: str, version: str, debs: Path) -> Path:
    """The kernel .deb, unpacked later with dpkg -x: installing it would pull in initramfs-tools."""
    name = f"{pkg}_{version.replace(':', '%3a')}_amd64.deb"
    if not (debs / name).exists():
        log(f"apt-get download {pkg}={version}")
        with tempfile.TemporaryDirectory(dir=debs) as d:
            os.chmod(d, 0o777)  # apt drops to the _apt user for downloads
            run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=d, stdout=subprocess.DEVNULL)
            os.rename(next(Path(d).glob("*.deb")), debs / name)
    return debs / name


def chroot(root: Path, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the host's PATH may lack sbin
    return subprocess.run(["chroot", str(root), "/usr/bin/env", path, *cmd], check=check, **kw)


def customize(root: Path) -> None:
    """mmdebstrap customize hook (runs on the host with /proc, /dev and resolv.conf set up in the chroot)."""
    env = os.environ
    files = config.FILES_DIR
    out = Path(env["BERTH_LAB_OUT"])

    log("kernel: dpkg -x + depmod")
    # Not straight into root: extracting ./lib over the usrmerge symlink /lib -> usr/lib would replace it.
    with tempfile.TemporaryDirectory() as tmp:
        run(["dpkg", "-x", env["BERTH_LAB_KERNEL_DEB"], tmp])
        for top in Path(tmp).iterdir():
            dst = root / ("usr/lib" if top.name == "lib" else top.name)
            shutil.copytree(top, dst, symlinks=True, dirs_exist_ok=True)
    kver = next((root / "lib/modules").iterdir()).name
    for sub in ("drivers/gpu", "sound", "drivers/media", "drivers/infiniband", "net/wireless", "drivers/net/wireless"):
        shutil.rmtree(root / "lib/modules" / kver / "kernel" / sub, ignore_errors=True)
    chroot(root, "depmod", kver)

    log("guest files and services")
    install(files / "berth-lab-role", root / "usr/local/sbin/berth-lab-role", 0o755)
    install(files / "berth-lab-role.service", root / "etc/systemd/system/berth-lab-role.service")
    install(files / "multipath.conf", root / "etc/multipath.conf")
    install(files / "sshd-berth.conf", root / "etc/ssh/sshd_config.d/berth.conf")
    iscsid = root / "etc/iscsi/iscsid.conf"
    conf = iscsid.read_text()
    # Short timeouts so multipath fails over in seconds (the default 120 s hangs I/O for two minutes).
    for key, val in [
        ("node.session.timeo.replacement_timeout", "5"),
        ("node.conn[0].timeo.noop_out_interval", "2"),
        ("node.conn[0].timeo.noop_out_timeout", "2"),
    ]:
        conf = re.sub(rf"^#?\s*{re.escape(key)}\s*=.*$", f"{key} = {val}", conf, flags=re.M)
    iscsid.write_text(conf)
    (root / "etc/iscsi/initiatorname.iscsi").unlink(missing_ok=True)  # written per guest at boot
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").unlink(missing_ok=True)
    (root / "etc/fstab").write_text("# root is mounted by the lab initramfs\n")
    (root / "etc/systemd/journald.conf.d").mkdir(exist_ok=True)
    (root / "etc/systemd/journald.conf.d/berth.conf").write_text("[Journal]\nStorage=volatile\n")
    chroot(root, "systemctl", "enable", "-q", "berth-lab-role.service")
    chroot(root, "systemctl", "mask", "-q", *MASK)
    chroot(root, "systemctl", "disable", "-q", *DISABLE)

    log("ssh key")
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(out / "id_ed25519.pub", ssh / "authorized_keys")
    shutil.copy(out / "id_ed25519", ssh / "id_ed25519")  # guests may ssh to each other
    (ssh / "config").write_text(
        "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
    )

    log("python venv with Berth's runtime dependencies")
    venv = config.GUEST_VENV
    chroot(root, "python3", "-m", "venv", "--system-site-packages", venv)
    # A wheelhouse shared between builds (pip's own http cache does not help behind some proxies):
    # install offline from it if it has everything, else download what is missing first.
    wheels = root / "tmp/wheels"
    shutil.copytree(env["BERTH_LAB_WHEELS"], wheels, dirs_exist_ok=True)
    shutil.copy(out / "requirements.txt", root / "tmp/requirements.txt")
    pip = [*chroot_pip_env(root), f"{venv}/bin/pip", "-q", "--disable-pip-version-check", "--no-cache-dir"]
    offline = [
        *pip,
        "install",
        "--no-compile",
        "--no-index",
        "--find-links",
        "/tmp/wheels",
        "-r",
        "/tmp/requirements.txt",
    ]
    if chroot(root, *offline, check=False, stderr=subprocess.DEVNULL).returncode != 0:
        chroot(root, *pip, "wheel", "--wheel-dir", "/tmp/wheels", "-r", "/tmp/requirements.txt")
        chroot(root, *offline)
    shutil.copytree(wheels, env["BERTH_LAB_WHEELS"], dirs_exist_ok=True)
    for p in (wheels, root / "tmp/requirements.txt", root / "tmp/host-ca.crt"):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    # Berth itself is not installed: `lab up`/`lab sync` copy the working tree to /opt/berth/src.
    site = next((root / venv.lstrip("/") / "lib").glob("python3*/site-packages"))
    (site / "berth-src.pth").write_text(config.GUEST_SRC + "\n")
    (root / config.GUEST_SRC.lstrip("/")).mkdir(parents=True, exist_ok=True)

    install(Path(env["BERTH_LAB_SANITY"]), root / "usr/local/bin/csi-sanity", 0o755)


def chroot_pip_env(root: Path) -> list[str]:
    """`env -i ...` for pip in the chroot `root`: the host's proxy settings and CA bundle (a TLS-intercepting
    proxy needs its CA; copied to the chroot's /tmp/host-ca.crt, which the caller removes), but not host paths
    that do not exist in the chroot."""
    env = os.environ
    pip_env = {
        k: v
        for k, v in env.items()
        if k.lower() in {"http_proxy", "https_proxy", "no_proxy"}
        or k in {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_DEFAULT_TIMEOUT", "PIP_TRUSTED_HOST"}
    }
    cert = next(
        (
            c
            for c in (env.get("PIP_CERT"), env.get("SSL_CERT_FILE"), env.get("REQUESTS_CA_BUNDLE"), DEFAULT_CA)
            if c and Path(c).is_file()
        ),
        None,
    )
    if cert:
        shutil.copy(cert, root / "tmp/host-ca.crt")
        pip_env.update({k: "/tmp/host-ca.crt" for k in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")})
    return ["env", "-i", "HOME=/root", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *[f"{k}={v}" for k, v in pip_env.items()]]


def install(src: Path, dst: Path, mode: int = 0o644) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    os.chmod(dst, mode)


def module_closure(root: Path, kver: str, names: list[str]) -> list[str]:
    """Module files (relative to lib/modules/KVER) for `names` with dependencies first, from modules.dep."""
    base = root / "lib/modules" / kver
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in deps[mod]:
            visit(d)
        if mod not in order:
            order.append(mod)

    for n in names:
        if n in by_name:  # built in -> not in modules.dep
            visit(by_name[n])
    return order


def make_initrd(root: Path, kver: str) -> bytes:
    """A busybox initramfs (newc cpio, gzip) that loads virtio modules and runs lab/files/init."""
    entries: list[tuple[str, int, bytes]] = []  # (path, mode, data); mode includes the file type
    for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
        entries.append((d, 0o040755, b""))
    entries.append(("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes()))
    entries.append(("init", 0o100755, (config.FILES_DIR / "init").read_bytes()))
    mods = module_closure(root, kver, INITRD_MODULES)
    names = []
    for m in mods:
        data = (root / "lib/modules" / kver / m).read_bytes()
        if m.endswith(".xz") or m.endswith(".zst"):
            raise BuildError(f"compressed module {m}: busybox insmod cannot load it")
        names.append(Path(m).name)
        entries.append((f"modules/{Path(m).name}", 0o100644, data))
    entries.append(("modules.list", 0o100644, ("\n".join(names) + "\n").encode()))
    buf = io.BytesIO()
    for ino, (path, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], start=1):
        name = path.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0))
        buf.write(hdr.encode() + name)
        buf.write(b"\0" * (-(110 + len(name)) % 4))
        buf.write(data)
        buf.write(b"\0" * (-len(data) % 4))
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


if __name__ == "__main__" and sys.argv[1:2] == ["customize"]:
    customize(Path(sys.argv[2]))
