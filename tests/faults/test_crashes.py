"""Berth killed in the middle of its operations (issue #13, fault suite items 1 and 2; docs/faults.md).

Berth runs on node1 (controller and node in one process) as a systemd unit that is started again whenever it dies,
as kubelet restarts a container. Named fault points (csi_driver/faults.py) kill it with SIGKILL right after a step
that changed the storage host or the node; the same request is then sent again, as the CO retries it, and must
finish the operation. A second test kills it at random moments instead. Afterwards nothing is left over: no LV, LIO
object, export, fstab line or mount on the storage host (and `berth orphans` agrees), no iSCSI session, multipath
map, mount or stage record on the node.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from csi_driver.faults import ENV
from lab.topology import Lab
from sanity.runner import start_berth, stop_berth
from tests.berth_lab.conftest import Berth, MiB, block, mount, staging_path
from tests.k8s.workloads import storage_leftovers

pytestmark = [pytest.mark.lab, pytest.mark.faults]

ARMED = "/run/berth-fault-points"
ORPHANS = "/opt/berth/venv/bin/python -m csi_driver orphans --config /etc/berth/config.yaml --older-than 0 --json"


class CrashingBerth(Berth):
    """Berth on `node` (node1 unless said) under systemd's Restart=always, with fault points read from ARMED."""

    node = "node1"

    def arm(self, point: str) -> None:
        self.lab.run(self.node, f"echo {point} > {ARMED}")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not (answer := self.call(self.node, "Identity.Probe")).ok:
            assert time.monotonic() < deadline, f"Berth did not come back within {timeout:.0f} s: {answer.body}"
            time.sleep(1)

    def dies_at_each(self, points: list[str], node: str, rpc: str, request: dict) -> dict:
        """Arm each point in turn and send the request: Berth dies there. Then the same request succeeds."""
        for point in points:
            self.arm(point)
            answer = self.call(node, rpc, request)
            assert not answer.ok, f"{rpc} got past fault point {point}: {answer.body}"
            reached = self.lab.run(self.node, f"cat {ARMED}").stdout.strip() == ""
            assert reached, f"{rpc} failed before fault point {point}: {answer.body}"
            self.wait_ready()
        return self.must(node, rpc, request)


def start_crashing(lab: Lab, node: str) -> CrashingBerth:
    lab.run(node, f"rm -f {ARMED}; mkdir -p /var/lib/berth-test/staging")
    start_berth(lab, node, mode="all", environment={ENV: ARMED}, restart=True)
    driver = CrashingBerth(lab)
    driver.node = node
    driver.wait_ready()
    driver.node_ids = {node: driver.must(node, "Node.NodeGetInfo")["node_id"]}
    return driver


def stop_crashing(lab: Lab, node: str) -> None:
    stop_berth(lab, node)
    lab.run(node, f"rm -f {ARMED}")


@pytest.fixture
def crashing(lab: Lab):
    yield start_crashing(lab, "node1")
    stop_crashing(lab, "node1")


def create_request(name: str, backend: str, capability: dict, source: dict | None = None, size: int = 64 * MiB):
    return {"name": name, "capacity_range": {"required_bytes": str(size)}, "volume_capabilities": [capability],
            "parameters": {"backend": backend}, **({"volume_content_source": source} if source else {})}  # fmt: skip


def assert_nothing_left(lab: Lab, node: str, backend: str, volume_ids: list[str]) -> None:
    for volume_id in volume_ids:
        assert storage_leftovers(lab, volume_id) == "", f"the storage host still holds {volume_id}"
    report = lab.run(node, f"{ORPHANS} --backend {backend}", check=False)
    assert report.rc == 0, f"berth orphans found leftovers:\n{report.stdout}{report.stderr}"


def test_the_controller_killed_after_each_step_converges_on_retry(lab: Lab):
    """iSCSI with Berth on node1 and NFS with Berth on node2, at the same time: most of the time goes to Berth's
    restarts, which the two nodes do side by side."""
    drivers = [(start_crashing(lab, node), backend) for node, backend in (("node1", "lab-iscsi"), ("node2", "lab-nfs"))]
    try:
        with ThreadPoolExecutor(len(drivers)) as pool:
            for done in [pool.submit(each_step_converges, driver, backend) for driver, backend in drivers]:
                done.result()
    finally:
        for driver, _ in drivers:
            stop_crashing(lab, driver.node)


