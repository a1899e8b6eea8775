"""`berth adopt` (docs/adoption.md): an existing LV of the backend's pool becomes a Berth volume, or is refused
with the reason; an interrupted adoption finishes on the next run; a failed one gives the LV back unchanged."""

from __future__ import annotations

import argparse

import pytest

from csi_driver.adopt import build_parser, persistent_volume
from csi_driver.storage import tags as meta_keys
from csi_driver.storage.backend import LvmBackend
from csi_driver.storage.errors import AlreadyExists, CommandTimeout, InUse, InvalidRequest, NotFound, StorageError
from csi_driver.storage.ids import volume_lv_name
from tests.unit.fakes import FakeExporter, FakeThinPool, GiB


@pytest.fixture
def pool() -> FakeThinPool:
    return FakeThinPool()


def backend(pool: FakeThinPool, protocol: str = "nfs") -> LvmBackend:
    return LvmBackend("files", pool, FakeExporter(protocol))


def test_an_lv_becomes_a_ready_volume_under_its_names_lv(pool: FakeThinPool) -> None:
    pool.add_foreign("vm-disk-1", 2 * GiB)
    files = backend(pool)
    volume = files.adopt_volume("vm-disk-1", "legacy-vm-1", {"nfsExportOptions": "rw,sync,all_squash"})
    lv = volume_lv_name("files", "legacy-vm-1")
    assert volume.lv == lv and volume.ready and volume.size_bytes == 2 * GiB
    assert volume.parameters == {"nfsExportOptions": "rw,sync,all_squash"}
    assert "vm-disk-1" not in pool.lvs and pool.lvs[lv].meta[meta_keys.KEY_ADOPTED] == "vm-disk-1"
    assert files.exporter.prepared == [lv]  # type: ignore[attr-defined]
    assert files.get_volume(lv) == volume  # and every later call finds it like any volume
    assert files.adopt_volume("vm-disk-1", "legacy-vm-1", {}) == volume  # a re-run only answers


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        (lambda p: None, NotFound, "no LV berth/vm-disk-1"),
        (lambda p: p.add_foreign("vm-disk-1", GiB, pool="other"), InvalidRequest, "not a thin LV of berth/pool"),
        (lambda p: p.add_foreign("vm-disk-1", GiB, attr="Vwi-aotz--"), InUse, "in use on the storage host"),
        (
            lambda p: p.create_volume("vm-disk-1", GiB, {"kind": "volume", "backend": "blk", "name": "x"}),
            InvalidRequest,
            "already managed by Berth (backend blk",
        ),
    ],
    ids=["missing", "another pool", "open", "another backend's volume"],
)
def test_refused_with_the_reason(pool: FakeThinPool, setup, error: type[StorageError], message: str) -> None:
    setup(pool)
    before = dict(pool.lvs)
    with pytest.raises(error, match=message.replace("(", r"\(")):
        backend(pool).adopt_volume("vm-disk-1", "legacy", {})
    assert pool.lvs == before, "a refused adoption changes nothing"


def test_a_name_taken_by_another_volume_is_refused(pool: FakeThinPool) -> None:
    files = backend(pool)
    files.create_volume("legacy", GiB, 0, {}, None)
    pool.add_foreign("vm-disk-1", GiB)
    with pytest.raises(AlreadyExists):
        files.adopt_volume("vm-disk-1", "legacy", {})


def test_an_interrupted_adoption_finishes_on_the_next_run(pool: FakeThinPool) -> None:
    pool.add_foreign("vm-disk-1", GiB)
    files = backend(pool)
    files.exporter.prepare_error = CommandTimeout(["python3"], 90, "")  # type: ignore[attr-defined]
    with pytest.raises(CommandTimeout):
        files.adopt_volume("vm-disk-1", "legacy", {})
    lv = volume_lv_name("files", "legacy")
    assert pool.lvs[lv].meta[meta_keys.KEY_STATE] == meta_keys.STATE_ADOPTING  # kept for the retry (transient)
    files.exporter.prepare_error = None  # type: ignore[attr-defined]
    assert files.adopt_volume("vm-disk-1", "legacy", {}).ready


def test_a_failed_adoption_gives_the_lv_back(pool: FakeThinPool) -> None:
    original = pool.add_foreign("vm-disk-1", GiB)
    files = backend(pool)
    files.exporter.prepare_error = StorageError("/dev/berth/x has no filesystem")  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match="no filesystem"):
        files.adopt_volume("vm-disk-1", "legacy", {})
    assert list(pool.lvs) == ["vm-disk-1"] and pool.lvs["vm-disk-1"].tags == original.tags == ()


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--config", "c", "--backend", "b", "--lv", "l", "--name", "legacy", *argv])


def test_the_persistent_volume_for_each_protocol() -> None:
    block = persistent_volume(args(), "berth.csi.io", "iscsi", "b/vol-1", GiB, {"protocol": "iscsi"})
    assert block["spec"]["volumeMode"] == "Block" and block["spec"]["accessModes"] == ["ReadWriteMany"]
    assert block["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert block["spec"]["csi"] == {"driver": "berth.csi.io", "volumeHandle": "b/vol-1",
                                    "volumeAttributes": {"protocol": "iscsi"}}  # fmt: skip
    fs = persistent_volume(args("--volume-mode", "Filesystem"), "berth.csi.io", "iscsi", "b/vol-1", GiB, {})
    assert fs["spec"]["accessModes"] == ["ReadWriteOnce"] and fs["spec"]["csi"]["fsType"] == "ext4"
    nfs = persistent_volume(args(), "berth.csi.io", "nfs", "b/vol-1", GiB, {})
    assert nfs["spec"]["volumeMode"] == "Filesystem" and nfs["spec"]["csi"]["fsType"] == "nfs"
    assert nfs["spec"]["capacity"] == {"storage": str(GiB)}
