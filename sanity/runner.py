"""Start Berth in a lab node and run csi-sanity against it there.

csi-sanity runs inside the node guest because NodeStage/NodePublish act on that guest's kernel (iSCSI login,
mounts); Berth runs there in `--mode all`, its controller reaching the storage guest over SSH in restricted mode:
with a key that the storage guest holds to berth-host, so every controller operation the suite drives passes
through that forced command (docs/storage-host.md).
"""

from __future__ import annotations

import atexit
import json
import re
import select
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from csi_driver.storage.host_access import berth_host_script
from lab import config as lab_config
from lab.ginkgo import ginkgo_counts
from lab.topology import Lab

REPO = lab_config.REPO
SRC = lab_config.GUEST_SRC
PYTHON = f"{lab_config.GUEST_VENV}/bin/python"
SOCKET = "/run/berth/csi.sock"
RESTRICTED_KEY = "/var/lib/berth/host_ed25519"  # a node's key for the storage host in restricted mode
MiB = 1 << 20

# Volume size: a multiple of the 4 MiB extent, so "exact capacity" specs hold; small so 100+ volumes are cheap.
# NFS volumes hold xfs, which needs 300 MB: with less, "same name, different size" would round to one size.
COMMON_FLAGS = [
    f"--csi.endpoint=unix://{SOCKET}",
    "--csi.testnodevolumeattachlimit",
    "--ginkgo.no-color",
    "--ginkgo.v",
    "--ginkgo.timeout=40m",
]
PROFILES = {
    "iscsi-mount": [
        f"--csi.testvolumesize={64 * MiB}",
        "--csi.testvolumeaccesstype=mount",
        f"--csi.testvolumeparameters={SRC}/sanity/iscsi.yaml",
        f"--csi.testvolumemutableparameters={SRC}/sanity/iscsi-mutable.yaml",
    ],
    "iscsi-block": [
        f"--csi.testvolumesize={64 * MiB}",
        "--csi.testvolumeaccesstype=block",
        f"--csi.testvolumeparameters={SRC}/sanity/iscsi-block.yaml",
        f"--csi.testvolumemutableparameters={SRC}/sanity/iscsi-mutable.yaml",
    ],
    "nfs": [
        f"--csi.testvolumesize={512 * MiB}",
        "--csi.testvolumeaccesstype=mount",
        f"--csi.testvolumeparameters={SRC}/sanity/nfs.yaml",
        f"--csi.testvolumemutableparameters={SRC}/sanity/nfs-mutable.yaml",
    ],
}
# The backend each profile's parameter file names (sanity/*.yaml).
PROFILE_BACKENDS = {"iscsi-mount": "lab-iscsi", "iscsi-block": "lab-iscsi-block", "nfs": "lab-nfs"}


@dataclass
class SanityResult:
    profile: str
    passed: int
    failed: int
    pending: int
    skipped: int
    seconds: float
    output: str

    @property
    def summary(self) -> str:
        return (
            f"{self.profile}: {self.passed} Passed | {self.failed} Failed | {self.pending} Pending | "
            f"{self.skipped} Skipped in {self.seconds:.0f}s"
        )

    def failure_lines(self, limit: int = 20) -> list[str]:
        """Ginkgo's [FAIL] (which spec) and [FAILED] (why) lines, once each: what CI's summary shows of a failure."""
        lines = [line.strip() for line in self.output.splitlines() if "[FAIL" in line]
        return list(dict.fromkeys(lines))[:limit]

    def skipped_specs(self) -> list[str]:
        return re.findall(r"^S \[SKIPPED\].*\n(.+)", self.output, re.MULTILINE)

    def unexpected_skips(self) -> list[str]:
        """Every skipped spec: Berth offers every service and capability csi-sanity tests (GroupController included),
        so a skip means a capability went missing."""
        return self.skipped_specs()


def lab_config_text(only_backend: str | None = None, identity_file: str | None = None) -> str:
    """sanity/berth-lab.yaml, or a copy serving only `only_backend` (ListVolumes has no parameters, so a controller
    lists every backend it serves: profiles running at once must not see each other's volumes), or reaching the
    storage host with another SSH key."""
    text = (REPO / "sanity" / "berth-lab.yaml").read_text()
    if only_backend is None and identity_file is None:
        return text
    config = yaml.safe_load(text)
    if only_backend is not None:
        config["backends"] = {only_backend: config["backends"][only_backend]}
        config["default_backend"] = only_backend
    for backend in config["backends"].values():
        backend["host"]["ssh_identity_file"] = identity_file or backend["host"]["ssh_identity_file"]
    return yaml.safe_dump(config, sort_keys=False)


def restrict_host_access(lab: Lab, node: str) -> None:
    """Restricted SSH access (docs/storage-host.md): a key of the node's own (RESTRICTED_KEY), held on the storage
    host to berth-host, this tree's forced command, as `berth host-command` writes it."""
    key = RESTRICTED_KEY
    make_key = f"mkdir -p /var/lib/berth; test -f {key} || ssh-keygen -q -t ed25519 -N '' -C berth-{node} -f {key}"
    public = lab.run(node, f"{make_key}; cat {key}.pub").stdout.strip()
    entry = shlex.quote(f'restrict,command="/usr/local/sbin/berth-host" {public}')
    keys = "/root/.ssh/authorized_keys"
    # Profiles start at once on several nodes: each writes its own temporary file and renames it into place.
    script = (
        f"install -m 0755 /dev/stdin /usr/local/sbin/.berth-host.{node} && "
        f"mv -f /usr/local/sbin/.berth-host.{node} /usr/local/sbin/berth-host && "
        f"{{ grep -qxF {entry} {keys} || echo {entry} >> {keys}; }}"
    )
    lab.run("storage", script, input=berth_host_script())