def each_step_converges(crashing: CrashingBerth, backend: str) -> None:
    lab, node = crashing.lab, crashing.node
    nfs = backend == "lab-nfs"
    capability = mount("MULTI_NODE_MULTI_WRITER") if nfs else block("MULTI_NODE_MULTI_WRITER")
    # A fresh iSCSI LV is ready once it exists: there is no preparing step to die after.
    create_points = ["create-volume.lv-created", *(["create-volume.prepared"] if nfs else [])]
    made: list[str] = []
    try:
        volume = crashing.dies_at_each(create_points, node, "Controller.CreateVolume",
                                       create_request(f"crash-{backend}", backend, capability))["volume"]  # fmt: skip
        made.append(volume["volume_id"])
        publish = {"volume_id": volume["volume_id"], "node_id": crashing.node_ids[node],
                   "volume_capability": capability}  # fmt: skip
        crashing.dies_at_each(["publish.exported"], node, "Controller.ControllerPublishVolume", publish)

        grown_to = 2 * int(volume["capacity_bytes"])
        expand = {"volume_id": volume["volume_id"], "capacity_range": {"required_bytes": str(grown_to)},
                  "volume_capability": capability}  # fmt: skip
        grown = crashing.dies_at_each(["expand-volume.lv-grown"], node, "Controller.ControllerExpandVolume", expand)
        assert int(grown["capacity_bytes"]) >= grown_to, grown
        if nfs:  # the retry grows the filesystem the killed call never reached (review defect 1)
            export = volume["volume_context"]["nfsExport"]
            fs_bytes = int(lab.run("storage", f"df -B1 --output=size {export} | tail -1").stdout)
            assert fs_bytes > 0.75 * grown_to, f"the filesystem has {fs_bytes} bytes after growing to {grown_to}"

        snapshot = crashing.dies_at_each(["create-snapshot.taken"], node, "Controller.CreateSnapshot",
                                         {"name": f"crash-snap-{backend}", "source_volume_id": volume["volume_id"]})
        snapshot_id = snapshot["snapshot"]["snapshot_id"]
        for kind, source in (("snapshot", {"snapshot": {"snapshot_id": snapshot_id}}),
                             ("volume", {"volume": {"volume_id": volume["volume_id"]}})):  # fmt: skip
            request = create_request(f"crash-from-{kind}-{backend}", backend, capability, source, size=grown_to)
            points = ["create-volume.lv-created", "create-volume.prepared"]
            restored = crashing.dies_at_each(points, node, "Controller.CreateVolume", request)
            made.append(restored["volume"]["volume_id"])

        unpublish = {"volume_id": volume["volume_id"], "node_id": crashing.node_ids[node]}
        crashing.dies_at_each(["unpublish.unexported"], node, "Controller.ControllerUnpublishVolume", unpublish)
        crashing.must(node, "Controller.DeleteSnapshot", {"snapshot_id": snapshot_id})
        while made:
            crashing.dies_at_each(["delete-volume.exports-removed"], node, "Controller.DeleteVolume",
                                  {"volume_id": made[-1]})  # fmt: skip
            assert_nothing_left(lab, node, backend, [made.pop()])
    finally:
        for volume_id in made:  # a failure may have left the first one published
            crashing.call(node, "Controller.ControllerUnpublishVolume",
                          {"volume_id": volume_id, "node_id": crashing.node_ids[node]})  # fmt: skip
            crashing.call(node, "Controller.DeleteVolume", {"volume_id": volume_id})
    assert_nothing_left(lab, node, backend, [])


def test_the_controller_killed_at_random_moments_converges_on_retry(crashing: CrashingBerth):
    """NFS restores from a snapshot (the controller's longest operation: clone, filesystem check, grow, export),
    each killed once at a random moment of it, then retried."""
    lab = crashing.lab
    capability = mount("MULTI_NODE_MULTI_WRITER")
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    volume = crashing.must("node1", "Controller.CreateVolume",
                           create_request("random-kill-origin", "lab-nfs", capability))["volume"]  # fmt: skip
    made = [volume["volume_id"]]
    snapshot_id = crashing.must("node1", "Controller.CreateSnapshot", {"name": "random-kill-snap",
                                "source_volume_id": volume["volume_id"]})["snapshot"]["snapshot_id"]  # fmt: skip
    source = {"snapshot": {"snapshot_id": snapshot_id}}
    try:
        started = time.monotonic()
        restored = crashing.must("node1", "Controller.CreateVolume",
                                 create_request("random-kill-0", "lab-nfs", capability, source))  # fmt: skip
        duration = time.monotonic() - started
        made.append(restored["volume"]["volume_id"])
        kills = []
        for round_ in range(1, 4):
            request = create_request(f"random-kill-{round_}", "lab-nfs", capability, source)
            with ThreadPoolExecutor(1) as pool:
                call = pool.submit(crashing.call, "node1", "Controller.CreateVolume", request)
                delay = rng.uniform(0.5, duration)
                time.sleep(delay)
                lab.run("node1", "systemctl kill --signal=KILL berth.service")
                answer = call.result()
            kills.append(f"{delay:.1f} s ({'answered' if answer.ok else answer.body.get('code')})")
            crashing.wait_ready()
            made.append(crashing.must("node1", "Controller.CreateVolume", request)["volume"]["volume_id"])
        print(f"\nseed {seed}: an undisturbed restore took {duration:.1f} s; killed after {', '.join(kills)}")
        crashing.must("node1", "Controller.DeleteSnapshot", {"snapshot_id": snapshot_id})
        while made:
            crashing.must("node1", "Controller.DeleteVolume", {"volume_id": made[-1]})
            assert_nothing_left(lab, "node1", "lab-nfs", [made.pop()])
    finally:
        for volume_id in made:
            crashing.call("node1", "Controller.DeleteVolume", {"volume_id": volume_id})
        crashing.call("node1", "Controller.DeleteSnapshot", {"snapshot_id": snapshot_id})


