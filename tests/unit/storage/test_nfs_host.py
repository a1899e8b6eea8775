"""nfs_host: validators, pure file helpers, and every operation against a simulated host (tmp files + fake commands)."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest

from csi_driver.storage import nfs_host as h

LV = "vol-0123456789abcdef0123"
VG = "berth"
DEV = f"/dev/{VG}/{LV}"
GiB = 1 << 30
BLOCK = 4096
LIMIT = 1 << 40  # the controller's size limit in requests that do not test it
OTHER_FSTAB = (
    "# /etc/fstab\nUUID=abcd / ext4 errors=remount-ro 0 1\n/dev/sr0 /media/cdrom0 udf,iso9660 user,noauto 0 0\n"
)


class FakeSystem:
    """Commands the host program runs, simulated: filesystems on devices, the mount table, the kernel export table."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.root = str(tmp / "srv" / "berth")
        self.calls: list[list[str]] = []
        self.devices = {DEV: os.makedev(253, 7), f"/dev/{VG}/other": os.makedev(253, 8)}
        self.fs: dict[str, str] = {}  # device → filesystem type
        self.device_bytes: dict[str, int] = {DEV: GiB, f"/dev/{VG}/other": GiB}
        self.fs_blocks: dict[str, int] = {}  # device → filesystem size in 4 KiB blocks (default: fills the device)
        self.ag_blocks = 16384  # 64 MiB allocation groups, as mkfs.xfs makes them for a 256 MiB volume
        self.mounted: dict[str, tuple[str, str]] = {}  # mountpoint → (device, fstype)
        self.etab: dict[tuple[str, str], str] = {}  # (client, path) → options
        self.frozen: set[str] = set()
        self.busy: set[str] = set()
        self.busy_umounts = 0  # the next umounts of any path that fail as busy (nfsd not yet letting go)
        (tmp / "etc").mkdir(parents=True)
        (tmp / "etc" / "fstab").write_text(OTHER_FSTAB)
        self.host = h.Host(
            fstab=str(tmp / "etc" / "fstab"),
            exports_dir=str(tmp / "etc" / "exports.d"),
            etab=str(tmp / "etab"),
            mountinfo=str(tmp / "mountinfo"),
            lock_dir=str(tmp / "locks"),
            lock_wait=0.3,
            release_wait=0.3,
            proc_dir=str(tmp / "proc"),
            nfsd_clients_dir=str(tmp / "proc" / "fs" / "nfsd" / "clients"),
            run=self.run,
            devno=self.devices.get,
        )
        self._sync()

    @property
    def mp(self) -> str:
        return f"{self.root}/{LV}"

    def _sync(self) -> None:
        lines = ["22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw"]
        for i, (mp, (dev, fstype)) in enumerate(self.mounted.items()):
            devno = self.devices[dev]
            escaped = mp.replace(" ", "\\040")
            lines.append(f"{100 + i} 1 {os.major(devno)}:{os.minor(devno)} / {escaped} rw shared:9 - {fstype} {dev} rw")
        Path(self.host.mountinfo).write_text("\n".join(lines) + "\n")
        etab = [f"{path}\t{client}({opts},wdelay,hide)" for (client, path), opts in sorted(self.etab.items())]
        Path(self.host.etab).write_text("".join(line + "\n" for line in etab))

    def run(self, argv: list[str], timeout: float) -> h.Result:
        assert all(isinstance(a, str) for a in argv), argv
        self.calls.append(list(argv))
        prog = argv[0]
        result = h.Result(0, "", "")
        if prog == "blkid":
            dev = argv[-1]
            result = h.Result(0, f"DEVNAME={dev}\nTYPE={self.fs[dev]}\n", "") if dev in self.fs else h.Result(2, "", "")
        elif prog in ("mkfs.xfs", "mkfs.ext4"):
            self.fs[argv[-1]] = prog.split(".")[1]
            self.fs_blocks[argv[-1]] = self.device_bytes[argv[-1]] // BLOCK
        elif prog == "blockdev":
            result = h.Result(0, f"{self.device_bytes[argv[-1]]}\n", "")
        elif prog == "xfs_info":
            dev = self.mounted[argv[-1]][0]
            result = h.Result(0, xfs_info_text(dev, self.blocks_of(dev), self.ag_blocks), "")
        elif prog == "xfs_growfs":
            dev = self.mounted[argv[-1]][0]
            self.fs_blocks[dev] = min(int(argv[argv.index("-D") + 1]), self.device_bytes[dev] // BLOCK)
        elif prog == "resize2fs":
            self.fs_blocks[argv[-1]] = self.device_bytes[argv[-1]] // BLOCK
        elif prog == "mount":
            dev, mp = argv[-2], argv[-1]
            self.mounted[mp] = (dev, argv[argv.index("-t") + 1])
        elif prog == "umount":
            if argv[-1] in self.busy or self.busy_umounts:
                self.busy_umounts = max(0, self.busy_umounts - 1)
                result = h.Result(32, "", f"umount: {argv[-1]}: target is busy.")
            else:
                self.mounted.pop(argv[-1], None)
        elif prog == "exportfs":
            client, _, path = argv[-1].rpartition(":")
            if argv[1] == "-o":
                self.etab[(client, path)] = argv[2]
            elif (client, path) in self.etab:
                del self.etab[(client, path)]
            else:
                result = h.Result(1, "", f"exportfs: Could not find '{argv[-1]}' to unexport.")
        elif prog == "fsfreeze":
            mp = argv[-1]
            if argv[1] == "--freeze":
                if mp in self.frozen:
                    result = h.Result(1, "", f"fsfreeze: {mp}: freeze failed: Device or resource busy")
                self.frozen.add(mp)
            elif mp in self.frozen:
                self.frozen.discard(mp)
            else:
                result = h.Result(1, "", f"fsfreeze: {mp}: unfreeze failed: Invalid argument")
        self._sync()
        return result

    def blocks_of(self, dev: str) -> int:
        return self.fs_blocks.get(dev, self.device_bytes[dev] // BLOCK)

    def programs(self) -> list[str]:
        return [c[0] for c in self.calls]

    def request(self, op: str, **fields: object) -> dict:
        req = {"v": 1, "op": op, "lv": LV, "export_root": self.root, **fields}
        return h.execute(self.host, req)

    def ok(self, op: str, **fields: object) -> dict:
        response = self.request(op, **fields)
        assert response["ok"], response
        return response["result"]

    def prepare(self, fresh: bool = True, filesystem: str = "xfs") -> dict:
        return self.ok("prepare", vg=VG, filesystem=filesystem, fresh=fresh, max_bytes=LIMIT)

    def publish(self, node: str, addresses: list[str], readonly: bool = False, options: str = "rw,sync") -> dict:
        return self.ok(
            "publish", vg=VG, node_id=node, addresses=addresses, readonly=readonly, options=h.check_options(options)
        )

    def exports_text(self) -> str | None:
        path = Path(h.exports_path(self.host.exports_dir, LV))
        return path.read_text() if path.exists() else None


def xfs_info_text(dev: str, blocks: int, ag_blocks: int) -> str:
    """What xfs_info (xfsprogs 6.1) prints for a mounted xfs."""
    agcount = -(-blocks // ag_blocks)
    return (
        f"meta-data={dev} isize=512    agcount={agcount}, agsize={ag_blocks} blks\n"
        "         =                       sectsz=512   attr=2, projid32bit=1\n"
        "         =                       crc=1        finobt=1, sparse=1, rmapbt=0\n"
        "         =                       reflink=1    bigtime=1 inobtcount=1 nrext64=0\n"
        f"data     =                       bsize={BLOCK}   blocks={blocks}, imaxpct=25\n"
        "         =                       sunit=0      swidth=0 blks\n"
        "naming   =version 2              bsize=4096   ascii-ci=0, ftype=1\n"
        "log      =internal log           bsize=4096   blocks=16384, version=2\n"
        "         =                       sectsz=512   sunit=0 blks, lazy-count=1\n"
        "realtime =none                   extsz=4096   blocks=0, rtextents=0\n"
    )


@pytest.fixture
def sim(tmp_path: Path) -> FakeSystem:
    return FakeSystem(tmp_path)


# --- validation ---


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "..", "snapshot1", "x" * 128, "a;b", None, 3])
def test_check_name_refuses(name):
    with pytest.raises(h.RequestError):
        h.check_name(name)


@pytest.mark.parametrize(
    "root",
    ["/", "relative/x", "/srv/../etc", "/srv/berth/", "/srv//berth", "/etc/berth", "/proc", "/srv/a b", "/srv/$x", ""],
)
def test_export_root_refuses(root):
    with pytest.raises(h.RequestError):
        h.check_export_root(root)


def test_export_root_and_mountpoint():
    assert h.check_export_root("/srv/berth") == "/srv/berth"
    assert h.mountpoint_for("/srv/berth", LV) == f"/srv/berth/{LV}"
    assert h.device_for(VG, LV) == DEV
    with pytest.raises(h.RequestError):
        h.mountpoint_for("/srv/berth", "../etc")


def test_confinement_refuses_symlinks(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok").mkdir()
    assert h.check_confined(str(root / "ok"), str(root)) == str(root / "ok")
    (root / LV).symlink_to(tmp_path)
    with pytest.raises(h.RequestError, match="escapes|symbolic"):
        h.check_confined(str(root / LV), str(root))
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(root / "ok")  # stays inside, but a link is still refused
    with pytest.raises(h.RequestError, match="symbolic|escapes"):
        h.check_confined(str(root / "link"), str(root))


def test_addresses_normalised_and_refused():
    assert h.check_address("2001:DB8:0:0::1") == "2001:db8::1"
    assert h.check_addresses(["198.18.0.12", "198.18.0.11", "198.18.0.11"]) == ["198.18.0.11", "198.18.0.12"]
    for bad in ("0.0.0.0", "::", "224.0.0.1", "198.18.0.0/24", "*", "node1.example", "1.2.3.4 rw", "", 7):
        with pytest.raises(h.RequestError):
            h.check_address(bad)
    for bad in ([], "198.18.0.11", ["1.1.1.1"] * 0, [f"10.0.0.{i}" for i in range(1, 18)]):
        with pytest.raises(h.RequestError):
            h.check_addresses(bad)


def test_options_strip_rw_ro_and_refuse_dangerous():
    assert h.check_options("rw,sync,no_subtree_check,no_root_squash") == "sync,no_subtree_check,no_root_squash"
    assert h.check_options("ro,async,async,sec=sys:krb5") == "async,sec=sys:krb5"
    assert h.check_options(None) == "sync,no_subtree_check,root_squash", "root on a node is not root here"
    assert h.check_options("rw") == h.check_options("-") == ""  # only the per-client rw/ro is left
    bad_ones = ("rw sync", "rw,(all)", "fsid=0", "mp", "mountpoint", "refer=/x@h", "rw,#x", "a'b", "", ",", "fsid=7")
    for bad in (*bad_ones, "sync\n", "rw,sync\n"):  # a newline would split the exports line
        with pytest.raises(h.RequestError):
            h.check_options(bad)


def test_validate_request_checks_everything():
    good = {"v": 1, "op": "thaw", "lv": LV, "export_root": "/srv/berth", "token": "0123abcd"}
    assert h.validate_request(good)["token"] == "0123abcd"
    for bad in (
        {**good, "v": 2},
        {**good, "op": "rm"},
        {**good, "extra": 1},
        {**good, "token": "ZZZZZZZZ"},
        {**good, "lv": "../x"},
        {**good, "export_root": "/etc"},
        {"v": 1, "op": "prepare", "vg": VG, "lv": LV, "export_root": "/srv/b", "filesystem": "btrfs", "fresh": True},
        {"v": 1, "op": "prepare", "vg": VG, "lv": LV, "export_root": "/srv/b", "filesystem": "xfs", "fresh": "yes"},
        [],
    ):
        with pytest.raises(h.RequestError):
            h.validate_request(bad)


# --- pure helpers ---


def test_fstab_add_replace_remove_keeps_other_lines():
    mp = f"/srv/berth/{LV}"
    added = h.fstab_with(OTHER_FSTAB, DEV, mp, "xfs")
    assert added.startswith(OTHER_FSTAB)
    assert added.endswith(f"{DEV} {mp} xfs defaults,nofail,x-systemd.before=nfs-server.service 0 0\n")
    assert h.fstab_with(added, DEV, mp, "xfs") is added  # idempotent: unchanged text, no rewrite
    replaced = h.fstab_with(added, DEV, mp, "ext4")
    assert replaced.count(mp) == 1 and " ext4 " in replaced
    other = h.fstab_with(replaced, "/dev/berth/vol-b", "/srv/berth/vol-b", "xfs")
    assert h.fstab_without(other, mp) == h.fstab_with(OTHER_FSTAB, "/dev/berth/vol-b", "/srv/berth/vol-b", "xfs")
    assert h.fstab_without(OTHER_FSTAB, mp) is OTHER_FSTAB
    # A commented-out line mentioning the path is not ours.
    commented = f"# {DEV} {mp} xfs defaults 0 0\n"
    assert h.fstab_without(commented, mp) == commented


def test_exports_render_parse_roundtrip():
    record = h.ExportsRecord(
        options="sync,no_subtree_check,no_root_squash",
        nodes={
            "iqn.2026-11.io.berth.lab:node1|198.18.0.11,198.18.1.11": (False, ["198.18.0.11", "198.18.1.11"]),
            "iqn.2026-11.io.berth.lab:node2|198.18.0.12": (True, ["198.18.0.12"]),
        },
    )
    text = h.render_exports(LV, "/srv/berth/" + LV, record)
    assert text is not None
    export_line = text.splitlines()[-1]
    assert export_line == (
        f"/srv/berth/{LV} 198.18.0.11(rw,sync,no_subtree_check,no_root_squash,mp) "
        "198.18.0.12(ro,sync,no_subtree_check,no_root_squash,mp) "
        "198.18.1.11(rw,sync,no_subtree_check,no_root_squash,mp)"
    )
    assert h.parse_exports(text) == record


def test_exports_without_extra_options_roundtrip():
    record = h.ExportsRecord(options="", nodes={"n": (False, ["10.0.0.1"])})
    text = h.render_exports(LV, "/srv/berth/" + LV, record)
    assert text is not None and text.endswith(" 10.0.0.1(rw,mp)\n")
    assert h.parse_exports(text) == record


def test_exports_shared_address_rw_wins_and_empty_is_no_file():
    record = h.ExportsRecord(nodes={"a": (True, ["10.0.0.1"]), "b": (False, ["10.0.0.1"]), "c": (True, ["10.0.0.2"])})
    assert record.clients() == {"10.0.0.1": False, "10.0.0.2": True}
    # No clients must never become a bare "path" line: that would export to the world.
    assert h.render_exports(LV, "/srv/berth/" + LV, h.ExportsRecord()) is None


def test_parse_exports_skips_damaged_lines():
    text = "# node good rw 10.0.0.1\n# node bad rw not-an-ip\n# node x maybe 10.0.0.3\n# options rw,(bad)\n"
    record = h.parse_exports(text)
    assert record.nodes == {"good": (False, ["10.0.0.1"])}
    assert record.options == h.check_options(None)


def test_live_clients_from_etab():
    etab = (
        "/srv/berth/vol-a\t198.18.0.11(rw,sync,wdelay)\n"
        "/srv/berth/vol-a\t2001:db8:0::1(ro)\n"
        "/srv/berth/vol-ab\t198.18.0.12(rw)\n"
    )
    assert h.live_clients(etab, "/srv/berth/vol-a") == {"198.18.0.11", "2001:db8::1"}


def test_parse_mountinfo_unescapes_and_stacks():
    text = (
        "36 35 98:0 /mnt1 /srv/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "37 35 253:7 / /srv/berth/x rw shared:2 - xfs /dev/mapper/berth-x rw\n"
        "38 37 253:8 / /srv/berth/x rw shared:3 opt:4 - ext4 /dev/mapper/berth-y rw\n"
        "garbage\n"
    )
    mounts = h.parse_mountinfo(text)
    assert mounts[0].mountpoint == "/srv/with space"
    top = h.mount_at(mounts, "/srv/berth/x")
    assert top is not None and top.fstype == "ext4" and top.devno == os.makedev(253, 8)
    assert h.mount_at(mounts, "/srv/berth") is None


def test_atomic_write_keeps_mode(tmp_path: Path):
    path = tmp_path / "f"
    path.write_text("old")
    os.chmod(path, 0o600)
    h.atomic_write(str(path), "new\n")
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


# --- operations on the simulated host ---


def test_prepare_fresh_mkfs_mount_mode_fstab(sim: FakeSystem):
    result = sim.prepare()
    assert result["done"] == ["mkfs", "mount", "fstab"]
    assert ["mkfs.xfs", "-q", "-K", DEV] in sim.calls
    assert ["mount", "-t", "xfs", DEV, sim.mp] in sim.calls
    assert sim.programs().index("blkid") < sim.programs().index("mkfs.xfs") < sim.programs().index("mount")
    # Not sticky: root_squash + sticky + the client's protected_regular refuses a root pod's own new files.
    assert stat.S_IMODE(os.stat(sim.mp).st_mode) == 0o777, "any uid creates its files"
    fstab = Path(sim.host.fstab).read_text()
    assert fstab.startswith(OTHER_FSTAB) and f"{DEV} {sim.mp} xfs defaults,nofail" in fstab


def test_prepare_is_idempotent(sim: FakeSystem):
    sim.prepare()
    fstab = Path(sim.host.fstab).read_text()
    sim.calls.clear()
    assert sim.prepare()["done"] == []
    assert sim.calls == []  # already mounted, fstab already right: nothing to run
    assert Path(sim.host.fstab).read_text() == fstab


def test_prepare_finishes_half_done_without_mkfs(sim: FakeSystem):
    sim.fs[DEV] = "xfs"  # an earlier attempt made the filesystem, then died before mounting it
    assert sim.prepare()["done"] == ["mount", "fstab"]
    assert "mkfs.xfs" not in sim.programs()


def test_prepare_ext4(sim: FakeSystem):
    sim.prepare(filesystem="ext4")
    mkfs = next(c for c in sim.calls if c[0] == "mkfs.ext4")
    assert mkfs[-1] == DEV and "metadata_csum_seed" in mkfs
    assert sim.mounted[sim.mp] == (DEV, "ext4")


def test_prepare_clone_xfs_new_uuid_then_mount(sim: FakeSystem):
    sim.fs[DEV] = "xfs"
    result = sim.prepare(fresh=False)
    assert result["done"] == ["uuid", "mount", "fstab"]
    replay = f"{sim.root}/.replay-{LV}"
    steps = [c for c in sim.calls if c[0] in ("mount", "umount", "xfs_admin", "mkfs.xfs")]
    assert steps == [
        ["mount", "-t", "xfs", "-o", "nouuid", DEV, replay],  # replays the log next to the mounted origin
        ["umount", replay],
        ["xfs_admin", "-U", "generate", DEV],
        ["mount", "-t", "xfs", DEV, sim.mp],
    ]
    assert not os.path.exists(replay)
    assert stat.S_IMODE(os.stat(sim.mp).st_mode) != 0o777  # a clone keeps its origin's permissions


def test_prepare_clone_ext4(sim: FakeSystem):
    sim.fs[DEV] = "ext4"
    sim.prepare(fresh=False)
    progs = sim.programs()
    assert progs.index("e2fsck") < progs.index("tune2fs") < progs.index("mount")
    assert ["tune2fs", "-U", "random", DEV] in sim.calls


def test_prepare_clone_after_crash_in_replay_mount(sim: FakeSystem):
    sim.fs[DEV] = "xfs"
    replay = f"{sim.root}/.replay-{LV}"
    os.makedirs(replay)
    sim.mounted[replay] = (DEV, "xfs")
    sim._sync()
    sim.prepare(fresh=False)
    assert sim.calls[0] == ["umount", replay]
    assert sim.mounted == {sim.mp: (DEV, "xfs")}


def test_prepare_refuses_blank_clone_and_foreign_mount(sim: FakeSystem):
    response = sim.request("prepare", vg=VG, filesystem="xfs", fresh=False, max_bytes=LIMIT)
    assert response["error"]["kind"] == "conflict"
    os.makedirs(sim.mp)
    sim.mounted[sim.mp] = (f"/dev/{VG}/other", "xfs")
    sim._sync()
    response = sim.request("prepare", vg=VG, filesystem="xfs", fresh=True, max_bytes=LIMIT)
    assert response["error"]["kind"] == "conflict" and "other" in response["error"]["message"]
    assert "mkfs.xfs" not in sim.programs()


def test_prepare_missing_device_and_failing_command(sim: FakeSystem):
    del sim.devices[DEV]
    assert sim.request("prepare", vg=VG, filesystem="xfs", fresh=True, max_bytes=LIMIT)["error"]["kind"] == "not_found"
    sim.devices[DEV] = os.makedev(253, 7)
    real_run = sim.run

    def failing(argv: list[str], timeout: float) -> h.Result:
        return h.Result(1, "", "mkfs.xfs: bad things") if argv[0] == "mkfs.xfs" else real_run(argv, timeout)

    sim.host.run = failing
    error = sim.request("prepare", vg=VG, filesystem="xfs", fresh=True, max_bytes=LIMIT)["error"]
    assert error["kind"] == "failed" and error["argv"][0] == "mkfs.xfs" and error["rc"] == 1
    assert "bad things" in error["stderr"]


def test_symlinked_mountpoint_refused(sim: FakeSystem, tmp_path: Path):
    os.makedirs(sim.root)
    os.symlink(tmp_path / "etc", sim.mp)
    response = sim.request("prepare", vg=VG, filesystem="xfs", fresh=True, max_bytes=LIMIT)
    assert response["error"]["kind"] == "invalid"
    assert sim.calls == []


N1 = "iqn.2026-11.io.berth.lab:node1|198.18.0.11,198.18.1.11"
N2 = "iqn.2026-11.io.berth.lab:node2|198.18.0.12"


def test_publish_two_nodes_rw_and_ro(sim: FakeSystem):
    sim.prepare()
    sim.publish(N1, ["198.18.0.11", "198.18.1.11"])
    result = sim.publish(N2, ["198.18.0.12"], readonly=True)
    assert result["clients"] == {"198.18.0.11": "rw", "198.18.0.12": "ro", "198.18.1.11": "rw"}
    text = sim.exports_text()
    assert text is not None
    assert f"# node {N1} rw 198.18.0.11 198.18.1.11" in text
    assert f"# node {N2} ro 198.18.0.12" in text
    assert text.splitlines()[-1] == (
        f"{sim.mp} 198.18.0.11(rw,sync,mp) 198.18.0.12(ro,sync,mp) 198.18.1.11(rw,sync,mp)"
    )
    assert sim.etab == {
        ("198.18.0.11", sim.mp): "rw,sync,mp",
        ("198.18.1.11", sim.mp): "rw,sync,mp",
        ("198.18.0.12", sim.mp): "ro,sync,mp",
    }


def test_publish_is_idempotent(sim: FakeSystem):
    sim.prepare()
    sim.publish(N1, ["198.18.0.11"])
    text, etab = sim.exports_text(), dict(sim.etab)
    sim.publish(N1, ["198.18.0.11"])
    assert sim.exports_text() == text and sim.etab == etab
    assert not any(c[:2] == ["exportfs", "-u"] for c in sim.calls)


def test_publish_changed_address_unexports_old_one(sim: FakeSystem):
    sim.prepare()
    sim.publish(N1, ["198.18.0.11"])
    sim.publish(N1, ["198.18.0.21"])
    assert set(sim.etab) == {("198.18.0.21", sim.mp)}


def test_publish_remounts_after_lost_mount_but_never_exports_unmounted(sim: FakeSystem):
    sim.prepare()
    sim.mounted.clear()  # a storage-host reboot whose nofail mount did not happen
    sim._sync()
    sim.publish(N1, ["198.18.0.11"])
    assert sim.mounted[sim.mp] == (DEV, "xfs")
    assert sim.programs().index("mount", 3) < sim.programs().index("exportfs")
    sim.mounted.clear()
    sim.fs.clear()  # and now the device has no filesystem at all
    sim._sync()
    response = sim.request("publish", vg=VG, node_id=N2, addresses=["198.18.0.12"], readonly=False, options="sync")
    assert response["error"]["kind"] == "conflict"
    assert ("198.18.0.12", sim.mp) not in sim.etab


def test_unpublish_keeps_other_nodes_and_is_idempotent(sim: FakeSystem):
    sim.prepare()
    sim.publish(N1, ["198.18.0.11", "198.18.1.11"])
    sim.publish(N2, ["198.18.0.12"], readonly=True)
    sim.ok("unpublish", node_id=N1, addresses=["198.18.0.11", "198.18.1.11"])
    assert set(sim.etab) == {("198.18.0.12", sim.mp)}
    text = sim.exports_text()
    assert text is not None and N1 not in text and "198.18.0.11" not in text
    sim.ok("unpublish", node_id=N1, addresses=["198.18.0.11", "198.18.1.11"])  # again: fine
    sim.ok("unpublish", node_id=N2, addresses=["198.18.0.12"])
    assert sim.exports_text() is None  # no client left: no file (a client-less line would export to all)
    assert sim.etab == {}


def test_unpublish_keeps_address_shared_with_another_node(sim: FakeSystem):
    sim.prepare()
    sim.publish("a", ["10.0.0.1"])
    sim.publish("b", ["10.0.0.1"], readonly=True)
    sim.ok("unpublish", node_id="a", addresses=["10.0.0.1"])
    assert sim.etab == {("10.0.0.1", sim.mp): "ro,sync,mp"}


def test_teardown_unexports_before_umount_then_cleans_up(sim: FakeSystem):
    sim.prepare()
    sim.publish(N1, ["198.18.0.11", "198.18.1.11"])
    sim.calls.clear()
    result = sim.ok("teardown", vg=VG)
    progs = sim.programs()
    last_unexport = max(i for i, c in enumerate(sim.calls) if c[:2] == ["exportfs", "-u"])
    assert last_unexport < progs.index("umount")
    assert sim.etab == {} and sim.mounted == {}
    assert sim.exports_text() is None
    assert Path(sim.host.fstab).read_text() == OTHER_FSTAB
    assert not os.path.exists(sim.mp)
    assert result["warnings"] == []
    sim.calls.clear()
    assert sim.ok("teardown", vg=VG)["done"] == []  # idempotent
    assert "umount" not in sim.programs()


def test_teardown_busy_is_in_use_and_keeps_data(sim: FakeSystem):
    sim.prepare()
    sim.busy.add(sim.mp)
    # What holds it is named: a local process (cwd and an open file) and an NFS client's delegation.
    proc = sim.tmp / "proc" / "4242"
    (proc / "fd").mkdir(parents=True)
    (proc / "comm").write_text("sha256sum\n")
    os.symlink(sim.mp, proc / "cwd")
    os.symlink(f"{sim.mp}/disk.img", proc / "fd" / "3")
    os.symlink("/", proc / "root")
    client = sim.tmp / "proc" / "fs" / "nfsd" / "clients" / "5"
    client.mkdir(parents=True)
    (client / "info").write_text('clientid: 0x13e9\naddress: "198.18.0.12:727"\nname: "Linux NFSv4.2 node2"\n')
    devno = sim.devices[DEV]
    sb = f"{os.major(devno):02x}:{os.minor(devno):02x}"
    (client / "states").write_text(
        f'- 0x01: {{ type: deleg, access: r, superblock: "{sb}:131", filename: "/from-node1" }}\n'
        '- 0x02: { type: open, access: rw, deny: --, superblock: "fd:09:77", filename: "/other-volume" }\n'
    )
    cache = sim.tmp / "proc" / "net" / "rpc" / "nfsd.export"
    cache.mkdir(parents=True)
    (cache / "content").write_text(f"#path domain(flags)\n# {sim.mp}\t198.18.0.12(rw,root_squash)\n")
    error = sim.request("teardown", vg=VG)["error"]
    assert error["kind"] == "in_use"
    holders = "process 4242 (sha256sum); nfsd's nfsd.export cache; NFS client 198.18.0.12:727: 1 deleg"
    assert f"({holders})" in error["message"], error
    assert f"{DEV} {sim.mp}" in Path(sim.host.fstab).read_text()  # still mounted: the fstab line stays
    sim.busy.clear()
    sim.mounted.clear()
    sim._sync()
    Path(sim.mp, "precious").write_text("x")  # files in the bare directory are never deleted
    result = sim.ok("teardown", vg=VG)
    assert os.path.exists(Path(sim.mp, "precious")) and result["warnings"]


def test_teardown_waits_for_nfsd_to_let_go(sim: FakeSystem):
    sim.prepare()
    sim.host.release_wait = 5
    sim.busy_umounts = 1  # busy once, as right after the last client unmounted
    assert f"umount {sim.mp}" in sim.ok("teardown", vg=VG)["done"]
    assert [c for c in sim.calls if c[0] == "umount"] == [["umount", sim.mp]] * 2


def test_a_busy_teardown_flushes_nfsd_export_caches_but_never_in_a_tight_loop(sim: FakeSystem):
    sim.prepare()
    sim.host.release_wait = 2
    sim.busy.add(sim.mp)  # busy for the whole wait: a flush at the start, none more within FLUSH_INTERVAL
    sim.calls.clear()
    assert sim.request("teardown", vg=VG)["error"]["kind"] == "in_use"
    assert [c for c in sim.calls if c[0] == "exportfs"] == [["exportfs", "-f"]]
    assert len([c for c in sim.calls if c[0] == "umount"]) >= 3


def grow_steps(sim: FakeSystem) -> list[int]:
    return [int(c[c.index("-D") + 1]) for c in sim.calls if c[0] == "xfs_growfs"]


def test_grow_uses_the_mounted_filesystem_type(sim: FakeSystem):
    sim.prepare()
    sim.device_bytes[DEV] = 2 * GiB  # lvextend happened
    sim.ok("grow", vg=VG, max_bytes=LIMIT)
    assert grow_steps(sim) == [2 * GiB // BLOCK] and sim.blocks_of(DEV) == 2 * GiB // BLOCK
    sim2 = FakeSystem(sim.tmp / "second")
    sim2.prepare(filesystem="ext4")
    sim2.ok("grow", vg=VG, max_bytes=LIMIT)
    assert ["resize2fs", DEV] in sim2.calls


def test_xfs_grows_in_bounded_steps_so_memory_never_follows_the_size(sim: FakeSystem):
    """xfs_growfs holds every new AG's headers in memory until it writes them: one call from 1 GiB to petabytes
    ran the storage host out of memory. Each step adds at most XFS_GROW_STEP_AGS allocation groups."""
    sim.prepare()
    sim.device_bytes[DEV] = 100 * GiB
    sim.ok("grow", vg=VG, max_bytes=LIMIT)
    steps = grow_steps(sim)
    assert len(steps) > 1 and steps[-1] == 100 * GiB // BLOCK
    sizes = [GiB // BLOCK, *steps]
    assert all(b - a <= h.XFS_GROW_STEP_AGS * sim.ag_blocks for a, b in zip(sizes, sizes[1:], strict=False))
    sim.calls.clear()
    sim.ok("grow", vg=VG, max_bytes=LIMIT)
    assert grow_steps(sim) == [], "a filesystem that fills its LV is not grown again"


def test_grow_of_an_lv_above_the_limit_is_refused_before_any_grow(sim: FakeSystem):
    sim.prepare()
    sim.device_bytes[DEV] = int(5.1 * (1 << 50))  # the 5.1 PiB LV the adversarial run made
    error = sim.request("grow", vg=VG, max_bytes=400 * GiB)["error"]
    assert error["kind"] == "out_of_range" and str(400 * GiB) in error["message"]
    assert not {"xfs_growfs", "resize2fs"} & set(sim.programs())
    assert sim.request("grow", vg=VG)["error"]["kind"] == "invalid", "max_bytes is required"


def test_grow_after_a_failed_grow_finishes_it(sim: FakeSystem):
    """The retry of an expansion whose filesystem grow failed: the LV already has its size, the filesystem not."""
    sim.prepare()
    sim.device_bytes[DEV] = 3 * GiB
    real_run = sim.run
    sim.host.run = lambda argv, timeout: (
        h.Result(1, "", "xfs_growfs: XFS_IOC_FSGROWFSDATA xfsctl failed: No space left on device")
        if argv[0] == "xfs_growfs"
        else real_run(argv, timeout)
    )
    assert sim.request("grow", vg=VG, max_bytes=LIMIT)["error"]["kind"] == "failed"
    sim.host.run = real_run
    sim.ok("grow", vg=VG, max_bytes=LIMIT)
    assert sim.blocks_of(DEV) == 3 * GiB // BLOCK


@pytest.mark.parametrize("filesystem", ["xfs", "ext4"])
def test_clone_larger_than_its_source_gets_its_filesystem_grown(sim: FakeSystem, filesystem: str):
    sim.fs[DEV] = filesystem
    sim.fs_blocks[DEV] = GiB // BLOCK  # the source's filesystem, block for block
    sim.device_bytes[DEV] = 2 * GiB  # the clone's LV was extended to the requested size
    sim.prepare(fresh=False)
    assert sim.blocks_of(DEV) == 2 * GiB // BLOCK
    progs = sim.programs()
    assert progs.index("mount") < progs.index("xfs_growfs" if filesystem == "xfs" else "resize2fs")


def test_freeze_arms_timer_first_and_thaw_disarms(sim: FakeSystem):
    sim.prepare()
    sim.calls.clear()
    unit = sim.ok("freeze", vg=VG, token="00aa11bb", thaw_after=30)["unit"]
    assert unit == f"berth-thaw-{LV}-00aa11bb"
    arm, freeze = sim.calls
    assert arm[0] == "systemd-run" and f"--unit={unit}" in arm and "--on-active=30s" in arm
    assert arm[-2:] == ["--unfreeze", sim.mp] and arm[-3].endswith("fsfreeze")
    assert freeze == ["fsfreeze", "--freeze", sim.mp]
    assert sim.mp in sim.frozen
    sim.calls.clear()
    assert sim.ok("thaw", token="00aa11bb") == {"thawed": True}
    assert sim.calls == [["fsfreeze", "--unfreeze", sim.mp], ["systemctl", "stop", f"{unit}.timer"]]
    assert sim.ok("thaw", token="00aa11bb") == {"thawed": False}  # the timer fired first: not an error


def test_freeze_of_frozen_fs_is_busy_and_keeps_its_timer(sim: FakeSystem):
    sim.prepare()
    sim.frozen.add(sim.mp)
    sim.calls.clear()
    assert sim.request("freeze", vg=VG, token="00aa11bb", thaw_after=30)["error"]["kind"] == "busy"
    assert "systemctl" not in sim.programs()  # our timer stays armed: it will thaw whoever froze it


def test_freeze_unmounted_is_not_found(sim: FakeSystem):
    assert sim.request("freeze", vg=VG, token="00aa11bb", thaw_after=30)["error"]["kind"] == "not_found"
    assert sim.calls == []


def test_lock_busy(sim: FakeSystem):
    with sim.host.lock(LV):
        response = sim.request("teardown", vg=VG)
    assert response["error"]["kind"] == "busy"


def test_main_reads_json_and_always_answers(sim: FakeSystem):
    out = io.StringIO()
    h.main(io.StringIO("{not json"), out, sim.host)
    assert json.loads(out.getvalue())["error"]["kind"] == "invalid"
    out = io.StringIO()
    req = {"v": 1, "op": "teardown", "vg": VG, "lv": LV, "export_root": sim.root}
    h.main(io.StringIO(json.dumps(req)), out, sim.host)
    assert json.loads(out.getvalue()) == {
        "ok": True,
        "result": {"clients": {}, "done": [], "unexported": [], "warnings": []},
    }


def test_run_command_is_bounded():
    assert h.run_command(["true"], 5).rc == 0
    with pytest.raises(h.HostNotReadyError, match="/nonexistent/berth-x is not installed on the storage host"):
        h.run_command(["/nonexistent/berth-x"], 5)
    with pytest.raises(h.CommandTimeoutError):
        h.run_command(["sleep", "5"], 0.2)


def test_reconfigure_changes_the_options_of_published_nodes_only(sim: FakeSystem):
    sim.prepare()
    sim.publish(N1, ["198.18.0.11"])
    sim.ok("reconfigure", options=h.check_options("async,no_root_squash"))
    assert sim.etab == {("198.18.0.11", sim.mp): "rw,async,no_root_squash,mp"}
    assert "# options async,no_root_squash" in (sim.exports_text() or ""), "an nfs-server restart would lose it"
    sim.ok("unpublish", node_id=N1, addresses=["198.18.0.11"])
    assert sim.ok("reconfigure", options="sync") == {"clients": {}, "unexported": []}
    assert sim.exports_text() is None and sim.etab == {}, "published nowhere: nothing exported"


# --- fences: a group snapshot's common instant (docs/group-snapshots.md) ---

TOKEN = "0123456789abcdef0123456789abcdef"
CHAIN = "berth-fence-0123456789abcdef"


def fence_request(sim: FakeSystem, op: str, **fields: object) -> dict:
    return h.execute(sim.host, {"v": 1, "op": op, "export_root": sim.root, **fields})


def test_a_fence_drops_nfs_from_the_volumes_clients_after_arming_the_timer_that_lifts_it(sim: FakeSystem):
    sim.prepare()
    sim.publish(N1, ["198.18.0.11", "198.18.1.11"])
    sim.publish("iqn.2026-11.io.berth.lab:node3|fd00::13", ["fd00::13"])
    sim.calls.clear()
    fenced = fence_request(sim, "fence", lvs=[LV, "vol-unpublished"], token=TOKEN, thaw_after=60)
    assert fenced == {"ok": True, "result": {"fenced": ["198.18.0.11", "198.18.1.11", "fd00::13"]}}
    timer = ["systemd-run", "--quiet", "--collect", f"--unit={CHAIN}", "--on-active=60s",
             "--timer-property=AccuracySec=1s", "sh", "-c", h.UNFENCE_SCRIPT, "sh", CHAIN]  # fmt: skip
    drop = ["-p", "tcp", "--dport", "2049", "-j", "DROP"]
    assert sim.calls == [
        timer,
        ["iptables", "-w", "-N", CHAIN],
        ["iptables", "-w", "-A", CHAIN, "-s", "198.18.0.11", *drop],
        ["iptables", "-w", "-A", CHAIN, "-s", "198.18.1.11", *drop],
        ["iptables", "-w", "-I", "INPUT", "1", "-j", CHAIN],
        ["ip6tables", "-w", "-N", CHAIN],
        ["ip6tables", "-w", "-A", CHAIN, "-s", "fd00::13", *drop],
        ["ip6tables", "-w", "-I", "INPUT", "1", "-j", CHAIN],
    ]
    sim.calls.clear()
    assert fence_request(sim, "unfence", token=TOKEN)["ok"]
    assert sim.calls == [["sh", "-c", h.UNFENCE_SCRIPT, "sh", CHAIN], ["systemctl", "stop", f"{CHAIN}.timer"]]


def test_fence_requests_are_validated(sim: FakeSystem):
    for fields, message in (
        ({"lvs": [], "token": TOKEN, "thaw_after": 60}, "lvs must be a list of 1..256"),
        ({"lvs": ["../x"], "token": TOKEN, "thaw_after": 60}, "invalid"),
        ({"lvs": [LV], "token": "XYZ", "thaw_after": 60}, "invalid token"),
        ({"lvs": [LV], "token": TOKEN, "thaw_after": 6000}, "thaw_after"),
    ):
        error = fence_request(sim, "fence", **fields)["error"]
        assert error["kind"] == "invalid" and message in error["message"], (fields, error)


def test_a_program_missing_on_the_host_is_host_not_ready(sim: FakeSystem):
    sim.host.run = lambda argv, timeout: h.run_command(["/nonexistent/" + argv[0]], timeout)
    response = sim.request("prepare", vg=VG, filesystem="xfs", fresh=True, max_bytes=LIMIT)
    assert response["error"]["kind"] == "host_not_ready", response
    assert "is not installed on the storage host" in response["error"]["message"]
