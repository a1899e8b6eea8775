"""One qemu guest: its command line, process, monitor and disks."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab import config, pki


def mac(octet: int, nic: int) -> str:
    """Stable MACs: the guest's host octet and the NIC index (0 = control, 1.. = data links)."""
    return f"52:54:00:b0:{octet:02x}:{nic:02x}"


@dataclass
class GuestSpec:
    """Everything needed to (re)start or reach a guest; serialised into the run's state.json."""

    name: str
    role: str  # "storage" or "node"
    octet: int  # last octet on both data subnets
    ssh_port: int
    machine_id: str
    mem_mb: int = 1024
    smp: int = 1
    # Per data link: for the storage guest the ports it listens on (one per node), for a node the port it
    # connects to. The storage guest runs a qemu hub per link, so nodes also reach each other.
    link_ports: list[list[int]] = field(default_factory=list)
    pid: int = 0
    # Lab Kubernetes nodes: the apiserver's port on the host, reached at 10.0.2.100:<same port> (a guestfwd),
    # and cached raw disks: the node's programs (read-only) and containerd's state (a copy-on-write overlay).
    api_port: int = 0
    kubelet_port: int = 0  # the loopback port forwarded to the node's kubelet (lab/kubelet_proxy.py)
    kube_disks: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> GuestSpec:
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class Guest:
    def __init__(self, spec: GuestSpec, run_dir: Path, image: Path, hosts: str):
        self.spec = spec
        self.dir = run_dir / spec.name
        self.image = image
        self.hosts = hosts  # "storage=1,node1=11,..." for /etc/hosts in every guest
        self.proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def monitor_path(self) -> Path:
        return self.dir / "mon.sock"

    def prepare_disks(self, keep: bool) -> None:
        """Fresh qcow2 overlays on the cached base image (kept if `keep` and present)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        disks = [("root.qcow2", ["-F", "raw", "-b", str(self.image / "root.raw")])]
        if self.spec.role == "storage":
            disks.append(("data.qcow2", []))  # sparse; holds VG "berth" and thin pool "berth/pool"
        if len(self.spec.kube_disks) > 1:
            disks.append(("containerd.qcow2", ["-F", "raw", "-b", self.spec.kube_disks[1]]))
        for name, backing in disks:
            path = self.dir / name
            if keep and path.exists():
                continue
            path.unlink(missing_ok=True)
            size = ["20G"] if not backing else []
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(path), *size], check=True)

    def argv(self, daemonize: bool) -> list[str]:
        s = self.spec
        data_macs = [mac(s.octet, k + 1) for k in range(len(config.SUBNETS))]
        append = " ".join([
            "console=ttyS0", "root=/dev/vda", "rw", "quiet", "mitigations=off", "net.ifnames=0",
            # Only failed units reach console.log (a failure before ssh is visible there).
            "systemd.show_status=error", "tsc=reliable", f"berth.name={s.name}", f"berth.role={s.role}",
            f"berth.mid={s.machine_id}", f"berth.hosts={self.hosts}",
            "berth.ips=" + ",".join(f"{net}.{s.octet}/24" for net in config.SUBNETS),
            "berth.macs=" + ",".join([mac(s.octet, 0), *data_macs]),
        ])  # fmt: skip
        argv = [
            config.qemu_binary() or "qemu-system-x86_64", "-name", f"berth-lab-{s.name}",
            # KVM does not work on the lab hosts; tb-size caps TCG's code cache (~600 MiB RSS per guest).
            "-accel", "tcg,tb-size=256", "-cpu", "qemu64", "-smp", str(s.smp), "-m", str(s.mem_mb),
            "-nodefaults", "-display", "none", "-vga", "none",
            "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"), "-append", append,
            "-drive", f"file={self.dir / 'root.qcow2'},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        ]  # fmt: skip
        if s.role == "storage":
            argv += ["-drive", f"file={self.dir / 'data.qcow2'},if=virtio,format=qcow2,cache=unsafe,discard=unmap"]
        if s.kube_disks:
            argv += ["-drive", f"file={s.kube_disks[0]},if=virtio,format=raw,readonly=on",
                     "-drive", f"file={self.dir / 'containerd.qcow2'},if=virtio,format=qcow2,cache=unsafe"]  # fmt: skip
        # Control link: user-mode networking, no way out (restrict=on), ssh forwarded from 127.0.0.1 only;
        # a lab Kubernetes node also reaches the apiserver on the host (restrict=on spares explicit forwards).
        ctl = f"user,id=ctl,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:{s.ssh_port}-:22"
        if s.api_port:
            ctl += f",guestfwd=tcp:{pki.GUEST_API_ADDRESS}:{s.api_port}-cmd:socat - TCP:127.0.0.1:{s.api_port}"
        if s.kubelet_port:
            ctl += f",hostfwd=tcp:127.0.0.1:{s.kubelet_port}-:10250"
        argv += [
            "-netdev",
            ctl,
            "-device",
            f"virtio-net-pci,netdev=ctl,id=ctl0,mac={mac(s.octet, 0)}",
        ]
        for k, ports in enumerate(s.link_ports):
            nic = f"virtio-net-pci,id=d{k},mac={data_macs[k]}"
            if s.role == "storage":
                argv += ["-netdev", f"hubport,hubid={k},id=h{k}", "-device", f"{nic},netdev=h{k}"]
                for j, port in enumerate(ports):
                    argv += [
                        "-netdev",
                        f"socket,id=s{k}_{j},listen=127.0.0.1:{port}",
                        "-netdev",
                        f"hubport,hubid={k},id=p{k}_{j},netdev=s{k}_{j}",
                    ]
            else:
                argv += ["-netdev", f"socket,id=n{k},connect=127.0.0.1:{ports[0]}", "-device", f"{nic},netdev=n{k}"]
        argv += [
            "-serial",
            f"file:{self.console}",
            "-monitor",
            f"unix:{self.monitor_path},server=on,wait=off",
            "-pidfile",
            str(self.dir / "qemu.pid"),
        ]
        if daemonize:
            argv += ["-daemonize"]
        return argv

    def start(self, owner_bound: bool) -> None:
        """Start qemu. `owner_bound`: qemu dies with this process (pytest), else it outlives it (CLI)."""
        self.console.unlink(missing_ok=True)
        log = open(self.dir / "qemu.log", "wb")
        if owner_bound:
            # PR_SET_PDEATHSIG: the kernel kills qemu if the owner dies, even by SIGKILL, so no guest leaks.
            # Must be started from the thread that lives as long as the lab (pytest's main thread).
            def bind() -> None:
                os.setpgrp()  # a Ctrl-C in the terminal goes to pytest, which then stops the guests cleanly
                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)

            self.proc = subprocess.Popen(
                self.argv(daemonize=False),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=bind,
            )
            self.spec.pid = self.proc.pid
        else:
            subprocess.run(
                self.argv(daemonize=True),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
                start_new_session=True,
            )
            pidfile = self.dir / "qemu.pid"
            if not pidfile.exists():
                raise RuntimeError(f"{self.name}: qemu did not start: {(self.dir / 'qemu.log').read_text()}")
            self.spec.pid = int(pidfile.read_text())
        log.close()

    def wait_listening(self, timeout: float = 20) -> None:
        """Storage guest: wait until qemu listens on its link ports, so nodes can connect.

        Looks at /proc/net/tcp rather than connecting: each socket netdev accepts exactly one peer.
        """
        want = {p for ports in self.spec.link_ports for p in ports}
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if want <= listening_ports():
                return
            if not self.alive():
                raise RuntimeError(f"{self.name}: qemu exited: {(self.dir / 'qemu.log').read_text()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: qemu does not listen on {sorted(want)}")

    def alive(self) -> bool:
        pid = self.spec.pid
        if not pid:
            return False
        if self.proc is not None and self.proc.poll() is not None:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        # Guard against a recycled pid: it must be our qemu with our run directory.
        return str(self.dir).encode() in cmdline and b"qemu" in cmdline

    def monitor(self, command: str, timeout: float = 10) -> str:
        """One HMP command on the monitor socket (e.g. `set_link d1 off`); returns its output."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.monitor_path))
            read_until_prompt(sock)
            sock.sendall(command.encode() + b"\n")
            out = read_until_prompt(sock)
        lines = out.replace("\r", "").splitlines()
        return "\n".join(line for line in lines[1:] if not line.startswith("(qemu)")).strip()

    def stop(self, timeout: float = 10) -> None:
        if not self.alive():
            self._reap()
            return
        try:
            self.monitor("quit", timeout=3)
        except OSError:
            pass
        t0 = time.monotonic()
        while self.alive() and time.monotonic() - t0 < timeout:
            time.sleep(0.1)
        if self.alive():
            os.kill(self.spec.pid, signal.SIGKILL)
            time.sleep(0.2)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def read_until_prompt(sock: socket.socket) -> str:
    buf = b""
    while not buf.rstrip().endswith(b"(qemu)"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


def listening_ports() -> set[int]:
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "0A":  # TCP_LISTEN
            ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