def start_berth(
    lab: Lab,
    node: str,
    mode: str = "all",
    extra: str = "",
    only_backend: str | None = None,
    restricted: bool = False,
    config: str | None = None,
    environment: Mapping[str, str] | None = None,
    restart: bool = False,
) -> None:
    """(Re)start Berth as a transient systemd unit on `node`; its log is `journalctl -u berth`. `restricted`: it
    reaches the storage host with a key held to berth-host (restrict_host_access), not the lab's root key.
    `config`: the config file's text, instead of sanity/berth-lab.yaml's. `restart`: systemd starts it again
    whenever it dies, as kubelet restarts a container."""
    lab.run(node, "systemctl stop berth.service 2>/dev/null; systemctl reset-failed berth.service 2>/dev/null; true")
    lab.run(node, "systemctl unmask multipathd.service multipathd.socket 2>/dev/null; systemctl start multipathd")
    if restricted:
        restrict_host_access(lab, node)
    config = config or lab_config_text(only_backend, RESTRICTED_KEY if restricted else None)
    lab.run(node, "mkdir -p /etc/berth /var/lib/berth && cat > /etc/berth/config.yaml", input=config)
    argv = [
        PYTHON, "-m", "csi_driver", "--mode", mode, "--endpoint", f"unix://{SOCKET}",
        "--config", "/etc/berth/config.yaml", "--log-format", "json", "--log-level", "debug", *shlex.split(extra),
    ]  # fmt: skip
    unit = ["--unit=berth", "--property=KillSignal=SIGTERM"]
    unit += [f"--setenv={key}={value}" for key, value in (environment or {}).items()]
    if restart:
        unit += ["--property=Restart=always", "--property=RestartSec=1"]
    lab.run(node, f"rm -f {SOCKET}; systemd-run {shlex.join(unit)} {shlex.join(argv)}")
    deadline = time.monotonic() + 60
    while lab.run(node, f"test -S {SOCKET}", check=False).rc != 0:
        if time.monotonic() > deadline:
            log = lab.run(node, "journalctl -u berth --no-pager | tail -50", check=False).stdout
            raise RuntimeError(f"berth did not open {SOCKET} on {node} within 60s:\n{log}")
        time.sleep(0.5)


class _Caller:
    """`csicall --stdio` on a node over the lab's SSH: Python and grpc start once (about 3 s under TCG) for many
    calls, not once per call."""

    def __init__(self, lab: Lab, node: str) -> None:
        argv = [PYTHON, "-m", "csi_driver.csicall", "--endpoint", f"unix://{SOCKET}", "--stdio"]
        self.stderr = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(lab.ssh(node).argv(shlex.join(argv)), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True)  # fmt: skip
        atexit.register(self.close)

    def call(self, rpc: str, request: dict, timeout: float) -> dict:
        """{"exit": ..., "body": ...}; RuntimeError when the process ended (ssh lost, guest rebooted)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps({"rpc": rpc, "request": request}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the process ended: reported below
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.close()
            self.stderr.seek(0)
            raise RuntimeError(f"csicall --stdio ended or hung (rc {self.process.returncode}): {self.stderr.read()}")
        return json.loads(line)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()


_idle_callers: dict[tuple[str, str], list[_Caller]] = {}
_callers_lock = threading.Lock()


def csicall(lab: Lab, node: str, rpc: str, request: dict | None = None) -> tuple[bool, dict]:
    """One CSI RPC against Berth on `node`: (succeeded, response or {code, details}). Calls reuse idle csicall
    processes of that node (one per concurrent caller)."""
    key = (str(lab.run_dir), node)
    with _callers_lock:
        idle = [c for c in _idle_callers.get(key, []) if c.alive()]
        caller = idle.pop() if idle else None
        _idle_callers[key] = idle
    caller = caller or _Caller(lab, node)
    try:
        answer = caller.call(rpc, request or {}, timeout=600)
    except RuntimeError as err:
        raise RuntimeError(f"csicall {rpc} on {node} broke: {err}") from err
    with _callers_lock:
        _idle_callers[key].append(caller)
    if answer["exit"] not in (0, 1):
        raise RuntimeError(f"csicall {rpc} on {node} refused the request: {answer['body']}")
    return answer["exit"] == 0, answer["body"]


def stop_berth(lab: Lab, node: str) -> None:
    lab.run(node, "systemctl stop berth.service 2>/dev/null; true", check=False)


def run_sanity(lab: Lab, profile: str, node: str = "node1", focus: str = "", timeout: float = 2700) -> SanityResult:
    flags = [*COMMON_FLAGS, *PROFILES[profile]]
    if focus:
        flags.append(f"--ginkgo.focus={focus}")
    start_berth(lab, node, only_backend=PROFILE_BACKENDS[profile], restricted=True)
    started = time.monotonic()
    try:
        # Leftovers of an interrupted run make sanity's mkdir fail.
        lab.run(node, "rmdir /tmp/csi-mount /tmp/csi-staging 2>/dev/null; true", check=False)
        result = lab.run(node, shlex.join(["csi-sanity", *flags]) + " 2>&1", timeout=timeout, check=False)
    finally:
        stop_berth(lab, node)
    output = result.stdout
    counts = ginkgo_counts(output)
    if not counts:
        tail = "\n".join(output.splitlines()[-40:])
        raise RuntimeError(f"csi-sanity ({profile}) printed no summary (rc {result.rc}):\n{tail}")
    return SanityResult(profile, counts["Passed"], counts["Failed"], counts["Pending"], counts["Skipped"],
                        time.monotonic() - started, output)  # fmt: skip