def node_leftovers(lab: Lab, volume: dict) -> str:
    """The node's own traces of one volume: sessions to its target, its multipath map, its mounts, its record."""
    lv = volume["volume_id"].rsplit("/", 1)[-1]
    wwn = volume.get("volume_context", {}).get("wwn", lv).removeprefix("naa.")  # multipath shows 3<wwn>
    script = (f"iscsiadm -m session 2>/dev/null | grep {lv}; multipath -l 2>/dev/null | grep -i {wwn}; "
              f"grep {lv} /proc/self/mountinfo; ls /var/lib/berth/volumes 2>/dev/null | grep {lv}; true")  # fmt: skip
    return lab.run("node1", script).stdout.strip()


@pytest.mark.parametrize("backend", ["lab-iscsi", "lab-nfs"])
def test_the_node_plugin_killed_in_stage_and_unstage_leaves_nothing(crashing: CrashingBerth, backend: str):
    lab = crashing.lab
    nfs = backend == "lab-nfs"
    capability = mount("MULTI_NODE_MULTI_WRITER") if nfs else mount()
    volume = crashing.must("node1", "Controller.CreateVolume", create_request(f"node-crash-{backend}", backend,
                                                                               capability))["volume"]  # fmt: skip
    published = False
    try:
        context = crashing.must("node1", "Controller.ControllerPublishVolume",
                                {"volume_id": volume["volume_id"], "node_id": crashing.node_ids["node1"],
                                 "volume_capability": capability}).get("publish_context", {})  # fmt: skip
        published = True
        stage = {"volume_id": volume["volume_id"], "staging_target_path": staging_path(volume),
                 "volume_capability": capability, "publish_context": context,
                 "volume_context": volume.get("volume_context", {})}  # fmt: skip
        unstage = {"volume_id": volume["volume_id"], "staging_target_path": staging_path(volume)}
        lab.run("node1", f"mkdir -p {staging_path(volume)}")
        stage_points = ["node-stage.mounted"] if nfs else ["node-stage.attached", "node-stage.mounted"]
        if not nfs:
            # kubelet that gave up on a stage (the pod went away) unstages it: that too must undo what the
            # killed stage did.
            crashing.arm("node-stage.attached")
            assert not crashing.call("node1", "Node.NodeStageVolume", stage).ok
            crashing.wait_ready()
            crashing.must("node1", "Node.NodeUnstageVolume", unstage)
            assert node_leftovers(lab, volume) == "", "unstage after a killed stage left these behind"
        crashing.dies_at_each(stage_points, "node1", "Node.NodeStageVolume", stage)
        assert lab.run("node1", f"mountpoint -q {staging_path(volume)}", check=False).rc == 0
        unstage_points = [] if nfs else ["node-unstage.unmounted"]
        crashing.dies_at_each(unstage_points, "node1", "Node.NodeUnstageVolume", unstage)
        assert node_leftovers(lab, volume) == "", "a killed stage or unstage left these behind"
        report = lab.run("node1", ORPHANS.replace("orphans", "orphans --node"), check=False)
        assert report.rc == 0, f"berth orphans --node found leftovers:\n{report.stdout}{report.stderr}"
    finally:
        if published:
            crashing.call("node1", "Node.NodeUnstageVolume",
                          {"volume_id": volume["volume_id"], "staging_target_path": staging_path(volume)})
            crashing.call("node1", "Controller.ControllerUnpublishVolume",
                          {"volume_id": volume["volume_id"], "node_id": crashing.node_ids["node1"]})  # fmt: skip
        crashing.must("node1", "Controller.DeleteVolume", {"volume_id": volume["volume_id"]})
    assert_nothing_left(lab, "node1", backend, [volume["volume_id"]])
