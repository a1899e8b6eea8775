import pytest

from csi_driver.storage import ids
from csi_driver.storage.errors import InvalidRequest


def test_lv_names_are_deterministic_and_distinct():
    a = ids.volume_lv_name("blk", "pvc-1")
    assert a == ids.volume_lv_name("blk", "pvc-1")
    assert a != ids.volume_lv_name("blk", "pvc-2")
    assert a != ids.volume_lv_name("files", "pvc-1"), "backends sharing a volume group must not collide"
    assert a.startswith("vol-") and len(a) == 4 + ids.NAME_HASH_HEX
    assert ids.snapshot_lv_name("blk", "pvc-1").startswith("snap-")
    assert ids.is_berth_lv(a) and ids.is_berth_lv(ids.snapshot_lv_name("blk", "x"))
    assert not ids.is_berth_lv("root")
    ids.check_lv_name(a)


def test_lv_name_of_hostile_or_unicode_name_is_safe():
    for name in ["a b", "$(reboot)", "名前", "x" * 300]:
        lv = ids.volume_lv_name("blk", name)
        assert ids.check_lv_name(lv) == lv


def test_empty_name_rejected():
    with pytest.raises(InvalidRequest):
        ids.volume_lv_name("blk", "")


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a/b", "snapshot1", "..", "x" * 128, "a;b"])
def test_check_lv_name_rejects(bad):
    with pytest.raises(InvalidRequest):
        ids.check_lv_name(bad)


def test_target_iqn():
    assert ids.target_iqn("iqn.2026-11.io.berth:", "vol-abc") == "iqn.2026-11.io.berth:vol-abc"
    with pytest.raises(InvalidRequest):
        ids.target_iqn("not-an-iqn", "vol-abc")


@pytest.mark.parametrize(
    "iqn", ["iqn.1993-08.org.debian:01:2f3c4d5e6f", "iqn.2026-11.io.berth.lab:node1", "eui.0123456789abcdef"]
)
def test_check_initiator_accepts(iqn):
    assert ids.check_initiator(iqn) == iqn


@pytest.mark.parametrize("iqn", ["", "iqn.bad", "iqn.2026-11.x:a b", "iqn.2026-11.x:$(id)", "eui.123"])
def test_check_initiator_rejects(iqn):
    with pytest.raises(InvalidRequest):
        ids.check_initiator(iqn)


def test_serial_and_naa_wwn():
    serial = ids.volume_serial("vol-0123")
    assert serial == ids.volume_serial("vol-0123") != ids.volume_serial("vol-0124")
    assert len(serial) == 36
    wwn = ids.naa_wwn(serial)
    # NAA type 6, Linux OUI 001405, 25 hex digits of the serial: 32 hex digits in all.
    assert wwn.startswith("6001405") and len(wwn) == 32
    assert wwn[7:] == serial.replace("-", "")[:25]
    assert ids.naa_wwn("abc") == "6001405abc" + "0" * 22


def test_names_with_a_trailing_newline_are_refused_on_both_sides():
    """`^...$` with re.match let 'name\\n' through; every storage-side validator uses fullmatch."""
    from csi_driver.storage import lio_host, nfs_host

    with pytest.raises(InvalidRequest):
        ids.check_lv_name("vol-0123\n")
    for check, value in (
        (lio_host.check_name, "vol-0123\n"),
        (lio_host.check_serial, "0123abcd\n"),
        (lio_host.check_device, "/dev/berth/vol-0123\n"),
    ):
        with pytest.raises(lio_host.RequestError):
            check(value)
    with pytest.raises(nfs_host.RequestError):
        nfs_host.check_name("vol-0123\n")
    with pytest.raises(nfs_host.RequestError):
        nfs_host.check_node_id("iqn.2026-11.io.berth.lab:n|198.18.0.11\n")


VOL_A, VOL_B = "vol-0123456789abcdef0123", "vol-fedcba9876543210fedc"


def test_group_names_are_per_backend_and_members_never_collide_with_snapshots():
    group_snapshot_key, member_snapshot_lv_name, snapshot_lv_name = (
        ids.group_snapshot_key,
        ids.member_snapshot_lv_name,
        ids.snapshot_lv_name,
    )
    assert group_snapshot_key("a", "g").startswith("grp-")
    assert group_snapshot_key("a", "g") != group_snapshot_key("b", "g")
    member = member_snapshot_lv_name("a", "g", VOL_A)
    assert member.startswith("snap-") and member == member_snapshot_lv_name("a", "g", VOL_A)
    assert member not in {member_snapshot_lv_name("a", "g", VOL_B), member_snapshot_lv_name("a", "h", VOL_A)}
    assert member != snapshot_lv_name("a", "g") and member != snapshot_lv_name("a", f"g {VOL_A}")
