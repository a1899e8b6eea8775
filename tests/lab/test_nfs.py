"""An xfs on a thin LV, exported by the storage guest's nfsd, mounted (NFS 4.2) on both nodes."""

import pytest

from tests.lab import helpers as h

pytestmark = pytest.mark.lab


def test_nfs_export_shared_by_two_nodes(lab):
    name = "t_nfs"
    export = f"/srv/nfs/{name}"
    a, b = lab.node_names[:2]
    dev = h.thin_lv(lab, name, "512M")
    try:
        lab.run(
            "storage",
            f"mkfs.xfs -q {dev} && mkdir -p {export} && mount {dev} {export} && "
            f"exportfs -o rw,sync,no_root_squash,no_subtree_check 198.18.0.0/24:{export}",
        )
        lab.run_all(
            f"mkdir -p /mnt/{name} && mount -t nfs -o vers=4.2,hard,timeo=50 storage:{export} /mnt/{name}", names=[a, b]
        )
        for n in (a, b):
            opts = lab.run(n, f"findmnt -no FSTYPE,OPTIONS /mnt/{name}").stdout
            assert opts.startswith("nfs4") and "vers=4.2" in opts, opts

        written = lab.run(
            a, f"head -c 1M /dev/urandom > /mnt/{name}/from-{a} && sync && sha256sum < /mnt/{name}/from-{a}"
        ).stdout.split()[0]
        assert lab.run(b, f"sha256sum < /mnt/{name}/from-{a}").stdout.split()[0] == written
        lab.run(b, f"echo hello-from-{b} > /mnt/{name}/from-{b}")
        assert lab.run(a, f"cat /mnt/{name}/from-{b}").stdout.strip() == f"hello-from-{b}"
        # The data is in the xfs on the storage guest, not only in a client cache.
        assert lab.run("storage", f"sha256sum < {export}/from-{a}").stdout.split()[0] == written
    finally:
        lab.run_all(f"umount -f /mnt/{name} 2>/dev/null; true", names=[a, b])
        lab.run("storage", f"exportfs -u 198.18.0.0/24:{export}; umount {export}", check=False)
        h.remove_lv(lab, name)
