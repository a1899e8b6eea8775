"""The lab topology: one storage guest and N node guests on two private data links.

    storage (.1)  --hub link 0 (198.18.0.0/24)--  node1 (.11), node2 (.12), ...
                  --hub link 1 (198.18.1.0/24)--  node1 (.11), node2 (.12), ...

The host reaches guests only through ssh port forwards on 127.0.0.1; the data links are qemu socket
netdevs over loopback, hubbed inside the storage guest's qemu. Run state (ports, pids, overlays, console
logs) lives in a run directory with a state.json, so another shell can `python -m lab ssh node1`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from lab import config, image
from lab.cluster import Cluster
from lab.guest import Guest, GuestSpec, free_ports
from lab.ssh import SSH, Result

STATE = "state.json"
# Not copied into the guests: VCS data, local venvs, the lab's own caches and run state.
SYNC_EXCLUDE = {".git", ".venv", "venv", "artifacts", "__pycache__", ".pytest_cache", ".ruff_cache", "build",
                "dist"}  # fmt: skip
SYNC_EXCLUDE_PATHS = {"lab/cache", "lab/run"}


class LabError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


class Lab:
    def __init__(
        self,
        run_dir: Path = config.RUN_DIR,
        nodes: int = 2,
        keep: bool = False,
        owner_bound: bool = False,
        image_dir: Path | None = None,
        kubernetes: bool = False,
        storage_cpus: int = 1,
    ):
        self.run_dir = Path(run_dir).resolve()
        self.nodes = nodes
        self.storage_cpus = storage_cpus  # vCPUs of the storage guest (each a host thread: qemu's MTTCG)
        self.keep = keep  # keep disks between runs instead of fresh overlays
        self.owner_bound = owner_bound  # guests die with this process (pytest); else they outlive it (CLI)
        self.image = image_dir
        self.guests: dict[str, Guest] = {}
        self.timings: dict[str, float] = {}
        self._ssh: dict[str, SSH] = {}
        self.kubernetes = kubernetes
        self.cluster = Cluster(self.run_dir) if kubernetes else None

    # ---- state -------------------------------------------------------------------------------------------

    @classmethod
    def attach(cls, run_dir: Path = config.RUN_DIR) -> Lab:
        """The lab described by run_dir/state.json (started by `python -m lab up` or another process)."""
        path = Path(run_dir) / STATE
        if not path.exists():
            raise LabError(f"no lab in {run_dir} (start one with `python -m lab up`)")
        state = json.loads(path.read_text())
        lab = cls(run_dir, nodes=state["nodes"], keep=state["keep"], image_dir=Path(state["image"]))
        if state.get("kubernetes"):
            lab.kubernetes, lab.cluster = True, Cluster(lab.run_dir, state["kubernetes"])
        lab.timings = state.get("timings", {})
        lab._make_guests([GuestSpec.from_dict(g) for g in state["guests"]])
        return lab

    def _make_guests(self, specs: list[GuestSpec]) -> None:
        hosts = ",".join(f"{s.name}={s.octet}" for s in specs)
        self.guests = {s.name: Guest(s, self.run_dir, self.image, hosts) for s in specs}

    def save(self) -> None:
        state = {"image": str(self.image), "nodes": self.nodes, "keep": self.keep, "owner_pid": os.getpid()
                 if self.owner_bound else None, "guests": [g.spec.to_dict() for g in self.guests.values()],
                 "timings": self.timings, "kubernetes": self.cluster.state if self.cluster else None}  # fmt: skip
        tmp = self.run_dir / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.run_dir / STATE)

    def alive(self) -> dict[str, bool]:
        return {name: g.alive() for name, g in self.guests.items()}

    @property
    def names(self) -> list[str]:
        return list(self.guests)

    @property
    def node_names(self) -> list[str]:
        return [n for n, g in self.guests.items() if g.spec.role == "node"]

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def up(self, sync: bool = True) -> dict[str, float]:
        """Start all guests in parallel and wait until each answers ssh and has finished its role setup."""
        t0 = time.monotonic()
        if (self.run_dir / STATE).exists():
            old = Lab.attach(self.run_dir)
            if any(old.alive().values()):
                raise LabError(f"a lab is already running in {self.run_dir}: `python -m lab down` first")
            previous = {g.name: g.spec for g in old.guests.values()}
            old.down(keep_disks=self.keep)
        else:
            previous = {}
        self.image = self.image or image.ensure_image()
        self.timings = {"image": round(time.monotonic() - t0, 1)}
        self.run_dir.mkdir(parents=True, exist_ok=True)

        n = self.nodes
        ports = free_ports(1 + n + 2 * n)
        names = ["storage"] + [f"node{i}" for i in range(1, n + 1)]
        specs = []
        for i, name in enumerate(names):
            # Fresh identity per run; a kept disk keeps its machine-id so journals stay consistent.
            mid = previous[name].machine_id if self.keep and name in previous else uuid.uuid4().hex
            role = "storage" if i == 0 else "node"
            specs.append(
                GuestSpec(
                    name=name, role=role, octet=1 if i == 0 else 10 + i, ssh_port=ports[i], machine_id=mid, mem_mb=1024,
                    smp=self.storage_cpus if i == 0 else 1,
                )
            )  # fmt: skip
        if self.cluster:
            # Control plane first (a few seconds natively): the kubelets find it as soon as they start.
            addresses = {s.name: f"{config.SUBNETS[0]}.{s.octet}" for s in specs[1:]}
            api_port, disks, kubelet_ports = self.cluster.prepare(addresses, self.owner_bound)
            self.save()
            for spec in specs[1:]:
                spec.api_port, spec.kube_disks, spec.mem_mb = api_port, [str(d) for d in disks], 1536
                spec.kubelet_port = kubelet_ports[spec.name]
        link = ports[1 + n :]
        specs[0].link_ports = [link[k * n : (k + 1) * n] for k in range(2)]
        for i in range(1, n + 1):
            specs[i].link_ports = [[link[k * n + i - 1]] for k in range(2)]
        self._make_guests(specs)
        self.save()
        try:
            for g in self.guests.values():
                g.prepare_disks(self.keep)
            t1 = time.monotonic()
            storage = self.guests["storage"]
            storage.start(self.owner_bound)
            storage.wait_listening()
            for name in self.node_names:
                self.guests[name].start(self.owner_bound)
            self.save()
            with ThreadPoolExecutor(len(self.guests)) as pool:
                waited = dict(zip(self.names, pool.map(self._wait_guest, self.names), strict=True))
            self.timings.update({f"ssh_{k}": round(v, 1) for k, v in waited.items()})
            self.timings["ssh_all"] = round(time.monotonic() - t1, 1)
            with ThreadPoolExecutor(len(self.guests)) as pool:
                list(
                    pool.map(
                        lambda name: self.run(name, "systemctl start berth-lab-role.service", timeout=120), self.names
                    )
                )
            self.timings["ready"] = round(time.monotonic() - t1, 1)
            if sync:
                self.sync()
            if self.cluster:
                self.cluster.join(self)
                self.timings.update({f"k8s_{k}": v for k, v in self.cluster.state["timings"].items()})
            self.timings["up_total"] = round(time.monotonic() - t0, 1)
            self.save()
        except BaseException:
            self.down(keep_disks=self.keep)
            raise
        return self.timings

    def reboot(self, name: str) -> float:
        """Power-cycle guest `name` with a hardware reset (qemu's `system_reset`): what its kernel held in memory is
        lost, its disks keep what reached them. qemu keeps running, so the data links stay: the storage guest's
        qemu holds the hubs every node is connected to, and a node's connection would not come back. Then what
        `up` does for it: its role set-up and, on a cluster node, the join (mounts, containerd, kubelet).
        Returns the seconds until it is back."""
        t0 = time.monotonic()
        boot_id = self.run(name, "cat /proc/sys/kernel/random/boot_id").stdout
        self.ssh(name).close()  # its master connection dies with the guest's sshd
        out = self.guests[name].monitor("system_reset")
        if out:
            raise LabError(f"{name}: system_reset: {out}")
        while True:
            self._wait_guest(name)
            if self.run(name, "cat /proc/sys/kernel/random/boot_id", check=False).stdout not in ("", boot_id):
                break
            if time.monotonic() - t0 > 300:
                raise LabError(f"{name} did not boot again within 300 s of its reset")
            time.sleep(1)
        self.run(name, "systemctl start berth-lab-role.service", timeout=120)
        if self.cluster and name in self.node_names:
            self.run(name, f"/usr/local/sbin/berth-kube-join {name}", timeout=300)
        return time.monotonic() - t0

    def _wait_guest(self, name: str) -> float:
        g = self.guests[name]
        return self.ssh(name).wait_ready(timeout=300, alive=g.alive)

    def down(self, keep_disks: bool = False) -> None:
        """Stop every guest and remove the run directory (overlays too, unless keep_disks)."""
        for name in self.guests:
            try:
                self.ssh(name).close()
            except Exception:  # noqa: BLE001 - best effort: the master may already be gone
                pass
        with ThreadPoolExecutor(max(1, len(self.guests))) as pool:
            list(pool.map(lambda g: g.stop(), self.guests.values()))
        if self.cluster:
            self.cluster.stop()
        if not self.run_dir.exists():
            return
        if keep_disks:
            for p in self.run_dir.glob("*/*"):
                if p.suffix != ".qcow2":
                    p.unlink(missing_ok=True)
            (self.run_dir / STATE).unlink(missing_ok=True)
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if control_dir(self.run_dir) != self.run_dir:
            shutil.rmtree(control_dir(self.run_dir), ignore_errors=True)

    # ---- using the guests --------------------------------------------------------------------------------

    def ssh(self, name: str) -> SSH:
        if name not in self.guests:
            raise LabError(f"no guest {name!r} (have: {', '.join(self.guests)})")
        if name not in self._ssh:
            self._ssh[name] = SSH(
                name, self.guests[name].spec.ssh_port, self.image / "id_ed25519", control_dir(self.run_dir)
            )
        return self._ssh[name]

    def run(
        self, name: str, cmd: str, timeout: float = 120, check: bool = True, input: str | bytes | None = None
    ) -> Result:
        """Run a shell command as root in guest `name`: Result(rc, stdout, stderr)."""
        return self.ssh(name).run(cmd, timeout=timeout, check=check, input=input, text=not isinstance(input, bytes))

    def python(self, name: str, script: str, timeout: float = 120, check: bool = True) -> Result:
        """Run a Python script with the guest's venv (Berth's deps, rtslib_fb, the synced source tree)."""
        return self.run(name, f"{config.GUEST_VENV}/bin/python3 -", timeout=timeout, check=check, input=script)

    def run_all(self, cmd: str, names: list[str] | None = None, timeout: float = 120) -> dict[str, Result]:
        names = names or self.names
        with ThreadPoolExecutor(len(names)) as pool:
            return dict(zip(names, pool.map(lambda n: self.run(n, cmd, timeout=timeout), names), strict=True))

    def set_link(self, name: str, link: int, up: bool) -> None:
        """Pull (or restore) guest `name`'s virtual cable on data link 0 or 1 (qemu monitor set_link)."""
        out = self.guests[name].monitor(f"set_link d{link} {'on' if up else 'off'}")
        if out:
            raise LabError(f"{name}: set_link d{link}: {out}")

    def sync(self) -> None:
        """Copy the working tree into every guest at /opt/berth/src (on the venv's path through a .pth)."""
        t0 = time.monotonic()
        blob = tree_tarball(config.REPO)
        dst = config.GUEST_SRC
        cmd = f"rm -rf {dst}.new && mkdir -p {dst}.new && tar xzf - -C {dst}.new && rm -rf {dst} && mv {dst}.new {dst}"
        with ThreadPoolExecutor(len(self.guests)) as pool:
            list(pool.map(lambda n: self.run(n, cmd, input=blob, timeout=120), self.names))
        self.timings["sync"] = round(time.monotonic() - t0, 1)

    def collect(self, dest: Path) -> Path:
        """Console logs, journal and kernel log of every guest into dest/ (for a failed test)."""
        dest.mkdir(parents=True, exist_ok=True)

        def one(name: str) -> None:
            g = self.guests[name]
            if g.console.exists():
                shutil.copy(g.console, dest / f"{name}.console.log")
            if not g.alive():
                (dest / f"{name}.journal.txt").write_text("guest not running\n")
                return
            for what, cmd in [
                ("journal", "journalctl -b --no-pager -o short-monotonic"),
                (
                    "state",
                    "ip -br addr; iscsiadm -m session -P 1; multipath -ll; lvs -a; "
                    "exportfs -v; mount | grep -E 'nfs|xfs|ext4'",
                ),
            ]:
                try:
                    r = self.run(name, cmd, timeout=60, check=False)
                    (dest / f"{name}.{what}.txt").write_text(r.stdout + r.stderr)
                except Exception as e:  # noqa: BLE001 - collecting must not hide the test's own failure
                    (dest / f"{name}.{what}.txt").write_text(f"could not collect: {e}\n")

        with ThreadPoolExecutor(len(self.guests)) as pool:
            list(pool.map(one, self.names))
        return dest

    def status(self) -> dict:
        out = {}
        for name, g in self.guests.items():
            out[name] = {
                "role": g.spec.role,
                "alive": g.alive(),
                "pid": g.spec.pid,
                "ssh_port": g.spec.ssh_port,
                "addresses": [f"{net}.{g.spec.octet}" for net in config.SUBNETS],
                "rss_mib": rss_mib(g.spec.pid) if g.alive() else 0,
            }
        return out


