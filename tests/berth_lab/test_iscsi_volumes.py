"""iSCSI volumes through Berth on the real stack: LUN masking, CHAP, plugin restarts, thin clone cost."""

from __future__ import annotations

import pytest

from tests.berth_lab.conftest import GiB, MiB, block, pool_used_bytes, staging_path, timed

pytestmark = pytest.mark.lab


def target_login(lab, node: str, iqn: str) -> int:
    """Log in by hand, bypassing Berth: what an unpublished node could try."""
    lab.run(node, "iscsiadm -m discovery -t st -p 198.18.0.1 >/dev/null 2>&1 || true", check=False)
    rc = lab.run(node, f"iscsiadm -m node -T {iqn} -p 198.18.0.1 --login", check=False, timeout=60).rc
    lab.run(node, f"iscsiadm -m node -T {iqn} -p 198.18.0.1 --logout; iscsiadm -m node -T {iqn} -o delete; true",
            check=False)  # fmt: skip
    return rc


def test_lun_is_masked_until_the_node_is_published(lab, berth):
    rwx = block("MULTI_NODE_MULTI_WRITER")
    volume = berth.create("masking", 64 * MiB, rwx)
    try:
        context = berth.publish(volume, "node1", rwx).body["publish_context"]
        assert target_login(lab, "node2", context["targetIqn"]) != 0, "node2 logged in without being published"
        assert berth.publish(volume, "node2", rwx).ok
        assert target_login(lab, "node2", context["targetIqn"]) == 0, "a published node must be able to log in"
    finally:
        for node in ("node1", "node2"):
            berth.unpublish(volume, node)
        berth.delete(volume)


def test_wrong_chap_secret_fails_stage_with_a_clear_error(lab, berth):
    cap = block()
    secrets = {"node.session.auth.username": "berth-user", "node.session.auth.password": "correct-secret-1"}
    volume = berth.create("chap", 64 * MiB, cap)
    try:
        context = berth.publish(volume, "node1", cap, secrets).body["publish_context"]
        wrong = dict(secrets, **{"node.session.auth.password": "wrong-secret-12"})
        answer = berth.stage(volume, "node1", cap, context, wrong)
        assert not answer.ok and answer.body["code"] != "OK", answer.body
        assert "CHAP" in answer.details or "auth" in answer.details.lower(), answer.details
        assert "wrong-secret" not in answer.details, "the secret must not be echoed"
        assert berth.stage(volume, "node1", cap, context, secrets).ok
        assert berth.unstage(volume, "node1").ok
    finally:
        berth.unstage(volume, "node1")
        berth.unpublish(volume, "node1")
        berth.delete(volume)
    # Berth runs at debug level in the lab (sanity/runner.py): its log holds every request, never a secret, nor
    # the SSH key it reaches the storage host with.
    log = lab.run("node1", "journalctl -u berth --no-pager -o cat").stdout
    assert '"level": "debug"' in log, "Berth logged no debug lines: nothing was checked"
    key_body = lab.run("node1", "sed -n 2p /root/.ssh/id_ed25519").stdout.strip()
    for secret in ("correct-secret-1", "wrong-secret-12", key_body):
        assert secret and secret not in log, "a secret is in Berth's debug log"


def staged_device(lab, volume: dict) -> str:
    """The device node Berth attached, from the stage record (the node's own source of truth)."""
    script = (
        "import json, sys; from csi_driver.node.stage_record import record_file_name; "
        "print(json.load(open('/var/lib/berth/volumes/' + record_file_name(sys.argv[1])))['device_path'])"
    )
    from sanity.runner import PYTHON

    return lab.run("node1", f'{PYTHON} -c "{script}" {volume["volume_id"]}').stdout.strip()


