"""Berth running in the lab: controller + node on node1, node on node2, driven through csicall in the guests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from lab.topology import Lab
from sanity.runner import csicall, start_berth, stop_berth

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Answer:
    ok: bool
    body: dict

    @property
    def details(self) -> str:
        return self.body.get("details", "")


# An NFS volume that two nodes used could stay busy on the storage host for minutes after both unmounted (an entry
# of nfsd's export caches held it: docs/nfs.md). A DeleteVolume still busy after BUSY_DELETE_PATIENCE is retried in
# the background, as the external-provisioner does, and must succeed by the module's end.
BUSY_DELETE_PATIENCE = 45.0
DEFERRED_DELETE_PATIENCE = 900.0


class Berth:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.node_ids: dict[str, str] = {}
        self.deferred: list[dict] = []  # volumes whose DeleteVolume found them busy: deleted by finish_deletes

    def call(self, node: str, rpc: str, request: dict | None = None) -> Answer:
        return Answer(*csicall(self.lab, node, rpc, request))

    def must(self, node: str, rpc: str, request: dict | None = None) -> dict:
        answer = self.call(node, rpc, request)
        assert answer.ok, f"{rpc} on {node}: {answer.body}"
        return answer.body

    def create(
        self,
        name: str,
        size: int,
        capability: dict,
        backend: str = "lab-iscsi",
        source: dict | None = None,
        **parameters: str,
    ) -> dict:
        """source: a CSI volume_content_source, e.g. {"snapshot": {"snapshot_id": ...}} (a clone)."""
        request = {
            "name": name,
            "capacity_range": {"required_bytes": str(size)},
            "volume_capabilities": [capability],
            "parameters": {"backend": backend, **parameters},
            **({"volume_content_source": source} if source else {}),
        }
        return self.must("node1", "Controller.CreateVolume", request)["volume"]

    def snapshot(self, name: str, volume: dict) -> str:
        request = {"name": name, "source_volume_id": volume["volume_id"]}
        return self.must("node1", "Controller.CreateSnapshot", request)["snapshot"]["snapshot_id"]

    def delete_snapshot(self, snapshot_id: str) -> Answer:
        return self.call("node1", "Controller.DeleteSnapshot", {"snapshot_id": snapshot_id})

    def publish(self, volume: dict, node: str, capability: dict, secrets: dict | None = None) -> Answer:
        return self.call("node1", "Controller.ControllerPublishVolume",
                         {"volume_id": volume["volume_id"], "node_id": self.node_ids[node],
                          "volume_capability": capability, "secrets": secrets or {}})  # fmt: skip

    def stage(self, volume: dict, node: str, capability: dict, context: dict, secrets: dict | None = None) -> Answer:
        return self.call(node, "Node.NodeStageVolume",
                         {"volume_id": volume["volume_id"], "staging_target_path": staging_path(volume),
                          "volume_capability": capability, "publish_context": context,
                          "volume_context": volume.get("volume_context", {}), "secrets": secrets or {}})  # fmt: skip

    def unstage(self, volume: dict, node: str) -> Answer:
        return self.call(node, "Node.NodeUnstageVolume",
                         {"volume_id": volume["volume_id"], "staging_target_path": staging_path(volume)})  # fmt: skip

    def unpublish(self, volume: dict, node: str) -> Answer:
        return self.call("node1", "Controller.ControllerUnpublishVolume",
                         {"volume_id": volume["volume_id"], "node_id": self.node_ids[node]})  # fmt: skip

    def node_publish(self, volume: dict, node: str, capability: dict, context: dict) -> Answer:
        return self.call(node, "Node.NodePublishVolume",
                         {"volume_id": volume["volume_id"], "staging_target_path": staging_path(volume),
                          "target_path": target_path(volume), "volume_capability": capability,
                          "publish_context": context, "volume_context": volume.get("volume_context", {})})  # fmt: skip

    def node_unpublish(self, volume: dict, node: str) -> Answer:
        return self.call(node, "Node.NodeUnpublishVolume",
                         {"volume_id": volume["volume_id"], "target_path": target_path(volume)})  # fmt: skip

    def attach(self, volume: dict, node: str, capability: dict) -> dict:
        """What a CO does before a pod starts: ControllerPublish, NodeStage, NodePublish. Returns publish_context."""
        published = self.publish(volume, node, capability)
        assert published.ok, f"ControllerPublish to {node}: {published.body}"
        context = published.body.get("publish_context", {})
        for step in (self.stage, self.node_publish):
            answer = step(volume, node, capability, context)
            assert answer.ok, f"{step.__name__} on {node}: {answer.body}"
        return context

    def detach(self, volume: dict, node: str) -> list[str]:
        """The reverse of attach. Runs every step (each is idempotent, so finally blocks may repeat it) and
        returns the failed ones, empty when all succeeded."""
        failures = []
        for step in (self.node_unpublish, self.unstage, self.unpublish):
            answer = step(volume, node)
            if not answer.ok:
                failures.append(f"{step.__name__} on {node}: {answer.body}")
        return failures

    def delete(self, volume: dict, patience: float = BUSY_DELETE_PATIENCE) -> None:
        """DeleteVolume, sent again while the storage host finds the volume still in use (FAILED_PRECONDITION), as
        the external-provisioner does; still busy after `patience`, it is left to finish_deletes."""
        if not self._delete(volume, patience):
            print(f"\nDeleteVolume {volume['volume_id']}: still in use after {patience:g} s, retried at the end")
            self.deferred.append(volume)

    def finish_deletes(self, patience: float = DEFERRED_DELETE_PATIENCE) -> None:
        """Delete the volumes that were busy (at the module's end): each must go within `patience`."""
        deadline = time.monotonic() + patience
        while self.deferred:
            volume = self.deferred[0]
            assert self._delete(volume, max(0.0, deadline - time.monotonic())), f"{volume['volume_id']} stays busy"
            self.deferred.pop(0)

    def _delete(self, volume: dict, patience: float) -> bool:
        """True once deleted, False while still busy after `patience`; any other failure fails the test."""
        started = time.monotonic()
        while True:
            answer = self.call("node1", "Controller.DeleteVolume", {"volume_id": volume["volume_id"]})
            if answer.ok:
                return True
            busy = answer.body.get("code") == "FAILED_PRECONDITION" and "still in use" in answer.details
            assert busy, f"Controller.DeleteVolume on node1: {answer.body}"
            if time.monotonic() - started > patience:
                return False
            time.sleep(5)


# How long dm-multipath queues I/O with every path down: polling_interval (2 s in the lab) x no_path_retry. It must
# outlast a storage outage or a group snapshot's fence (docs/faults.md, docs/group-snapshots.md). multipath's built-in
# entry for LIO-ORG devices says 12, and a device entry beats the defaults section: only `overrides` changes it.
NO_PATH_RETRY = 150
OVERRIDES = "/etc/multipath/conf.d/berth-queue-longer.conf"


def queue_longer(lab: Lab, node: str, on: bool) -> None:
    text = f"overrides {{\n    no_path_retry {NO_PATH_RETRY}\n}}\n"
    change = f"mkdir -p {OVERRIDES.rsplit('/', 1)[0]} && cat > {OVERRIDES}" if on else f"rm -f {OVERRIDES}"
    lab.run(node, f"{change} && multipathd reconfigure", input=text if on else None)


def staging_path(volume: dict) -> str:
    return "/var/lib/berth-test/staging/" + volume["volume_id"].replace("/", "_")


def target_path(volume: dict) -> str:
    return "/var/lib/berth-test/target/" + volume["volume_id"].replace("/", "_")


def block(mode: str = "SINGLE_NODE_WRITER") -> dict:
    return {"block": {}, "access_mode": {"mode": mode}}


def mount(mode: str = "SINGLE_NODE_WRITER", *flags: str) -> dict:
    return {"mount": {"mount_flags": list(flags)}, "access_mode": {"mode": mode}}


def timed(fn: Callable[[], object]) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def pool_used_bytes(lab: Lab) -> int:
    """Bytes of the lab's thin pool in use: what a copy of data would grow and a thin snapshot does not. Written
    data still in the storage host's page cache (an async NFS export answers COMMIT before it is on disk) is
    flushed first, so it is counted now and not as growth later."""
    size, percent = lab.run("storage", "sync && lvs --noheadings --units b --nosuffix -o lv_size,data_percent "
                            "berth/pool").stdout.split()  # fmt: skip
    return int(int(size) * float(percent) / 100)


@pytest.fixture(scope="module")
def berth(lab: Lab):
    start_berth(lab, "node1", mode="all")
    start_berth(lab, "node2", mode="node")
    lab.run_all("mkdir -p /var/lib/berth-test/staging", names=["node1", "node2"])
    driver = Berth(lab)
    driver.node_ids = {n: driver.must(n, "Node.NodeGetInfo")["node_id"] for n in ("node1", "node2")}
    yield driver
    try:
        driver.finish_deletes()
    finally:
        stop_berth(lab, "node1")
        stop_berth(lab, "node2")
