import hashlib
import json
import os
import urllib.parse

import pytest

from csi_driver.node import stage_record
from csi_driver.node.errors import CleanupFailed, PathUnusable, RecordUnreadable
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


# CSI allows any UTF-8 volume ID of up to 128 bytes; quoted, one can take 384 characters (NAME_MAX is 255 bytes).
@pytest.mark.parametrize(
    "volume_id",
    ["é" * 64, "/" * 128, "x" * 241, ".", "..", ".hidden"],
    ids=["128-byte-utf8", "128-slashes", "241-chars", "dot", "dot-dot", "hidden"],
)
def test_any_volume_id_gets_a_record(tmp_path, volume_id):
    store = RecordStore(str(tmp_path))
    record = sample()
    record.volume_id = volume_id
    store.save(record)
    assert len(os.path.basename(store.path(volume_id)).encode()) <= 255
    assert store.load(volume_id).volume_id == volume_id
    assert [r.volume_id for r in store.all()] == [volume_id]
    store.delete(volume_id)
    assert store.load(volume_id) is None and os.listdir(store.dir) == []


def test_names_that_fit_stay_quoted_so_existing_records_are_found(tmp_path):
    store = RecordStore(str(tmp_path))
    os.makedirs(store.dir)
    fits = "x" * 240
    for volume_id in (fits, "lab-iscsi/vol-1"):  # files as the previous version wrote them
        record = sample()
        record.volume_id = volume_id
        with open(os.path.join(store.dir, urllib.parse.quote(volume_id, safe="") + ".json"), "w") as f:
            f.write(record.to_json())
        assert store.load(volume_id).volume_id == volume_id
    too_long = fits + "x"
    hashed = "sha256=" + hashlib.sha256(too_long.encode()).hexdigest()
    assert record_file_name(too_long) == hashed + ".json"
    assert record_file_name(hashed) != record_file_name(too_long), "a quoted ID never looks like a hashed one"


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
    with pytest.raises(PathUnusable, match="stage record of volume lab-iscsi/vol-3f2a9c01d4e5b6a7c8d9 .*No space left"):
        store.save(changed)
    assert store.load(changed.volume_id).device_path == "/dev/sdb"
    assert os.listdir(store.dir) == [record_file_name(changed.volume_id)]


def test_a_record_that_cannot_be_removed_is_a_cleanup_failure_and_stays(tmp_path, monkeypatch):
    store = RecordStore(str(tmp_path))
    store.save(sample())

    def read_only(path):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(stage_record.os, "unlink", read_only)
    with pytest.raises(CleanupFailed, match="cannot remove the stage record of volume .*Read-only file system"):
        store.delete(sample().volume_id)
    assert store.load(sample().volume_id).device_path == sample().device_path


def test_delete_is_idempotent(tmp_path):
    store = RecordStore(str(tmp_path))
    store.save(sample())
    store.delete(sample().volume_id)
    store.delete(sample().volume_id)
    assert store.load(sample().volume_id) is None


@pytest.mark.parametrize(
    "text, why",
    [("{not json", "Expecting property name"), (b"\xff\xfe", "codec"), ("[1, 2]", "a JSON list, not an object"),
     ('{"volume_id": "v"}', "missing")],
)  # fmt: skip
def test_an_unreadable_record_is_never_taken_for_absent(tmp_path, text, why):
    store = RecordStore(str(tmp_path))
    os.makedirs(store.dir)
    with open(store.path("v"), "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RecordUnreadable) as caught:
        store.load("v")
    assert why in str(caught.value) and store.path("v") in str(caught.value)
    assert store.all() == []  # the sweep skips it with a warning
    store.set_aside("v")
    assert store.load("v") is None and os.path.exists(store.path("v") + ".unreadable")