@contextmanager
def running_lab(nodes: int = 2, kubernetes: bool = False, storage_cpus: int = 1) -> Iterator[Lab]:
    """The lab started by `python -m lab up` (synced to this tree), or one started for the block and stopped after
    it. The runners (sanity/run, e2e/run) use it."""
    try:
        lab = Lab.attach()
    except LabError:
        lab = Lab(nodes=nodes, kubernetes=kubernetes, storage_cpus=storage_cpus)
        lab.up()
        try:
            yield lab
        finally:
            lab.down()
        return
    if kubernetes and not lab.cluster:
        raise LabError("the running lab has no cluster: `python -m lab down`, then `python -m lab up --kubernetes`")
    lab.sync()
    yield lab


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def control_dir(run_dir: Path) -> Path:
    # Unix socket paths are limited to ~108 bytes; fall back to a short directory for deep checkouts.
    if len(str(run_dir)) < 70:
        return run_dir
    short = Path("/tmp") / f"berth-lab-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:10]}"
    short.mkdir(exist_ok=True)
    return short


def tree_tarball(repo: Path) -> bytes:
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        excluded = any(p in SYNC_EXCLUDE or p.endswith(".egg-info") for p in parts)
        if excluded or "/".join(parts[:2]) in SYNC_EXCLUDE_PATHS:
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for child in sorted(repo.iterdir()):
            tar.add(child, arcname=child.name, filter=keep)
    return buf.getvalue()
