"""Build and cache the lab cluster's Go programs: Kubernetes and its e2e suite, etcd, the CSI sidecars, crictl, helm.

Everything comes from the Go module proxy through the wrapper modules in lab/k8s/ (each pins one release; see
their go.mod for why a wrapper is needed). The binaries are cached machine-wide under
CACHE/kube/<hash of the inputs>/bin, like the guest image: a warm machine reuses them, a changed version or
wrapper rebuilds them. A build goes to a temp directory that is renamed into place only when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lab import config

K8S_DIR = config.LAB_DIR / "k8s"
KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.16"
CRICTL_VERSION = "v1.34.0"
HELM_VERSION = "v4.3.2"
# The sidecar releases that support Kubernetes 1.35 and that the module proxy serves (lab/k8s/sidecars/go.mod).
SIDECARS = {
    "csi-provisioner": ("github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner", "v6.3.0"),
    "csi-attacher": ("github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher", "v4.12.0"),
    "csi-snapshotter": ("github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter", "v8.6.0"),
    "snapshot-controller": ("github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller", "v8.6.0"),
    "csi-resizer": ("github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer", "v2.2.0"),
}
KUBE_PROGRAMS = ["kubelet", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl"]
# Kubernetes' own e2e suite (a test binary), agnhost (the program of the suite's main pod image) and the ginkgo
# CLI that runs the suite's specs in parallel (e2e/run --procs), at the version the suite links.
E2E_PROGRAMS = {
    "e2e.test": "k8s.io/kubernetes/test/e2e",
    "agnhost": "k8s.io/kubernetes/test/images/agnhost",
    "ginkgo": "github.com/onsi/ginkgo/v2/ginkgo",
}
PROGRAMS = [*KUBE_PROGRAMS, *E2E_PROGRAMS, "etcd", *SIDECARS, "crictl", "helm"]
BUILD_ENV = {"CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "-buildvcs=false"}


def log(msg: str) -> None:
    print(f"[lab kube] {msg}", file=sys.stderr, flush=True)


def inputs_hash() -> str:
    h = hashlib.sha256()
    for f in sorted(K8S_DIR.rglob("*")):
        if f.is_file() and f.suffix in {".mod", ".sum", ".go"}:
            h.update(str(f.relative_to(K8S_DIR)).encode() + b"\0" + f.read_bytes())
    # What decides the binaries besides the wrapper modules (not this whole file: a comment must not rebuild).
    h.update(repr((KUBERNETES_VERSION, ETCD_VERSION, CRICTL_VERSION, HELM_VERSION, SIDECARS, PROGRAMS,
                   _kube_ldflags(), BUILD_ENV)).encode())
    return h.hexdigest()[:16]


def bin_dir() -> Path:
    return config.CACHE / "kube" / inputs_hash() / "bin"


def _kube_ldflags() -> str:
    minor = KUBERNETES_VERSION.split(".")[1]
    pairs = {
        "k8s.io/component-base/version.gitVersion": KUBERNETES_VERSION,
        "k8s.io/component-base/version.gitMajor": "1",
        "k8s.io/component-base/version.gitMinor": minor,
        "k8s.io/component-base/version.gitTreeState": "clean",
        "k8s.io/component-base/version.buildDate": "2026-01-01T00:00:00Z",
        "k8s.io/client-go/pkg/version.gitVersion": KUBERNETES_VERSION,
        "k8s.io/client-go/pkg/version.gitMajor": "1",
        "k8s.io/client-go/pkg/version.gitMinor": minor,
    }
    return "-s -w " + " ".join(f"-X {k}={v}" for k, v in pairs.items())


def _go(args: list[str], cwd: Path, out: Path) -> None:
    env = {**os.environ, **BUILD_ENV, "GOBIN": str(out)}
    subprocess.run(["nice", "-n", "10", "go", *args], cwd=cwd, env=env, check=True)


def build(out: Path, only: list[str] | None = None) -> None:
    """Build the programs (all, or `only`) into `out`. kubelet first: the others reuse most of its build cache."""
    want = set(only or PROGRAMS)
    kube = {prog: ["build", f"k8s.io/kubernetes/cmd/{prog}"] for prog in KUBE_PROGRAMS}
    for prog, pkg in E2E_PROGRAMS.items():
        kube[prog] = ["test", "-c", pkg] if prog.endswith(".test") else ["build", pkg]
    for prog, (*verb, pkg) in kube.items():
        if prog in want:
            log(f"{prog} {KUBERNETES_VERSION}")
            argv = [*verb, "-trimpath", "-ldflags", _kube_ldflags(), "-o", str(out / prog), pkg]
            _go(argv, K8S_DIR / "kubernetes", out)
    if "etcd" in want:
        log(f"etcd {ETCD_VERSION}")
        _go(["build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "etcd"), "."], K8S_DIR / "etcd", out)
    for prog, (pkg, version) in SIDECARS.items():
        if prog in want:
            log(f"{prog} {version}")
            ld = f"-s -w -X main.version={version}"
            _go(["build", "-trimpath", "-ldflags", ld, "-o", str(out / prog), pkg], K8S_DIR / "sidecars", out)
    tools = {
        "crictl": (f"sigs.k8s.io/cri-tools/cmd/crictl@{CRICTL_VERSION}",
                   f"-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version={CRICTL_VERSION}"),
        "helm": (f"helm.sh/helm/v4/cmd/helm@{HELM_VERSION}", "-s -w"),
    }  # fmt: skip
    for prog, (ref, ld) in tools.items():
        if prog in want:
            log(f"{prog} {ref.rsplit('@', 1)[1]}")
            _go(["install", "-trimpath", "-ldflags", ld, ref], Path(tempfile.gettempdir()), out)


def ensure_binaries(force: bool = False) -> Path:
    """The cached bin directory for the current inputs, built first if missing. Safe to call concurrently."""
    target = bin_dir()
    root = target.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir() and not force:
            return target
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
        try:
            build(tmp / "bin")
            missing = [p for p in PROGRAMS if not (tmp / "bin" / p).is_file()]
            if missing:
                raise RuntimeError(f"build finished without {missing}")
            shutil.rmtree(target.parent, ignore_errors=True)
            tmp.rename(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_binaries(force="--force" in sys.argv))
