"""Target paths on the real node: hostile-but-legal names are published and unpublished correctly (the kernel's
mountinfo escapes only some characters), and paths that leave their place are refused (issue #13 item 10)."""

from __future__ import annotations

import shlex

import pytest

from tests.berth_lab.conftest import MiB, block, mount, staging_path, target_path

pytestmark = pytest.mark.lab

PARENT = "/var/lib/berth-test/hostile"  # the CO creates the parent; Berth creates the target
HOSTILE_NAMES = [
    "with space",
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "back\\slash \\040",
    "quotes'\"`",
    "$(touch pwned);|&<>*?",
    "-o remount,rw",
    "unicode\u2028\u00e9\x1c",
]


def published(berth, volume: dict, target: str, capability: dict, readonly: bool = False):
    request = {
        "volume_id": volume["volume_id"], "staging_target_path": volume["staging"], "target_path": target,
        "volume_capability": capability, "readonly": readonly,
    }  # fmt: skip
    return berth.call("node1", "Node.NodePublishVolume", request)


def unpublished(berth, volume: dict, target: str):
    return berth.call("node1", "Node.NodeUnpublishVolume", {"volume_id": volume["volume_id"], "target_path": target})


def shell_test(lab, expression: str) -> bool:
    return lab.run("node1", expression, check=False).rc == 0


@pytest.fixture(scope="module")
def staged(lab, berth):
    """One staged volume per kind on node1: iSCSI ext4, iSCSI raw block, NFS."""
    kinds = {
        "iscsi-mount": (berth.create("paths-fs", 64 * MiB, mount()), mount()),
        "iscsi-block": (berth.create("paths-block", 64 * MiB, block()), block()),
        "nfs": (berth.create("paths-nfs", 512 * MiB, mount("MULTI_NODE_MULTI_WRITER"), backend="lab-nfs"),
                mount("MULTI_NODE_MULTI_WRITER")),
    }  # fmt: skip
    lab.run("node1", f"mkdir -p {PARENT}")
    for volume, capability in kinds.values():
        volume["staging"] = staging_path(volume)
        context = berth.publish(volume, "node1", capability).body["publish_context"]
        answer = berth.stage(volume, "node1", capability, context)
        assert answer.ok, answer.body
    yield kinds
    for volume, _ in kinds.values():
        berth.unstage(volume, "node1")
        berth.unpublish(volume, "node1")
        berth.delete(volume)
    lab.run("node1", f"rm -rf {PARENT}", check=False)


@pytest.mark.parametrize("kind", ["iscsi-mount", "iscsi-block", "nfs"])
def test_hostile_but_legal_targets_are_published_and_unpublished(lab, berth, staged, kind):
    volume, capability = staged[kind]
    failures = []
    for name in HOSTILE_NAMES:
        target = f"{PARENT}/{kind} {name}"
        q = shlex.quote(target)
        answer = published(berth, volume, target, capability)
        if not answer.ok:
            failures.append(f"publish {target!r}: {answer.body}")
            continue
        if kind == "iscsi-block":
            works = shell_test(lab, f"test -b {q} && dd if={q} of=/dev/null bs=4k count=1 iflag=direct status=none")
        else:
            # NFS exports squash root, so there the probe is written as a pod's user would (ext4's root is 0755).
            user = "setpriv --reuid=1000 --regid=1000 --clear-groups " if kind == "nfs" else ""
            probe = shlex.quote(f"{target}/probe-{HOSTILE_NAMES.index(name)}")
            write = f'{user}sh -c \'echo probe > "$1" && grep -q probe "$1"\' - {probe}'
            works = shell_test(lab, f"mountpoint -q -- {q} && {write}")
        if not works:
            failures.append(f"{target!r} published but not usable")
        stats = berth.call("node1", "Node.NodeGetVolumeStats", {"volume_id": volume["volume_id"],
                                                                 "volume_path": target})  # fmt: skip
        if not stats.ok:
            failures.append(f"stats {target!r} (Berth's mountinfo view): {stats.body}")
        again = published(berth, volume, target, capability)
        if not again.ok:
            failures.append(f"repeated publish {target!r}: {again.body}")
        gone = unpublished(berth, volume, target)
        if not gone.ok:
            failures.append(f"unpublish {target!r}: {gone.body}")
        if shell_test(lab, f"mountpoint -q -- {q} || test -e {q}"):
            failures.append(f"{target!r} still mounted or present after unpublish")
    assert not shell_test(lab, "test -e pwned || test -e /pwned"), "a name reached a shell"
    assert not failures, "\n".join(failures)


def test_paths_that_leave_their_place_are_refused(lab, berth, staged):
    volume, capability = staged["iscsi-mount"]
    lab.run("node1", f"mkdir -p /var/lib/berth-test/elsewhere && ln -sfn /var/lib/berth-test/elsewhere {PARENT}/link")
    for target in ("relative/target", f"{PARENT}/../../escaped", f"{PARENT}/link/mount", "/proc/1/root/mnt"):
        answer = published(berth, volume, target, capability)
        assert not answer.ok and answer.body["code"] == "INVALID_ARGUMENT", (target, answer.body)
    assert lab.run("node1", "ls -A /var/lib/berth-test/elsewhere").stdout == "", "nothing through the link"
    assert not shell_test(lab, "test -e /var/lib/escaped || test -e /relative"), "nothing out of place"


def test_unpublish_leaves_what_berth_did_not_create(lab, berth, staged):
    volume, capability = staged["iscsi-block"]
    foreign = f"{PARENT}/made by someone else"
    lab.run("node1", f"echo keep > {shlex.quote(foreign)}")
    assert unpublished(berth, volume, foreign).ok
    assert lab.run("node1", f"cat {shlex.quote(foreign)}").stdout.strip() == "keep"
    volume, capability = staged["iscsi-mount"]
    existing_dir = f"{PARENT}/dir the CO made"
    lab.run("node1", f"mkdir -p {shlex.quote(existing_dir)}")
    assert published(berth, volume, existing_dir, capability).ok
    assert unpublished(berth, volume, existing_dir).ok
    assert shell_test(lab, f"test -d {shlex.quote(existing_dir)} && ! mountpoint -q -- {shlex.quote(existing_dir)}")


def test_reader_only_raw_block_cannot_be_written(lab, berth, staged):
    """A reader-only publish of a volume staged writable is bound read-only (the container's device permissions
    are what stop writes there); a volume staged reader-only is read-only at the block layer, for every target."""
    volume, _ = staged["iscsi-block"]
    target = f"{PARENT}/reader"
    assert published(berth, volume, target, block("MULTI_NODE_READER_ONLY")).ok
    options = lab.run("node1", f"findmnt -no OPTIONS --mountpoint {shlex.quote(target)}").stdout
    assert options.split(",")[0] == "ro", options
    assert unpublished(berth, volume, target).ok
    reader = block("MULTI_NODE_READER_ONLY")
    shared = berth.create("paths-reader", 64 * MiB, reader)
    try:
        berth.attach(shared, "node1", reader)
        q = shlex.quote(target_path(shared))
        write = lab.run("node1", f"dd if=/dev/zero of={q} bs=4k count=1 oflag=direct conv=notrunc status=none",
                        check=False)  # fmt: skip
        assert write.rc != 0, "a reader-only volume took a write"
        assert lab.run("node1", f"dd if={q} of=/dev/null bs=4k count=1 iflag=direct status=none").rc == 0
    finally:
        assert not berth.detach(shared, "node1")
        berth.delete(shared)
