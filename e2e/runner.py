"""Kubernetes' own storage e2e suite (External Storage) against Berth in the lab cluster.

`e2e.test` is built by lab.kube_build from the same wrapper module and release as the cluster; it runs on this host
against the lab's apiserver, once per profile (one testdriver.yaml per StorageClass, in e2e/testdrivers/). Its
pods use images the lab imported under the names the suite expects (lab.kube_images), and its node commands go
through `exec`, which the apiserver reaches the kubelets for through lab/kubelet_proxy.py.

CI runs a focused subset (CI_FOCUS) that covers every test pattern across the profiles; `--full` runs everything the
suite selects for Berth except what cannot run here (FULL_SKIP). Berth's docs keep the counts (docs/kubernetes.md).
"""

from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lab.ginkgo import ginkgo_counts
from lab.topology import Lab

TESTDRIVERS = Path(__file__).resolve().parent / "testdrivers"
PROFILES = ("iscsi-fs", "iscsi-block", "nfs")
FS = r"Dynamic PV \((default fs|filesystem volmode)\)"
BLOCK = r"Dynamic PV \(block volmode\)"
# Per profile, one regexp per spec. Together they cover provisioning, volumes, volumeMode, subPath,
# snapshottable, provisioning from a snapshot and from a PVC, volume-expand and multiVolume, each at least once: a
# spec takes minutes under TCG, so no pattern runs twice in CI.
CI_FOCUS = {
    "iscsi-fs": [
        rf"{FS}\] subPath should support existing directory$",
        r"Dynamic Snapshot \(delete policy\)\] snapshottable.* check deletion \(persistent\)",
        rf"{FS}\(allowExpansion\)\] volume-expand should resize volume when PVC is edited while pod is using it",
    ],
    "iscsi-block": [
        rf"{BLOCK}\] volumes should store data",
        rf"{BLOCK}\] volumeMode should not mount / map unused volumes in a pod",
        rf"{BLOCK}\] provisioning should provision storage with pvc data source$",
    ],
    "nfs": [
        rf"{FS}\] multiVolume .*should concurrently access the single volume from pods on different node",
        rf"{FS}\] provisioning should provision storage with snapshot data source \[",
    ],
}
# Specs of a profile's CI subset run at the same time (ginkgo --procs): iscsi-fs's snapshottable spec alone took about
# as long as the other profiles' whole subsets (1211 s of its 1504 s in the cf35be6 rehearsal), so its two other
# specs run beside it. More at once would only slow every spec: the node guests' CPU is the limit, and a spec's pod
# waits time out after 10-15 minutes (two did, in a full run with another lab on the same cores).
CI_PROCS = {"iscsi-fs": 2}
# `--full`: every spec of a profile, except that the block class runs only the block patterns. Its RWX covers raw
# block only: a filesystem volume of it on two nodes (multiVolume) is refused, as Berth refuses a filesystem on
# iSCSI shared by nodes, and its single-node filesystem patterns are the iscsi-fs profile's.
FULL_FOCUS = {"iscsi-block": [r"\(block volmode\)"]}
# Disruptive specs restart kubelets or nodes; Serial ones need the cluster to themselves (the profiles run at the
# same time); Windows and Flaky ones are not Linux storage tests.
FULL_SKIP = r"\[Disruptive\]|\[Serial\]|\[Feature:Windows\]|\(ntfs\)|\[Flaky\]"
# And per profile: the filesystem class's block patterns are the iscsi-block profile's. The class provisions raw
# block too (the same backend), so its testdriver declares `block`: declared false, the spec for drivers without it
# ("should fail in binding dynamic provisioned PV to PVC") failed, rightly, on a claim that bound.
FULL_SKIP_PROFILE = {"iscsi-fs": r"\(block volmode\)"}


@dataclass
class E2EResult:
    profile: str
    returncode: int
    seconds: float
    log: Path
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.returncode != 0 or not self.counts or self.counts["Failed"] > 0

    @property
    def summary(self) -> str:
        if not self.counts:
            return f"e2e {self.profile}: no summary (exit {self.returncode}; see {self.log})"
        c = self.counts
        return (f"e2e {self.profile}: {c['Passed']} Passed | {c['Failed']} Failed | {c['Pending']} Pending | "
                f"{c['Skipped']} Skipped in {self.seconds:.0f} s")  # fmt: skip


def e2e_argv(
    lab: Lab, profile: str, full: bool, report_dir: Path, procs: int = 1, focus: Sequence[str] = ()
) -> list[str]:
    """e2e.test alone, or under the ginkgo CLI with `procs` specs at a time: a spec here mostly waits for kubelet,
    the attacher and TCG guests, so the full suite gains from running several at once. `focus` (regexps) replaces
    the profile's own, e.g. to run one pattern of the full suite. The CLI runs e2e.test in the binary's directory,
    so every path given to it must be absolute."""
    assert lab.cluster
    cp = lab.cluster.control_plane
    focus = focus or (FULL_FOCUS.get(profile, [""]) if full else CI_FOCUS[profile])
    focus = [rf"External.Storage.*{f}" for f in focus]
    skip = "|".join([FULL_SKIP, *([FULL_SKIP_PROFILE[profile]] if full and profile in FULL_SKIP_PROFILE else [])])
    ginkgo = ["--no-color", "--timeout=4h", "-v", *(f"--focus={f}" for f in focus), f"--skip={skip}"]
    suite = [
        f"--kubeconfig={cp.admin_kubeconfig}", f"--kubectl-path={cp.bin / 'kubectl'}",
        f"-storage.testdriver={TESTDRIVERS / f'{profile}.yaml'}", "--provider=skeleton",
        f"--report-dir={report_dir.resolve()}",
        # Nothing runs in kube-system here (the control plane is on the host), and the suite needs no log dump.
        "--minStartupPods=-1", "--disable-log-dump",
    ]  # fmt: skip
    if procs == 1:
        return [str(cp.bin / "e2e.test"), *suite, *(f"--ginkgo.{flag.lstrip('-')}" for flag in ginkgo)]
    return [str(cp.bin / "ginkgo"), f"--procs={procs}", *ginkgo, str(cp.bin / "e2e.test"), "--", *suite]


def run_e2e(
    lab: Lab, profile: str, out_dir: Path, full: bool = False, procs: int | None = None, focus: Sequence[str] = ()
) -> E2EResult:
    """One profile; the suite's output goes to out_dir/<profile>.log and its JUnit to out_dir/<profile>/. By
    default the full suite runs one spec at a time, the CI subset CI_PROCS."""
    procs = procs or (1 if full else CI_PROCS.get(profile, 1))
    report_dir = out_dir / profile
    report_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{profile}.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        argv = e2e_argv(lab, profile, full, report_dir, procs, focus)
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=report_dir)
    rc = done.returncode
    return E2EResult(profile, rc, time.monotonic() - t0, log, ginkgo_counts(log.read_text(errors="replace")))


def skip_reasons(report_dir: Path) -> Counter[str]:
    """Why the suite skipped specs it had selected (their Skip() at run time: a capability or volume type Berth
    does not declare), by reason, from the JUnit reports; specs left out by the focus and skip flags give none."""
    reasons: Counter[str] = Counter()
    for report in report_dir.glob("junit*.xml"):
        for skipped in ET.parse(report).iter("skipped"):
            reason = skipped.get("message", "").removeprefix("skipped").lstrip(" -")
            if reason:
                reasons[" ".join(reason.split())] += 1
    return reasons
