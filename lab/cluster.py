"""A real Kubernetes in the lab: the control plane on this host, kubelet + containerd in the node guests.

    host (native speed, loopback):  etcd, kube-apiserver, kube-controller-manager, kube-scheduler
    node guests (TCG):              containerd + runc, CNI bridge, kubelet, kube-proxy

The guests reach the apiserver at 10.0.2.100:<its port> on their control NIC: a qemu `guestfwd` rule hands each such
connection to socat on the host, which connects to the apiserver's loopback port. Pods reach it the normal way,
through the `kubernetes` Service (10.96.0.1:443) that kube-proxy translates to that address. Nothing is patched:
RBAC, the node authorizer, NodeRestriction and Pod Security admission are on as in a production cluster.

The programs and images come from lab.kube_build and lab.kube_images (machine-wide caches). The node guests get the
programs on a read-only disk (mounted at /opt/kube) and containerd's state, every image already unpacked, on a
copy-on-write overlay (mounted at /var/lib/containerd), so nothing large crosses ssh and nothing is imported there.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from lab import config, kube_build, pki
from lab.guest import free_ports

if TYPE_CHECKING:
    from lab.topology import Lab

POD_CIDR = "10.244.0.0/16"


class ClusterError(RuntimeError):
    pass


# ---- the node disks: programs, and containerd's state with every image already unpacked --------------------


def _mkfs(stage: Path, out: Path, label: str) -> None:
    """An ext4 raw disk image holding `stage`, renamed into place only when complete."""
    used = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file() and not f.is_symlink())
    size_mb = used // 2**20 * 3 // 2 + 256
    raw = out.with_suffix(".tmp")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(stage), str(raw), f"{size_mb}M"], check=True,
                   capture_output=True)  # fmt: skip
    os.replace(raw, out)


def _prune_disks(kind: str, keep: Path, newest: int = 2) -> None:
    """Drop all but the `newest` cached disks of one kind (each code change makes a new containerd disk)."""
    disks = sorted(keep.parent.glob(f"{kind}-*.raw"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [d for d in disks if d != keep][newest - 1 :]:
        old.unlink(missing_ok=True)


def programs_disk(bin_dir: Path) -> Path:
    """bin/{kubelet,kube-proxy,crictl} on a raw ext4 disk, cached per build of the programs."""
    out = config.CACHE / "kube-disk" / f"programs-{bin_dir.parent.name}.raw"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            (Path(tmp) / "bin").mkdir()
            for prog in ("kubelet", "kube-proxy", "crictl"):
                shutil.copy(bin_dir / prog, Path(tmp) / "bin" / prog)
            _mkfs(Path(tmp), out, "berth-kube")
        _prune_disks("programs", out)
    return out


CONTAINERD_CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{state}/containerd.sock"
"""


