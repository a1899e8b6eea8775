"""`berth orphans` on a storage host: the real ThinPool, LIO and NFS code against one simulated host (lvs rows, the
host programs run in-process on the fake rtslib and the simulated NFS host)."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta

import pytest

from csi_driver.orphans import audit_storage
from csi_driver.storage import lio_host, nfs_host
from csi_driver.storage import tags as tagcodec
from csi_driver.storage.backend import LvmBackend, NodeRef
from csi_driver.storage.ids import volume_lv_name, volume_serial
from csi_driver.storage.iscsi import IscsiExporter
from csi_driver.storage.lio import LioTargets
from csi_driver.storage.lvm import ThinPool
from csi_driver.storage.nfs import NfsExporter
from csi_driver.storage.orphans import CREATING_VOLUME, ISCSI_BACKSTORE, ISCSI_TARGET, NFS_EXPORT, HostAudit

from . import fake_rtslib_fb
from .fakes import FakeRunner, lv_row, lvs_json
from .test_nfs_host import LIMIT, FakeSystem

PREFIX = "iqn.2026-11.io.berth"
CREATED = datetime(2025, 11, 26, 6, 50, 1, tzinfo=UTC)  # lv_row's lv_time
NODE = NodeRef("iqn.1993-08.org.debian:01:node1|198.18.0.11", "iqn.1993-08.org.debian:01:node1", ("198.18.0.11",))
HOUR = 3600


class Host:
    """One storage host: LVs as lvs rows; `python3 -c` runs lio_host or nfs_host in-process."""

    def __init__(self, nfs: FakeSystem) -> None:
        self.rows: dict[str, dict[str, str]] = {}
        self.nfs = nfs
        self.runner = FakeRunner()
        self.runner.on_call("lvs", responder=self.lvs)
        self.runner.on_call("lvremove", responder=self.lvremove)
        self.runner.on_call("python3", responder=self.program)

    def add_lv(self, name: str, backend: str, state: str = tagcodec.STATE_READY) -> None:
        meta = {"name": f"pvc-{name}", "kind": "volume", "backend": backend, "state": state}
        self.rows[name] = lv_row(name, tags=tagcodec.encode_tags(meta))

    def lvs(self, argv, _input):
        wanted = argv[-1] if "/" in argv[-1] else None  # one LV (vg/lv), else every LV on the host
        rows = [r for r in self.rows.values() if wanted in (None, f"{r['vg_name']}/{r['lv_name']}")]
        return 0, lvs_json(*rows), ""

    def lvremove(self, argv, _input):
        self.rows.pop(argv[-1].partition("/")[2])
        return 0, "", ""

    def program(self, _argv, data):
        request, out = json.loads(data), io.StringIO()
        if "ops" in request:
            lio_host.main(io.StringIO(data.decode()), out)
        else:
            nfs_host.main(io.StringIO(data.decode()), out, host=self.nfs.host)
        return 0, out.getvalue(), ""

    def programs(self) -> list[str]:
        """What each command was: lvs, lvremove, or the host program's ops."""
        names = []
        for call in self.runner.calls:
            if call.argv[0] != "python3":
                names.append(call.argv[0])
            else:
                request = json.loads(call.input)
                names.append("+".join(op["op"] for op in request["ops"]) if "ops" in request else request["op"])
        return names


@pytest.fixture
def host(monkeypatch, tmp_path) -> Host:
    fake_rtslib_fb.reset()
    monkeypatch.setattr(lio_host, "rtslib", fake_rtslib_fb)
    monkeypatch.setattr(lio_host, "LOCK_PATH", str(tmp_path / "lio.lock"))
    monkeypatch.setattr(lio_host, "SAVE_FILE_OVERRIDE", str(tmp_path / "saveconfig.json"))
    return Host(FakeSystem(tmp_path))


def backends(host: Host) -> dict[str, LvmBackend]:
    pool = ThinPool(host.runner, "berth", "pool")
    blk = IscsiExporter(LioTargets(host.runner, PREFIX), ["198.18.0.2:3260"])
    fs = NfsExporter(host.runner, "198.18.0.2", export_root=host.nfs.root)
    return {"blk": LvmBackend("blk", pool, blk), "fs": LvmBackend("fs", pool, fs)}


def audit(host: Host, older_than: float = HOUR, age: timedelta = timedelta(hours=2)) -> HostAudit:
    return HostAudit(backends(host).values(), older_than, lambda: CREATED + age)


def nfs_volume(host: Host, lv: str, devno: int) -> None:
    """An NFS volume made, prepared and published the way CreateVolume and ControllerPublish do it."""
    host.nfs.devices[f"/dev/berth/{lv}"] = devno
    host.nfs.device_bytes[f"/dev/berth/{lv}"] = 1 << 30
    host.add_lv(lv, "fs")
    fs = backends(host)["fs"]
    info = fs.pool.get(lv)
    fs.exporter.prepare(info, fresh=True, max_bytes=LIMIT)
    fs.exporter.publish(info, NODE, False, {})


LEFT = {name: volume_lv_name("blk", name) for name in ("creating", "target", "backstore")}
KEPT = {name: volume_lv_name("blk", name) for name in ("ready", "published", "young")}
NFS_LEFT, NFS_KEPT = nfs_host.check_name("vol-0123456789abcdef0123"), volume_lv_name("fs", "kept")


