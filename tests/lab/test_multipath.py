"""Multipath over both data links: two iSCSI paths to one LUN; I/O survives pulling one virtual cable."""

import pytest

from tests.lab import helpers as h

pytestmark = pytest.mark.lab


def paths(lab, node: str) -> list[str]:
    """Path states of the node's multipath maps, e.g. ['active ready running', 'failed faulty running']."""
    out = lab.run(node, "multipathd show paths raw format '%d %t %T %o'", check=False).stdout
    return [" ".join(line.split()[1:]) for line in out.splitlines() if line.startswith("sd")]


def test_multipath_survives_link_down(lab):
    name = "t_mp"
    node = lab.node_names[0]
    dev = h.thin_lv(lab, name)
    iqn = h.export_lun(lab, name, dev, [node])
    mpath = None
    try:
        lab.run(node, "systemctl start multipathd.service")
        for portal in h.PORTALS:
            h.login(lab, node, iqn, portal)
        # One map over two paths, one per subnet.
        wwid = lab.run(
            node, f"/lib/udev/scsi_id -g -u $(readlink -f /dev/disk/by-path/ip-{h.PORTALS[0]}:3260-iscsi-{iqn}-lun-0)"
        ).stdout.strip()
        assert wwid, "no WWID for the LUN"
        mpath = f"/dev/mapper/{wwid}"
        h.wait_for(
            lambda: len(paths(lab, node)) == 2 and all(p.startswith("active ready") for p in paths(lab, node)),
            timeout=60,
            what="2 active multipath paths",
        )
        topo = lab.run(node, f"multipath -ll {wwid}").stdout
        assert topo.count("active ready running") == 2, topo
        h.wait_path(lab, node, mpath)
        before = h.write_random(lab, node, mpath, seek_mib=0)
        assert h.read_sha(lab, node, mpath, skip_mib=0) == before

        lab.set_link(node, 1, up=False)  # pull the cable of the 198.18.1.0/24 path
        try:
            during = h.write_random(lab, node, mpath, seek_mib=16, timeout=90)
            assert h.read_sha(lab, node, mpath, skip_mib=16, timeout=90) == during
            assert h.read_sha(lab, node, mpath, skip_mib=0, timeout=90) == before

            def failed_seen() -> list[str] | None:
                states = paths(lab, node)
                return states if any("failed" in s for s in states) else None

            states = h.wait_for(failed_seen, timeout=30, what="multipathd to mark the pulled path failed")
            assert sum(s.startswith("active ready") for s in states) == 1, states
        finally:
            lab.set_link(node, 1, up=True)
        h.wait_for(
            lambda: sum(p.startswith("active ready") for p in paths(lab, node)) == 2,
            timeout=90,
            what="the pulled path to come back",
        )
        # The data written with one path down is really on the LUN: read it from the storage guest.
        assert h.read_sha(lab, "storage", dev, skip_mib=16) == during
    finally:
        if mpath:
            lab.run(node, f"multipath -f {mpath.rsplit('/', 1)[1]}", check=False)
        lab.run(node, "systemctl stop multipathd.socket multipathd.service", check=False)
        h.logout(lab, node, iqn)
        lab.run(node, "multipath -F", check=False)
        h.unexport_lun(lab, name)
        h.remove_lv(lab, name)
