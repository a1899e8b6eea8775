"""LIO exports a thin LV; both nodes are logged in at once; O_DIRECT data crosses between them."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.lab import helpers as h

pytestmark = pytest.mark.lab


def test_lio_lun_shared_by_two_nodes(lab):
    name = "t_iscsi"
    nodes = lab.node_names[:2]
    dev = h.thin_lv(lab, name)
    iqn = h.export_lun(lab, name, dev, nodes)
    try:
        # Both nodes log in concurrently.
        with ThreadPoolExecutor(len(nodes)) as pool:
            with_paths = dict(zip(nodes, pool.map(lambda n: h.login(lab, n, iqn), nodes), strict=True))
        sessions = h.sessions_on_target(lab, name)
        assert all(sessions.get(f"iqn.2026-11.io.berth.lab:{n}") == 1 for n in nodes), sessions
        # Each node sees a distinct initiator name and the same LUN (same WWN).
        wwns = {n: lab.run(n, f"lsblk -dno WWN $(readlink -f {p})").stdout.strip() for n, p in with_paths.items()}
        assert len(set(wwns.values())) == 1 and all(wwns.values()), wwns

        a, b = nodes
        written = h.write_random(lab, a, with_paths[a], seek_mib=8)
        assert h.read_sha(lab, b, with_paths[b], skip_mib=8) == written
        # And the other way round, at another offset, while both sessions stay up.
        written_b = h.write_random(lab, b, with_paths[b], seek_mib=32)
        assert h.read_sha(lab, a, with_paths[a], skip_mib=32) == written_b
        assert h.read_sha(lab, a, with_paths[a], skip_mib=8) == written
    finally:
        for n in nodes:
            h.logout(lab, n, iqn)
        h.unexport_lun(lab, name)
        h.remove_lv(lab, name)