def leftovers_and_owned_volumes(host: Host) -> None:
    """Every kind of orphan, next to volumes that look alike but are owned."""
    blk = backends(host)["blk"]
    host.add_lv(LEFT["creating"], "blk", tagcodec.STATE_CREATING)
    host.add_lv(KEPT["ready"], "blk")
    host.add_lv(KEPT["published"], "blk")
    blk.exporter.publish(blk.pool.get(KEPT["published"]), NODE, False, {})
    # A crash between teardown's steps and lvremove's: LIO still has the target (and a node's ACL), or the backstore.
    host.add_lv(LEFT["target"], "blk")
    blk.exporter.publish(blk.pool.get(LEFT["target"]), NODE, False, {})
    del host.rows[LEFT["target"]]
    fake_rtslib_fb.BlockStorageObject(
        LEFT["backstore"], dev=f"/dev/berth/{LEFT['backstore']}", wwn=volume_serial(LEFT["backstore"])
    )
    # NFS: the LV went while its exports file, clients, fstab line and directory stayed.
    nfs_volume(host, NFS_KEPT, os.makedev(253, 9))
    nfs_volume(host, NFS_LEFT, os.makedev(253, 7))
    host.nfs.mounted.pop(f"{host.nfs.root}/{NFS_LEFT}")
    host.nfs._sync()
    del host.rows[NFS_LEFT]


def test_every_kind_is_found_and_owned_volumes_never_are(host):
    leftovers_and_owned_volumes(host)
    host.add_lv(KEPT["young"], "blk", tagcodec.STATE_CREATING)
    host.rows[KEPT["young"]]["lv_time"] = (CREATED + timedelta(hours=1, minutes=30)).strftime("%Y-%m-%d %H:%M:%S %z")
    host.runner.calls.clear()

    found = audit(host).find()

    assert sorted((o.kind, o.backend, o.lv) for o in found) == sorted(
        [
            (CREATING_VOLUME, "blk", LEFT["creating"]),
            (ISCSI_TARGET, "blk", LEFT["target"]),
            (ISCSI_BACKSTORE, "blk", LEFT["backstore"]),
            (NFS_EXPORT, "fs", NFS_LEFT),
        ]
    )
    by_kind = {o.kind: o for o in found}
    assert by_kind[CREATING_VOLUME].detail["age_seconds"] == 2 * HOUR
    assert by_kind[ISCSI_TARGET].detail["initiators"] == [NODE.initiator]
    assert by_kind[NFS_EXPORT].detail["parts"] == ["clients", "directory", "exports_file", "fstab"]
    assert host.programs() == ["list_exports+list_backstores", "inventory", "lvs"], "3 round trips, LVs last"


def test_the_age_limit_decides_for_unfinished_volumes(host):
    host.add_lv(LEFT["creating"], "blk", tagcodec.STATE_CREATING)
    host.add_lv(KEPT["ready"], "blk")
    assert audit(host, age=timedelta(minutes=59)).find() == []
    assert [o.lv for o in audit(host, age=timedelta(minutes=61)).find()] == [LEFT["creating"]]
    assert [o.lv for o in audit(host, older_than=60, age=timedelta(minutes=2)).find()] == [LEFT["creating"]]
    assert [o.lv for o in audit(host, older_than=0, age=timedelta(days=400)).find()] == [LEFT["creating"]], (
        "ready: never"
    )


def test_remove_removes_exactly_what_was_reported_through_the_delete_paths(host):
    leftovers_and_owned_volumes(host)
    report = audit_storage(backends(host), HOUR, remove=False, now=lambda: CREATED + timedelta(hours=2))
    assert report.exit_status() == 1 and not any(e.removed for e in report.orphans)
    host.runner.calls.clear()

    removed = audit_storage(backends(host), HOUR, remove=True, now=lambda: CREATED + timedelta(hours=2))

    assert sorted((e.kind, e.name) for e in removed.orphans) == sorted((e.kind, e.name) for e in report.orphans)
    assert all(e.removed and e.error is None for e in removed.orphans), removed.orphans
    assert removed.exit_status() == 0
    assert [c.argv[-1] for c in host.runner.calls if c.argv[0] == "lvremove"] == [f"berth/{LEFT['creating']}"]
    assert set(host.rows) == {KEPT["ready"], KEPT["published"], NFS_KEPT}
    assert set(fake_rtslib_fb.STATE["targets"]) == {f"{PREFIX}:{KEPT['published']}"}
    assert set(fake_rtslib_fb.STATE["storage"]) == {KEPT["published"]}
    assert not os.path.exists(f"{host.nfs.root}/{NFS_LEFT}") and os.path.isdir(f"{host.nfs.root}/{NFS_KEPT}")
    fstab = open(host.nfs.host.fstab).read()
    assert NFS_LEFT not in fstab and NFS_KEPT in fstab
    assert {path for _, path in host.nfs.etab} == {f"{host.nfs.root}/{NFS_KEPT}"}
    assert audit_storage(backends(host), HOUR, remove=False, now=lambda: CREATED + timedelta(hours=2)).orphans == []


def test_removal_leaves_what_got_its_lv_back(host):
    leftovers_and_owned_volumes(host)
    one = audit(host)
    found = [o for o in one.find() if o.kind == ISCSI_TARGET]
    host.add_lv(LEFT["target"], "blk")  # recreated between the report and the removal
    ((_, error),) = one.remove(found)
    assert error and "exists now" in error
    assert f"{PREFIX}:{LEFT['target']}" in fake_rtslib_fb.STATE["targets"]


def test_json_report_wire_format(host):
    leftovers_and_owned_volumes(host)
    report = audit_storage(backends(host), HOUR, remove=False).to_json()
    assert set(report) == {"version", "scope", "older_than_seconds", "remove", "orphans", "errors"}
    assert (report["version"], report["scope"], report["remove"], report["errors"]) == (1, "storage", False, [])
    for entry in report["orphans"]:
        assert set(entry) == {"kind", "backend", "name", "reason", "detail", "removed", "error"}
    json.dumps(report)  # every value is plain JSON
