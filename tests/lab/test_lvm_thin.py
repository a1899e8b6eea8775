"""LVM thin snapshot on the storage guest: it has the origin's data and is copy-on-write."""

import pytest

from tests.lab import helpers as h

pytestmark = pytest.mark.lab


def test_thin_snapshot_is_cow(lab):
    origin, snap = "t_origin", "t_origin_snap"
    dev = h.thin_lv(lab, origin, "128M")
    try:
        first = h.write_random(lab, "storage", dev, seek_mib=0, mib=8)
        lab.run("storage", f"lvcreate -q -s -kn -n {snap} berth/{origin}")
        info = lab.run("storage", f"lvs --noheadings -o lv_attr,pool_lv,origin berth/{snap}").stdout.split()
        assert info[0].startswith("V") and info[1:] == ["pool", origin], info  # a thin volume in the pool
        sdev = f"/dev/berth/{snap}"
        h.wait_path(lab, "storage", sdev)
        assert h.read_sha(lab, "storage", sdev, skip_mib=0, mib=8) == first

        second = h.write_random(lab, "storage", dev, seek_mib=0, mib=8)
        assert second != first
        assert h.read_sha(lab, "storage", dev, skip_mib=0, mib=8) == second
        assert h.read_sha(lab, "storage", sdev, skip_mib=0, mib=8) == first  # the snapshot kept the old data
        # And writes to the snapshot do not reach the origin.
        third = h.write_random(lab, "storage", sdev, seek_mib=0, mib=8)
        assert h.read_sha(lab, "storage", dev, skip_mib=0, mib=8) == second
        assert h.read_sha(lab, "storage", sdev, skip_mib=0, mib=8) == third
    finally:
        h.remove_lv(lab, snap, origin)