def test_snapshot_and_clone_cost_does_not_grow_with_data(lab, berth):
    cap = block()
    empty, full = berth.create("empty-4g", 4 * GiB, cap), berth.create("full-4g", 4 * GiB, cap)
    made: list[tuple[str, str]] = []
    try:
        context = berth.publish(full, "node1", cap).body["publish_context"]
        assert berth.stage(full, "node1", cap, context).ok
        device = staged_device(lab, full)
        # 256 MiB of random data in 4 direct writes of one 64 MiB chunk (urandom itself is slow under TCG): a copy
        # would grow the pool by 4 times the bound below.
        lab.run("node1", f"dd if=/dev/urandom of=/tmp/chunk bs=1M count=64 status=none && for i in $(seq 0 3); do "
                         f"dd if=/tmp/chunk of={device} bs=1M seek=$((i*64)) oflag=direct status=none; done",
                timeout=900)  # fmt: skip
        assert berth.unstage(full, "node1").ok
        berth.unpublish(full, "node1")
        costs = {}
        used_before = pool_used_bytes(lab)
        for volume in (empty, full):
            tag = volume["volume_id"].split("/")[1][-6:]
            snapshot_id: list[str] = []
            costs[f"snapshot {tag}"] = timed(lambda v=volume, s=snapshot_id, t=tag: s.append(berth.must(
                "node1", "Controller.CreateSnapshot", {"name": f"snap-{t}", "source_volume_id": v["volume_id"]}
            )["snapshot"]["snapshot_id"]))  # fmt: skip
            made.append(("snapshot", snapshot_id[0]))
            clone: list[dict] = []
            costs[f"clone {tag}"] = timed(lambda v=volume, c=clone, t=tag: c.append(berth.must(
                "node1", "Controller.CreateVolume",
                {"name": f"clone-{t}", "volume_capabilities": [cap], "parameters": {"backend": "lab-iscsi"},
                 "volume_content_source": {"volume": {"volume_id": v["volume_id"]}}})["volume"]))  # fmt: skip
            made.append(("volume", clone[0]["volume_id"]))
        grown = pool_used_bytes(lab) - used_before
        print(f"\nthin snapshot/clone seconds (256 MiB written vs empty): {costs}; the pool grew {grown // MiB} MiB")
        # A copy of the 256 MiB would take 256 MiB more of the pool; thin snapshots and clones share its chunks.
        assert grown < 64 * MiB, f"the pool grew {grown // MiB} MiB for two snapshots and two clones"
    finally:
        for kind, object_id in reversed(made):
            if kind == "snapshot":
                berth.call("node1", "Controller.DeleteSnapshot", {"snapshot_id": object_id})
            else:
                berth.call("node1", "Controller.DeleteVolume", {"volume_id": object_id})
        berth.unstage(full, "node1")
        berth.unpublish(full, "node1")
        berth.delete(full)
        berth.delete(empty)


def node_leftovers(lab, volume: dict, iqn: str) -> list[str]:
    """What a stage may leave on node1: the session, the LUN's devices and multipath map (by WWN), the stage
    record, os-brick's per-portal lock files."""
    wwn = volume["volume_context"]["wwn"]
    checks = {
        "iSCSI session": f"iscsiadm -m session 2>/dev/null | grep -F {iqn}",
        "device or multipath map": f"ls /dev/disk/by-id | grep -F {wwn}",
        "stage record": f"ls /var/lib/berth/volumes | grep -F {volume['volume_id'].split('/')[1]}",
        "os-brick portal lock": f"ls /var/lib/berth/locks | grep -F {iqn}",
    }
    return [what for what, command in checks.items() if lab.run("node1", command, check=False).rc == 0]


def test_a_stage_failing_after_login_leaves_nothing_and_the_retry_works(lab, berth):
    """The second stage logs in (both portals, multipath), finds ext4 where xfs is asked for and fails. It used
    to leave the session, the map and a record that answered ALREADY_EXISTS to every later stage."""
    ext4 = {"mount": {"fs_type": "ext4"}, "access_mode": {"mode": "SINGLE_NODE_WRITER"}}
    xfs = {"mount": {"fs_type": "xfs"}, "access_mode": {"mode": "SINGLE_NODE_WRITER"}}
    volume = berth.create("failing-stage", 64 * MiB, ext4)
    try:
        context = berth.publish(volume, "node1", ext4).body["publish_context"]
        assert berth.stage(volume, "node1", ext4, context).ok
        assert berth.unstage(volume, "node1").ok
        answer = berth.stage(volume, "node1", xfs, context)
        assert not answer.ok and answer.body["code"] == "INTERNAL" and "already holds ext4" in answer.details, answer
        assert node_leftovers(lab, volume, context["targetIqn"]) == []
        assert berth.stage(volume, "node1", ext4, context).ok, "the retry with the right fs type stages"
        assert berth.unstage(volume, "node1").ok
        assert node_leftovers(lab, volume, context["targetIqn"]) == []
    finally:
        berth.unstage(volume, "node1")
        berth.unpublish(volume, "node1")
        berth.delete(volume)


def test_a_clone_larger_than_its_source_gets_its_filesystem_grown_at_stage(lab, berth):
    ext4 = {"mount": {"fs_type": "ext4"}, "access_mode": {"mode": "SINGLE_NODE_WRITER"}}
    source = berth.create("grow-source", 64 * MiB, ext4)
    clone = None
    try:
        context = berth.publish(source, "node1", ext4).body["publish_context"]
        assert berth.stage(source, "node1", ext4, context).ok  # mkfs at 64 MiB
        assert berth.unstage(source, "node1").ok
        berth.unpublish(source, "node1")
        clone = berth.create("grow-clone", 256 * MiB, ext4, source={"volume": {"volume_id": source["volume_id"]}})
        context = berth.publish(clone, "node1", ext4).body["publish_context"]
        assert berth.stage(clone, "node1", ext4, context).ok
        size = int(lab.run("node1", f"df --output=size -B1 {staging_path(clone)} | tail -1").stdout)
        assert size > 200 * MiB, f"the clone's filesystem still has its source's size: {size} bytes"
    finally:
        for volume in (clone, source):
            if volume is not None:
                berth.unstage(volume, "node1")
                berth.unpublish(volume, "node1")
                berth.delete(volume)
