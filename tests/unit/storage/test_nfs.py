"""NfsExporter: the requests it sends, the errors it maps, freeze/thaw, and a full run against the simulated host."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from csi_driver.storage import nfs_host, tags
from csi_driver.storage.backend import NodeRef
from csi_driver.storage.errors import (
    Busy,
    CommandFailed,
    CommandTimeout,
    HostNotReady,
    InUse,
    InvalidRequest,
    NotFound,
    OutOfRange,
)
from csi_driver.storage.lvm import LvInfo
from csi_driver.storage.nfs import NFS_TIMEOUT, PREPARE_TIMEOUT, NfsExporter, host_program
from csi_driver.storage.runner import HOST_START_MARGIN, CommandResult

from .fakes import FakeRunner, lv_row
from .test_nfs_host import LIMIT, LV, VG, FakeSystem

ROOT = "/srv/berth"
NODE1 = NodeRef("iqn.2026-11.io.berth.lab:node1|198.18.0.11,198.18.1.11", "iqn.x:n1", ("198.18.0.11", "198.18.1.11"))
NODE2 = NodeRef("iqn.2026-11.io.berth.lab:node2|198.18.0.12", "iqn.x:n2", ("198.18.0.12",))


def info() -> LvInfo:
    return LvInfo.from_row(lv_row(LV, vg=VG))


def answering(*responses: dict) -> FakeRunner:
    """A runner whose python3 calls answer the given host responses in order."""
    queue = list(responses)
    runner = FakeRunner()
    runner.on_call("python3", responder=lambda argv, inp: (0, json.dumps(queue.pop(0)) + "\n", ""))
    return runner


def sent(runner: FakeRunner) -> list[dict]:
    return [json.loads(c.input or b"") for c in runner.calls if c.argv[0] == "python3"]


OK: dict = {"ok": True, "result": {}}


def test_volume_context_is_pure():
    runner = FakeRunner()
    exporter = NfsExporter(runner, "198.18.0.2")
    assert exporter.volume_context(LV) == {"nfsServer": "198.18.0.2", "nfsExport": f"{ROOT}/{LV}"}
    assert runner.calls == []
    with pytest.raises(InvalidRequest):
        exporter.volume_context("../etc")


def test_constructor_validates():
    for kwargs in (
        {"server": ""},
        {"server": "a b"},
        {"server": "x", "export_root": "/etc/x"},
        {"server": "x", "export_root": "srv"},
        {"server": "x", "filesystem": "btrfs"},
        {"server": "x", "export_options": "rw,(x)"},
        {"server": "x", "snapshot_freeze": "maybe"},
        {"server": "x", "thaw_after_seconds": 1},
    ):
        with pytest.raises(InvalidRequest):
            NfsExporter(FakeRunner(), **kwargs)


def test_from_config():
    from csi_driver.config import NfsConfig

    exporter = NfsExporter.from_config(FakeRunner(), NfsConfig(server="198.18.0.2", filesystem="ext4"))
    assert (exporter.server, exporter.export_root, exporter.filesystem) == ("198.18.0.2", ROOT, "ext4")
    assert exporter.export_options == "sync,no_subtree_check,root_squash"


def test_prepare_sends_one_host_program_call():
    runner = answering({"ok": True, "result": {"filesystem": "xfs", "done": ["mkfs"]}})
    NfsExporter(runner, "198.18.0.2").prepare(info(), fresh=True, max_bytes=LIMIT)
    (call,) = runner.calls
    assert call.argv == ["python3", "-c", host_program()]
    assert call.check is False and call.timeout >= 600
    assert json.loads(call.input or b"") == {
        "v": 1, "op": "prepare", "lv": LV, "vg": VG, "export_root": ROOT, "filesystem": "xfs", "fresh": True,
        "max_bytes": LIMIT,
    }  # fmt: skip


def test_publish_request_and_context():
    runner = answering(OK, OK)
    exporter = NfsExporter(runner, "198.18.0.2")
    ctx = exporter.publish(info(), NODE1, False, {})
    assert ctx == {"nfsServer": "198.18.0.2", "nfsExport": f"{ROOT}/{LV}", "readonly": "false"}
    assert exporter.publish(info(), NODE2, True, {}, options="ro,async")["readonly"] == "true"
    first, second = sent(runner)
    assert first["addresses"] == ["198.18.0.11", "198.18.1.11"] and first["readonly"] is False
    assert first["node_id"] == NODE1.node_id and first["options"] == "sync,no_subtree_check,root_squash"
    assert second["options"] == "async" and second["readonly"] is True


def test_publish_uses_the_volumes_storage_class_export_options():
    """root_squash is the default; a StorageClass asks for another squash policy with nfsExportOptions."""
    runner = answering(OK)
    exporter = NfsExporter(runner, "198.18.0.2")
    params = tags.params_to_meta({"nfsExportOptions": "sync,all_squash,anonuid=107,anongid=107"})
    volume = LvInfo.from_row(lv_row(LV, vg=VG, tags=tags.encode_tags(params)))
    exporter.publish(volume, NODE1, False, {})
    assert sent(runner)[0]["options"] == "sync,all_squash,anonuid=107,anongid=107"
    exporter.check_parameters({"nfsExportOptions": "no_root_squash"})
    with pytest.raises(InvalidRequest, match="nfsExportOptions"):
        exporter.check_parameters({"nfsExportOptions": "rw\nfsid=0"})


def test_bad_input_never_reaches_the_host():
    runner = FakeRunner()
    exporter = NfsExporter(runner, "198.18.0.2")
    with pytest.raises(InvalidRequest):
        exporter.publish(info(), NODE1, False, {}, options="rw;reboot")
    with pytest.raises(InvalidRequest):
        exporter.publish(info(), NodeRef("n", "i", ("not-an-ip",)), False, {})
    with pytest.raises(InvalidRequest):
        exporter.publish(info(), NodeRef("n", "i", ()), False, {})
    exporter.unpublish(info(), NodeRef("n", "i", ()))  # nothing can be exported to a node without address
    assert runner.calls == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"kind": "invalid", "message": "x"}, InvalidRequest),
        ({"kind": "not_found", "message": "x"}, NotFound),
        ({"kind": "conflict", "message": "x"}, InUse),
        ({"kind": "in_use", "message": "x"}, InUse),
        ({"kind": "busy", "message": "x"}, Busy),
        ({"kind": "host_not_ready", "message": "x"}, HostNotReady),
        (
            {"kind": "timeout", "message": "x", "argv": ["umount", "/m"], "rc": -1, "stderr": "", "timeout": 60},
            CommandTimeout,
        ),
    ],
)
def test_error_mapping(error, expected):
    runner = answering({"ok": False, "error": error})
    with pytest.raises(expected):
        NfsExporter(runner, "198.18.0.2").teardown(info())


def test_command_failure_names_the_command():
    error = {
        "kind": "failed",
        "message": "m",
        "argv": ["mkfs.xfs", "-q", "-K", "/dev/berth/x"],
        "rc": 1,
        "stderr": "no",
    }
    runner = answering({"ok": False, "error": error})
    with pytest.raises(CommandFailed) as e:
        NfsExporter(runner, "198.18.0.2").prepare(info(), fresh=True, max_bytes=LIMIT)
    assert e.value.argv[0] == "mkfs.xfs" and e.value.rc == 1 and "no" in str(e.value)


def test_no_json_is_command_failed():
    runner = FakeRunner().on("python3", rc=127, stderr="python3: not found")
    with pytest.raises(CommandFailed, match="not found"):
        NfsExporter(runner, "198.18.0.2").teardown(info())


def test_grown_grows_on_the_host_and_needs_no_node():
    runner = answering({"ok": True, "result": {"filesystem": "xfs"}})
    assert NfsExporter(runner, "198.18.0.2").grown(info(), LIMIT) is False
    assert sent(runner)[0] == {"v": 1, "op": "grow", "lv": LV, "vg": VG, "export_root": ROOT, "max_bytes": LIMIT}


def test_host_out_of_range_is_out_of_range():
    runner = answering({"ok": False, "error": {"kind": "out_of_range", "message": "5.1 PiB is above the limit"}})
    with pytest.raises(OutOfRange, match="above the limit"):
        NfsExporter(runner, "198.18.0.2").grown(info(), LIMIT)


def test_consistent_default_syncs_and_lets_lvm_freeze():
    runner = FakeRunner().on("sync")
    with NfsExporter(runner, "198.18.0.2").consistent(info()):
        pass
    assert runner.argvs() == [["sync", "-f", f"{ROOT}/{LV}"]]


def fsfreeze_exporter(runner: FakeRunner) -> NfsExporter:
    return NfsExporter(runner, "198.18.0.2", snapshot_freeze="fsfreeze", thaw_after_seconds=20)


def test_fsfreeze_freeze_then_thaw_same_token():
    runner = answering(OK, {"ok": True, "result": {"thawed": True}})
    with fsfreeze_exporter(runner).consistent(info()):
        assert [r["op"] for r in sent(runner)] == ["freeze"]
    freeze, thaw = sent(runner)
    assert thaw["op"] == "thaw" and thaw["token"] == freeze["token"] and freeze["thaw_after"] == 20


def test_fsfreeze_thawed_even_when_snapshot_raises():
    runner = answering(OK, {"ok": True, "result": {"thawed": True}})
    with pytest.raises(CommandFailed, match="lvcreate"):
        with fsfreeze_exporter(runner).consistent(info()):
            raise CommandFailed(["lvcreate"], 5, "boom")
    assert [r["op"] for r in sent(runner)] == ["freeze", "thaw"]


def test_fsfreeze_thaw_failure_does_not_hide_the_snapshot_error():
    runner = answering(OK, {"ok": False, "error": {"kind": "busy", "message": "lock"}})
    with pytest.raises(CommandFailed, match="lvcreate"):
        with fsfreeze_exporter(runner).consistent(info()):
            raise CommandFailed(["lvcreate"], 5, "boom")


def test_fsfreeze_thaw_failure_after_success_is_raised():
    runner = answering(OK, {"ok": False, "error": {"kind": "failed", "argv": ["fsfreeze"], "rc": 1, "stderr": "x"}})
    with pytest.raises(CommandFailed):
        with fsfreeze_exporter(runner).consistent(info()):
            pass


def test_fsfreeze_freeze_failure_skips_the_snapshot():
    runner = answering({"ok": False, "error": {"kind": "busy", "message": "already frozen"}})
    ran = []
    with pytest.raises(Busy):
        with fsfreeze_exporter(runner).consistent(info()):
            ran.append(1)
    assert ran == [] and [r["op"] for r in sent(runner)] == ["freeze"]


# --- the real host program, in-process, against the simulated host ---


class HostProgramRunner:
    """Runs what NfsExporter sends through nfs_host.main (what `python3 -c` would do) on a FakeSystem."""

    def __init__(self, system: FakeSystem):
        self.system = system
        self.requests: list[dict] = []

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60, check: bool = True
    ) -> CommandResult:
        assert list(argv[:2]) == ["python3", "-c"] and argv[2] == host_program()
        self.requests.append(json.loads(input or b""))
        out = io.StringIO()
        nfs_host.main(io.StringIO((input or b"").decode()), out, self.system.host)
        return CommandResult(0, out.getvalue().encode(), b"")

    def close(self) -> None:
        pass


def test_whole_life_cycle_on_the_simulated_host(tmp_path: Path):
    system = FakeSystem(tmp_path)
    exporter = NfsExporter(HostProgramRunner(system), "198.18.0.2", export_root=system.root)  # type: ignore[arg-type]
    lv = info()
    exporter.prepare(lv, fresh=True, max_bytes=LIMIT)
    exporter.prepare(lv, fresh=True, max_bytes=LIMIT)  # a retried CreateVolume
    assert system.programs().count("mkfs.xfs") == 1
    exporter.publish(lv, NODE1, False, {})
    exporter.publish(lv, NODE2, True, {})
    exporter.publish(lv, NODE2, True, {})
    assert len(system.etab) == 3
    exporter.unpublish(lv, NODE1)
    exporter.unpublish(lv, NODE1)
    assert list(system.etab) == [("198.18.0.12", system.mp)]
    exporter.unpublish(lv, NODE2)
    system.host.run = lambda argv, t: nfs_host.Result(1, "", "nope")
    with pytest.raises(CommandFailed, match="umount"):  # a failing umount is reported...
        exporter.teardown(lv)
    assert system.mp in Path(system.host.fstab).read_text()  # ...and the mount stays persisted
    system.host.run = system.run
    exporter.teardown(lv)
    assert system.mounted == {} and system.etab == {} and system.exports_text() is None


def test_minimum_size_follows_the_backend_filesystem():
    assert NfsExporter(FakeRunner(), "198.18.0.2").minimum_bytes({}) == 300 << 20
    assert NfsExporter(FakeRunner(), "198.18.0.2", filesystem="ext4").minimum_bytes({"fsType": "xfs"}) == 0


def test_host_lock_wait_ends_before_the_controller_gives_up():
    """A host operation that waited for its lock longer than the controller waited for it could act after a newer
    request (the timeout kills only the local ssh). Every NFS timeout leaves the host's lock wait plus the program's
    start inside it; an operation that got the lock holds it, so a later request on the volume runs after it."""
    assert nfs_host.LOCK_WAIT_SECONDS + HOST_START_MARGIN <= NFS_TIMEOUT <= PREPARE_TIMEOUT


def test_mutable_parameters_replace_their_group_of_export_options():
    """nfsSquash and nfsSync replace what nfsExportOptions (or the config) says about squashing and sync; the
    rest (anonuid, no_subtree_check) stays, and ModifyVolume sends the result to the host for live exports."""
    runner = answering(OK, OK)
    exporter = NfsExporter(runner, "198.18.0.2")
    meta = {
        **tags.params_to_meta({"nfsExportOptions": "sync,all_squash,anonuid=107"}),
        **tags.params_to_meta({"nfsSquash": "no_root_squash", "nfsSync": "false"}, tags.MUTABLE_PREFIX),
    }
    volume = LvInfo.from_row(lv_row(LV, vg=VG, tags=tags.encode_tags(meta)))
    exporter.publish(volume, NODE1, False, {})
    exporter.modify(volume)
    publish, modify = sent(runner)
    assert publish["options"] == modify["options"] == "anonuid=107,async,no_root_squash"
    assert modify["op"] == "reconfigure" and modify["lv"] == LV
    plain = LvInfo.from_row(lv_row(LV, vg=VG))
    assert exporter.export_options_of(plain) == nfs_host.DEFAULT_OPTIONS.removeprefix("rw,"), "untouched by default"
