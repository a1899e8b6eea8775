import json
import os

import pytest

from csi_driver.node import stage_record
from csi_driver.node.stage_record import RecordStore, StageRecord, record_file_name


def sample() -> StageRecord:
    return StageRecord(
        volume_id="lab-iscsi/vol-3f2a9c01d4e5b6a7c8d9",
        protocol="iscsi",
        staging_path="/var/lib/kubelet/plugins/kubernetes.io/csi/pv/x/globalmount",
        access_type="mount",
        fs_type="xfs",
        connection_properties={
            "target_portal": "198.18.0.2:3260",
            "target_iqn": "iqn.2026-11.io.csi.berth:vol",
            "target_lun": 0,
            "auth_method": "CHAP",
            "auth_username": "user",
            "auth_password": "s3cret",
        },
        device_path="/dev/sdb",
        wwn="6001405abc",
        targets={"/mnt/target": False},
    )


def test_round_trip_without_secrets(tmp_path):
    store = RecordStore(str(tmp_path))
    store.save(sample())
    loaded = store.load("lab-iscsi/vol-3f2a9c01d4e5b6a7c8d9")
    assert loaded is not None
    assert loaded.device_path == "/dev/sdb" and loaded.fs_type == "xfs" and loaded.targets == {"/mnt/target": False}
    assert loaded.connection_properties["target_iqn"] == "iqn.2026-11.io.csi.berth:vol"
    text = open(store.path(loaded.volume_id)).read()
    assert "s3cret" not in text and "auth_password" not in text
    assert [r.volume_id for r in store.all()] == [loaded.volume_id]


def test_file_name_is_quoted_and_reversible():
    assert record_file_name("lab-iscsi/vol-1") == "lab-iscsi%2Fvol-1.json"
    assert record_file_name("a/b") != record_file_name("a%2Fb")


def test_unknown_future_keys_are_ignored(tmp_path):
    store = RecordStore(str(tmp_path))
    store.save(sample())
    path = store.path(sample().volume_id)
    data = json.loads(open(path).read())
    data["added_in_v2"] = 1
    open(path, "w").write(json.dumps(data))
    assert store.load(sample().volume_id) is not None


def test_failed_write_keeps_old_record_and_no_temp_file(tmp_path, monkeypatch):
    store = RecordStore(str(tmp_path))
    store.save(sample())
    changed = sample()
    changed.device_path = "/dev/sdc"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stage_record.os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.save(changed)
    assert store.load(changed.volume_id).device_path == "/dev/sdb"
    assert os.listdir(store.dir) == [record_file_name(changed.volume_id)]


def test_delete_is_idempotent(tmp_path):
    store = RecordStore(str(tmp_path))
    store.save(sample())
    store.delete(sample().volume_id)
    store.delete(sample().volume_id)
    assert store.load(sample().volume_id) is None
