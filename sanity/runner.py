"""Start Berth in a lab node and run csi-sanity against it there.

csi-sanity runs inside the node guest because NodeStage/NodePublish act on that guest's kernel (iSCSI login,
mounts); Berth runs there in `--mode all`, its controller reaching the storage guest over SSH.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import dataclass

import yaml

from lab import config as lab_config
from lab.topology import Lab

REPO = lab_config.REPO
SRC = lab_config.GUEST_SRC
PYTHON = f"{lab_config.GUEST_VENV}/bin/python"
SOCKET = "/run/berth/csi.sock"
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
    ],
    "iscsi-block": [
        f"--csi.testvolumesize={64 * MiB}",
        "--csi.testvolumeaccesstype=block",
        f"--csi.testvolumeparameters={SRC}/sanity/iscsi-block.yaml",
    ],
    "nfs": [
        f"--csi.testvolumesize={512 * MiB}",
        "--csi.testvolumeaccesstype=mount",
        f"--csi.testvolumeparameters={SRC}/sanity/nfs.yaml",
    ],
}
NOT_OFFERED = r"^GroupController |^ModifyVolume |volume attribute class"
# The backend each profile's parameter file names (sanity/*.yaml).
PROFILE_BACKENDS = {"iscsi-mount": "lab-iscsi", "iscsi-block": "lab-iscsi-block", "nfs": "lab-nfs"}
SUMMARY = re.compile(r"(SUCCESS|FAIL)! -- (\d+) Passed \| (\d+) Failed \| (\d+) Pending \| (\d+) Skipped")


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

    def skipped_specs(self) -> list[str]:
        return re.findall(r"^S \[SKIPPED\].*\n(.+)", self.output, re.MULTILINE)

    def unexpected_skips(self) -> list[str]:
        """Skipped specs other than those of features Berth does not offer (ModifyVolume, which includes
        volume attribute classes, and GroupController): a skip elsewhere means a capability went missing."""
        return [s for s in self.skipped_specs() if not re.search(NOT_OFFERED, s)]


def lab_config_text(only_backend: str | None = None) -> str:
    """sanity/berth-lab.yaml, or a copy serving only `only_backend` (ListVolumes has no parameters, so a controller
    lists every backend it serves: profiles running at once must not see each other's volumes)."""
    text = (REPO / "sanity" / "berth-lab.yaml").read_text()
    if only_backend is None:
        return text
    config = yaml.safe_load(text)
    config["backends"] = {only_backend: config["backends"][only_backend]}
    config["default_backend"] = only_backend
    return yaml.safe_dump(config, sort_keys=False)


def start_berth(lab: Lab, node: str, mode: str = "all", extra: str = "", only_backend: str | None = None) -> None:
    """(Re)start Berth as a transient systemd unit on `node`; its log is `journalctl -u berth`."""
    lab.run(node, "systemctl stop berth.service 2>/dev/null; systemctl reset-failed berth.service 2>/dev/null; true")
    lab.run(node, "systemctl unmask multipathd.service multipathd.socket 2>/dev/null; systemctl start multipathd")
    lab.run(
        node, "mkdir -p /etc/berth /var/lib/berth && cat > /etc/berth/config.yaml", input=lab_config_text(only_backend)
    )
    argv = [
        PYTHON, "-m", "csi_driver", "--mode", mode, "--endpoint", f"unix://{SOCKET}",
        "--config", "/etc/berth/config.yaml", "--log-format", "json", "--log-level", "debug", *shlex.split(extra),
    ]  # fmt: skip
    lab.run(node, f"rm -f {SOCKET}; systemd-run --unit=berth --property=KillSignal=SIGTERM {shlex.join(argv)}")
    deadline = time.monotonic() + 60
    while lab.run(node, f"test -S {SOCKET}", check=False).rc != 0:
        if time.monotonic() > deadline:
            log = lab.run(node, "journalctl -u berth --no-pager | tail -50", check=False).stdout
            raise RuntimeError(f"berth did not open {SOCKET} on {node} within 60s:\n{log}")
        time.sleep(0.5)


def csicall(lab: Lab, node: str, rpc: str, request: dict | None = None) -> tuple[bool, dict]:
    """One CSI RPC against Berth on `node` through csicall: (succeeded, response or {code, details})."""
    argv = [PYTHON, "-m", "csi_driver.csicall", "--endpoint", f"unix://{SOCKET}", rpc, json.dumps(request or {})]
    result = lab.run(node, shlex.join(argv), timeout=600, check=False)
    lines = result.stdout.strip().splitlines()
    if result.rc not in (0, 1) or not lines:
        raise RuntimeError(f"csicall {rpc} on {node} broke (rc {result.rc}): {result.stdout} {result.stderr}")
    return result.rc == 0, json.loads(lines[-1])


def stop_berth(lab: Lab, node: str) -> None:
    lab.run(node, "systemctl stop berth.service 2>/dev/null; true", check=False)


def run_sanity(lab: Lab, profile: str, node: str = "node1", focus: str = "", timeout: float = 2700) -> SanityResult:
    flags = [*COMMON_FLAGS, *PROFILES[profile]]
    if focus:
        flags.append(f"--ginkgo.focus={focus}")
    start_berth(lab, node, only_backend=PROFILE_BACKENDS[profile])
    started = time.monotonic()
    try:
        # Leftovers of an interrupted run make sanity's mkdir fail.
        lab.run(node, "rmdir /tmp/csi-mount /tmp/csi-staging 2>/dev/null; true", check=False)
        result = lab.run(node, shlex.join(["csi-sanity", *flags]) + " 2>&1", timeout=timeout, check=False)
    finally:
        stop_berth(lab, node)
    output = result.stdout
    match = SUMMARY.search(output)
    if match is None:
        tail = "\n".join(output.splitlines()[-40:])
        raise RuntimeError(f"csi-sanity ({profile}) printed no summary (rc {result.rc}):\n{tail}")
    _, passed, failed, pending, skipped = match.groups()
    return SanityResult(
        profile, int(passed), int(failed), int(pending), int(skipped), time.monotonic() - started, output
    )
