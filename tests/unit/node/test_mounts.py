import pytest

from csi_driver.node.errors import CommandTimeout
from csi_driver.node.mounts import Mounter, parse_mountinfo, unescape

from .fakes import FakeSystem, timeout_for

MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "301 22 8:16 / /var/lib/kubelet/pods/x/volumes/my\\040vol rw,relatime shared:5 master:2 - xfs /dev/sdb "
    "rw,attr2,inode64\n"
    "302 22 0:5 /sdb /mnt/block\\040target ro,nosuid - devtmpfs udev rw,size=100k\n"
    "303 22 0:50 / /mnt/nfs rw - nfs4 198.18.0.2:/srv/berth/vol rw,vers=4.2\n"
    "304 303 0:51 / /mnt/nfs rw - nfs4 198.18.0.3:/srv/other rw,vers=4.2\n"
)


def test_parse_mountinfo_fields_and_escapes():
    entries = parse_mountinfo(MOUNTINFO)
    assert len(entries) == 5
    fs = entries[1]
    assert fs.mount_point == "/var/lib/kubelet/pods/x/volumes/my vol"
    assert (fs.fs_type, fs.source, fs.major_minor) == ("xfs", "/dev/sdb", "8:16")
    assert not fs.readonly and "inode64" in fs.super_options
    block = entries[2]
    assert block.root == "/sdb" and block.readonly and block.mount_point == "/mnt/block target"


def test_unescape_all_octal_escapes():
    assert unescape("a\\040b\\011c\\012d\\134e") == "a b\tc\nd\\e"


def test_at_returns_top_most_mount(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    from csi_driver.node.mounts import MountTable

    table = MountTable(str(path))
    assert table.at("/mnt/nfs/").source == "198.18.0.3:/srv/other"
    assert table.is_mountpoint("/mnt/block target")
    assert not table.is_mountpoint("/mnt")


def test_unmount_escalates_to_force_then_lazy():
    system = FakeSystem()
    system.table.add("198.18.0.2:/srv/x", "/mnt/dead", "nfs4", "0:60")
    system.handlers += [timeout_for(["umount", "--"]), timeout_for(["umount", "-f"])]
    Mounter(system, system.table).unmount("/mnt/dead")
    assert [c[:2] for c in system.commands("umount")] == [["umount", "--"], ["umount", "-f"], ["umount", "-l"]]
    assert not system.table.is_mountpoint("/mnt/dead")


def test_unmount_of_unmounted_path_runs_nothing():
    system = FakeSystem()
    Mounter(system, system.table).unmount("/mnt/none")
    assert system.calls == []


def test_lazy_unmount_timeout_is_reported():
    system = FakeSystem()
    system.table.add("198.18.0.2:/srv/x", "/mnt/dead", "nfs4", "0:60")
    system.handlers.append(timeout_for(["umount"]))
    with pytest.raises(CommandTimeout):
        Mounter(system, system.table).unmount("/mnt/dead")


def test_readonly_bind_remounts_read_only():
    system = FakeSystem()
    system.table.add("/dev/sdb", "/staging", "ext4", "8:16")
    Mounter(system, system.table).bind("/staging", "/target", readonly=True)
    assert system.commands("mount") == [
        ["mount", "--bind", "--", "/staging", "/target"],
        ["mount", "-o", "remount,bind,ro", "--", "/target"],
    ]
    assert system.table.at("/target").readonly