def containerd_disk(images_dir: Path) -> Path:
    """containerd's /var/lib/containerd with every image of images_dir imported and unpacked, as a raw disk.

    Importing in the guests cost minutes per node under TCG (decompressing and writing ~600 MB of layers); a
    private containerd on this host does it natively in seconds, once per image set. Each node boots with a
    copy-on-write overlay of it, so containerd there finds every image ready.
    """
    out = config.CACHE / "kube-disk" / f"containerd-{images_dir.name}.raw"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root, state = Path(tmp) / "root", Path(tmp) / "state"
        state.mkdir()
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(CONTAINERD_CONFIG.format(root=root, state=state))
        with open(Path(tmp) / "containerd.log", "wb") as log_file:
            daemon = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            ctr = ["ctr", "--address", str(state / "containerd.sock"), "-n", "k8s.io"]
            for _ in range(100):
                if subprocess.run([*ctr, "version"], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            images = json.loads((images_dir / "images.json").read_text())
            for img in images:
                subprocess.run([*ctr, "images", "import", str(images_dir / img["file"])], check=True,
                               capture_output=True)  # fmt: skip
            have = set(subprocess.run([*ctr, "images", "ls", "-q"], check=True, capture_output=True,
                                      text=True).stdout.split())  # fmt: skip
            missing = [ref for img in images for ref in img["refs"] if ref not in have]
            if missing:
                raise ClusterError(f"containerd did not import {missing}")
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
        _mkfs(root, out, "containerd")
    _prune_disks("containerd", out)
    return out


# ---- host processes ---------------------------------------------------------------------------------------


class HostProcess:
    """One control-plane program on the host; with owner_bound it dies with this process (pytest)."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.pid = 0

    def start(self, owner_bound: bool) -> None:
        def bind() -> None:
            os.setpgrp()
            if owner_bound:
                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

        with open(self.log_path, "ab") as out:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=bind)  # fmt: skip
        self.pid = proc.pid


def stop_pids(pids: dict[str, int], timeout: float = 10) -> None:
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    t0 = time.monotonic()
    for pid in pids.values():
        while time.monotonic() - t0 < timeout:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not Path(f"/proc/{pid}").exists() or "zombie" in _proc_state(pid):
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


EGRESS_SELECTOR = """apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: {socket}
"""


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler on 127.0.0.1, state in `d`."""

    def __init__(self, d: Path, bin_dir: Path, api_port: int, etcd_ports: tuple[int, int],
                 kubelet_routes: dict[str, int]):  # fmt: skip
        self.d = d
        self.bin = bin_dir
        self.api_port = api_port
        self.etcd_ports = etcd_ports
        self.kubelet_routes = kubelet_routes  # "node address:10250" -> the loopback port forwarded to it
        self.pki = d / "pki"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.d / "admin.kubeconfig"

    def prepare(self, nodes: list[str]) -> None:
        pki.make_pki(self.pki, nodes)
        local = f"https://127.0.0.1:{self.api_port}"
        for user in ("admin", "kube-controller-manager", "kube-scheduler"):
            (self.d / f"{user}.kubeconfig").write_text(pki.kubeconfig(self.pki, user, local))
        (self.d / "kubelet-routes.json").write_text(json.dumps(self.kubelet_routes))
        (self.d / "egress-selector.yaml").write_text(EGRESS_SELECTOR.format(socket=self.d / "kubelet-proxy.sock"))

    def processes(self) -> list[HostProcess]:
        p, b, d = self.pki, self.bin, self.d
        client, peer = self.etcd_ports
        etcd = f"http://127.0.0.1:{client}"
        kcm_cfg, sched_cfg = d / "kube-controller-manager.kubeconfig", d / "kube-scheduler.kubeconfig"
        return [
            HostProcess("kubelet-proxy", [
                sys.executable, str(Path(__file__).with_name("kubelet_proxy.py")), str(d / "kubelet-proxy.sock"),
                str(d / "kubelet-routes.json"),
            ], d / "kubelet-proxy.log"),
            HostProcess("etcd", [
                str(b / "etcd"), "--name", "lab", "--data-dir", str(d / "etcd"),
                "--listen-client-urls", etcd, "--advertise-client-urls", etcd,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"lab=http://127.0.0.1:{peer}", "--listen-metrics-urls", "",
                "--unsafe-no-fsync", "--quota-backend-bytes", str(256 * 2**20), "--log-level", "warn",
            ], d / "etcd.log"),
            HostProcess("kube-apiserver", [
                str(b / "kube-apiserver"), "--bind-address=127.0.0.1", f"--secure-port={self.api_port}",
                f"--advertise-address={pki.GUEST_API_ADDRESS}", f"--etcd-servers={etcd}",
                f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p / 'sa.pub'}", f"--service-account-signing-key-file={p / 'sa.key'}",
                f"--service-cluster-ip-range={pki.SERVICE_CIDR}", "--authorization-mode=Node,RBAC",
                f"--requestheader-client-ca-file={p / 'ca.crt'}", "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true", "--profiling=false",
                # The advertised address is what the `kubernetes` Service points at: the guests' guestfwd.
                "--endpoint-reconciler-type=lease", "--v=1",
                # Connections to the kubelets (logs, exec) go through lab/kubelet_proxy.py.
                f"--egress-selector-config-file={d / 'egress-selector.yaml'}",
            ], d / "kube-apiserver.log"),
            HostProcess("kube-controller-manager", [
                str(b / "kube-controller-manager"), f"--kubeconfig={kcm_cfg}",
                f"--authentication-kubeconfig={kcm_cfg}", f"--authorization-kubeconfig={kcm_cfg}",
                "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false",
                "--use-service-account-credentials=true", f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={p / 'ca.crt'}", f"--cluster-signing-cert-file={p / 'ca.crt'}",
                f"--cluster-signing-key-file={p / 'ca.key'}", "--controllers=*,-bootstrapsigner,-tokencleaner",
                "--profiling=false", "--v=1",
            ], d / "kube-controller-manager.log"),
            HostProcess("kube-scheduler", [
                str(b / "kube-scheduler"), f"--kubeconfig={sched_cfg}",
                f"--authentication-kubeconfig={sched_cfg}", f"--authorization-kubeconfig={sched_cfg}",
                "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false", "--profiling=false",
            ], d / "kube-scheduler.log"),
        ]  # fmt: skip

    def start(self, owner_bound: bool, timeout: float = 60) -> dict[str, int]:
        """Start all four; returns their pids once the apiserver answers /readyz."""
        pids: dict[str, int] = {}
        procs = self.processes()
        try:
            for proc in procs:
                proc.start(owner_bound)
                pids[proc.name] = proc.pid
                if proc.name == "etcd":
                    self._wait(f"http://127.0.0.1:{self.etcd_ports[0]}/health", timeout, "etcd", proc)
                elif proc.name == "kube-apiserver":
                    self._wait_api(timeout, proc)
        except BaseException:
            stop_pids(pids)
            raise
        return pids

    def _wait(self, url: str, timeout: float, what: str, proc: HostProcess) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            self._check_alive(proc)
            time.sleep(0.2)
        raise ClusterError(f"{what} not ready after {timeout} s; see {proc.log_path}")

    def _wait_api(self, timeout: float, proc: HostProcess) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            r = self.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
            if r.returncode == 0:
                return
            self._check_alive(proc)
            time.sleep(0.5)
        raise ClusterError(f"kube-apiserver not ready after {timeout} s; see {proc.log_path}")

    @staticmethod
    def _check_alive(proc: HostProcess) -> None:
        if not Path(f"/proc/{proc.pid}").exists() or "zombie" in _proc_state(proc.pid):
            tail = proc.log_path.read_text(errors="replace")[-3000:]
            raise ClusterError(f"{proc.name} exited:\n{tail}")

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
                ) -> subprocess.CompletedProcess:  # fmt: skip
        argv = [str(self.bin / "kubectl"), f"--kubeconfig={self.admin_kubeconfig}", *args]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise ClusterError(f"kubectl {shlex.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r


# ---- node join --------------------------------------------------------------------------------------------

KUBELET_CONFIG = """apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: systemd
failSwapOn: false
authentication:
  x509: {clientCAFile: /etc/kubernetes/pki/ca.crt}
  webhook: {enabled: true}
  anonymous: {enabled: false}
authorization: {mode: Webhook}
# The images were imported from the node disk: nothing can be pulled again, so never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%}
# No periodic du of every volume: CPU is scarce under TCG.
volumeStatsAggPeriod: 0s
serializeImagePulls: false
maxPods: 30
resolvConf: /etc/resolv.conf
"""

UNIT = """[Unit]
Description={desc}
After=containerd.service
Wants=containerd.service

[Service]
ExecStart={exec}
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""

# Runs in the node guest as root; $1 = node name, $2 = pod subnet. The files were unpacked into / before.
JOIN_SCRIPT = r"""
set -eu
NODE=$1
mkdir -p /opt/kube /var/lib/containerd
mountpoint -q /opt/kube || mount -o ro LABEL=berth-kube /opt/kube
# After a reboot containerd has started on the empty directory already: stop it, so that it opens the disk's store.
if ! mountpoint -q /var/lib/containerd; then
  systemctl stop containerd
  mount LABEL=containerd /var/lib/containerd
fi
modprobe -a overlay br_netfilter veth bridge nf_conntrack
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
# A default route on the control NIC: locally generated traffic to Service IPs needs one before kube-proxy's
# DNAT rewrites it to the apiserver's guestfwd address (qemu's restrict=on still lets nothing else out).
CTL=$(ip -o -4 addr show | awk '$4 == "10.0.2.15/24" {print $2}')
ip route replace default via 10.0.2.2 dev "$CTL"
[ -s /etc/resolv.conf ] || echo "nameserver 127.0.0.1" > /etc/resolv.conf
# Berth's node prerequisites (docs/deploy.md): iscsid runs already; multipathd for the two-portal volumes.
systemctl unmask multipathd.service multipathd.socket 2>/dev/null || true
systemctl start multipathd
mkdir -p /etc/containerd
containerd config default > /etc/containerd/config.toml
# Debian's CNI plugins live in /usr/lib/cni; kubelet and containerd agree on the systemd cgroup driver.
sed -i -e 's/SystemdCgroup = false/SystemdCgroup = true/' -e 's#bin_dir = "/opt/cni/bin"#bin_dir = "/usr/lib/cni"#' \
    /etc/containerd/config.toml
systemctl start containerd
for i in $(seq 50); do ctr version >/dev/null 2>&1 && break; sleep 0.2; done
systemctl daemon-reload
systemctl enable --now kubelet.service kube-proxy.service
"""



def node_files(cp: ControlPlane, node: str, index: int, node_ip: str) -> dict[str, tuple[str, int]]:
    """Path -> (content, mode) of everything kubelet and kube-proxy need on one node."""
    server = f"https://{pki.GUEST_API_ADDRESS}:{cp.api_port}"
    cni = {
        "cniVersion": "1.0.0",
        "name": "lab",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": f"10.244.{index}.0/24"}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }  # fmt: skip
    kubelet = " ".join([
        "/opt/kube/bin/kubelet", "--config=/etc/kubernetes/kubelet.yaml",
        "--kubeconfig=/etc/kubernetes/kubelet.kubeconfig", f"--hostname-override={node}", f"--node-ip={node_ip}",
        "--v=1",
    ])  # fmt: skip
    proxy = " ".join([
        "/opt/kube/bin/kube-proxy", "--kubeconfig=/etc/kubernetes/kube-proxy.kubeconfig",
        f"--hostname-override={node}", f"--cluster-cidr={POD_CIDR}", "--proxy-mode=iptables",
        "--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256", "--v=1",
    ])  # fmt: skip
    return {
        "etc/kubernetes/pki/ca.crt": ((cp.pki / "ca.crt").read_text(), 0o644),
        "etc/kubernetes/kubelet.kubeconfig": (pki.kubeconfig(cp.pki, node, server), 0o600),
        "etc/kubernetes/kube-proxy.kubeconfig": (pki.kubeconfig(cp.pki, "kube-proxy", server), 0o600),
        "etc/kubernetes/kubelet.yaml": (KUBELET_CONFIG, 0o644),
        "etc/crictl.yaml": ("runtime-endpoint: unix:///run/containerd/containerd.sock\n", 0o644),
        "etc/cni/net.d/10-lab.conflist": (json.dumps(cni, indent=1), 0o644),
        "etc/systemd/system/kubelet.service": (UNIT.format(desc="kubelet", exec=kubelet), 0o644),
        "etc/systemd/system/kube-proxy.service": (UNIT.format(desc="kube-proxy", exec=proxy), 0o644),
        "usr/local/sbin/berth-kube-join": (JOIN_SCRIPT, 0o755),
    }


def files_tarball(files: dict[str, tuple[str, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, (content, mode) in files.items():
            data = content.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Cluster:
    """The Kubernetes side of a lab: `prepare` before the guests boot, `join` once they answer ssh."""

    def __init__(self, run_dir: Path, state: dict | None = None):
        self.dir = run_dir / "k8s"
        self.state = state or {}

    @property
    def control_plane(self) -> ControlPlane:
        st = self.state
        return ControlPlane(self.dir, Path(st["bin_dir"]), st["api_port"], tuple(st["etcd_ports"]),
                            st.get("kubelet_routes", {}))  # fmt: skip

    def prepare(self, nodes: dict[str, str], owner_bound: bool) -> tuple[int, list[Path], dict[str, int]]:
        """Build or reuse programs, images and node disks; start the control plane. `nodes`: name -> address.
        -> (api port, node disks, name -> the loopback port its guest must forward to its kubelet's 10250)."""
        from lab import kube_images  # the image recipe needs the repository's build tools, only here

        t0 = time.monotonic()
        bin_dir = kube_build.ensure_binaries()
        images = kube_images.ensure_images()
        disks = [programs_disk(bin_dir), containerd_disk(images)]
        self.state["timings"] = {"artifacts": round(time.monotonic() - t0, 1)}
        api_port, client, peer, *kubelet_ports = free_ports(3 + len(nodes))
        kubelet_port = dict(zip(nodes, kubelet_ports, strict=True))
        # The apiserver dials a node by name or by address, whichever it prefers (--kubelet-preferred-address-types).
        routes = {f"{host}:10250": kubelet_port[name] for name, address in nodes.items() for host in (name, address)}
        self.state.update(bin_dir=str(bin_dir), images=str(images), api_port=api_port, etcd_ports=[client, peer],
                          kubelet_routes=routes)  # fmt: skip
        self.dir.mkdir(parents=True, exist_ok=True)
        cp = self.control_plane
        cp.prepare(list(nodes))
        t1 = time.monotonic()
        self.state["pids"] = cp.start(owner_bound)
        self.state["timings"]["control_plane"] = round(time.monotonic() - t1, 1)
        return api_port, disks, kubelet_port

    def join(self, lab: Lab, timeout: float = 420) -> None:
        """Configure and start containerd, kubelet and kube-proxy on every node; wait until all are Ready."""
        t0 = time.monotonic()
        cp = self.control_plane

        def one(index_name: tuple[int, str]) -> None:
            index, node = index_name
            octet = lab.guests[node].spec.octet
            blob = files_tarball(node_files(cp, node, index, f"{config.SUBNETS[0]}.{octet}"))
            lab.run(node, "tar xf - -C / --no-same-owner", input=blob)
            lab.run(node, f"/usr/local/sbin/berth-kube-join {node}", timeout=300)

        with ThreadPoolExecutor(len(lab.node_names)) as pool:
            list(pool.map(one, enumerate(lab.node_names, start=1)))
        self.state["timings"]["join"] = round(time.monotonic() - t0, 1)
        self.wait_nodes_ready(lab.node_names, timeout)
        self.state["timings"]["nodes_ready"] = round(time.monotonic() - t0, 1)
        self.apply_snapshot_crds()

    def wait_nodes_ready(self, nodes: list[str], timeout: float) -> None:
        cp = self.control_plane
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            r = cp.kubectl("get", "nodes", "-o", "json", check=False)
            ready = set()
            if r.returncode == 0:
                for item in json.loads(r.stdout)["items"]:
                    conds = {c["type"]: c["status"] for c in item["status"].get("conditions", [])}
                    if conds.get("Ready") == "True":
                        ready.add(item["metadata"]["name"])
            if ready >= set(nodes):
                return
            time.sleep(2)
        raise ClusterError(f"nodes not Ready after {timeout} s: {cp.kubectl('get', 'nodes', check=False).stdout}")

    def apply_snapshot_crds(self) -> None:
        """The VolumeSnapshot CRDs of the pinned external-snapshotter, from the Go module cache."""
        crds = snapshot_crd_dir()
        self.control_plane.kubectl("apply", "-k", str(crds))

    def stop(self) -> None:
        stop_pids(self.state.get("pids", {}))


def snapshot_crd_dir() -> Path:
    modcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    version = kube_build.SIDECARS["snapshot-controller"][1]
    d = Path(modcache) / f"github.com/kubernetes-csi/external-snapshotter/client/v8@{version}/config/crd"
    if not d.is_dir():
        subprocess.run(["go", "mod", "download", f"github.com/kubernetes-csi/external-snapshotter/client/v8@{version}"],
                       cwd=kube_build.K8S_DIR / "sidecars", check=True)  # fmt: skip
    return d
