import pytest

from csi_driver.node.commands import Result
from csi_driver.node.errors import FilesystemError, InvalidVolume
from csi_driver.node.filesystems import Filesystems, fs_type_or_default
from csi_driver.node.mounts import Mounter

from .fakes import FakeSystem


def make() -> tuple[FakeSystem, Filesystems]:
    system = FakeSystem()
    return system, Filesystems(system, Mounter(system, system.table))


def test_blank_device_is_detected_by_exit_code_2():
    system, fs = make()
    assert fs.probe("/dev/sdb") is None
    assert system.calls == [["blkid", "-p", "-o", "export", "--", "/dev/sdb"]]


def test_blkid_error_is_not_blank():
    system, fs = make()
    system.handlers.append(lambda a: Result(4, "", "I/O error") if a[0] == "blkid" else None)
    with pytest.raises(FilesystemError, match="cannot probe"):
        fs.ensure_filesystem("/dev/sdb", "ext4")
    assert not [c for c in system.calls if c[0].startswith("mkfs")]


def test_mkfs_only_when_blank():
    system, fs = make()
    assert fs.ensure_filesystem("/dev/sdb", "xfs") is True
    assert system.commands("mkfs.xfs") == [["mkfs.xfs", "-K", "-q", "--", "/dev/sdb"]]
    assert fs.ensure_filesystem("/dev/sdb", "xfs") is False
    assert len(system.commands("mkfs.xfs")) == 1


@pytest.mark.parametrize(
    "blkid_out, fragment",
    [("TYPE=xfs\n", "already holds xfs"), ("PTTYPE=gpt\n", "partition table"), ("TYPE=LVM2_member\n", "LVM2")],
)
def test_never_formats_a_device_with_data(blkid_out, fragment):
    system, fs = make()
    system.handlers.append(lambda a: Result(0, blkid_out, "") if a[0] == "blkid" else None)
    with pytest.raises(FilesystemError, match=fragment):
        fs.ensure_filesystem("/dev/sdb", "ext4")
    assert not [c for c in system.calls if c[0].startswith("mkfs")]


def test_xfs_mount_adds_nouuid_and_no_fsck():
    system, fs = make()
    fs.mount("/dev/sdb", "/staging", "xfs", ["noatime"], readonly=False)
    assert system.commands("mount") == [["mount", "-t", "xfs", "-o", "noatime,rw,nouuid", "--", "/dev/sdb", "/staging"]]
    assert not [c for c in system.calls if "fsck" in c[0]]


def test_grow_uses_the_right_tool():
    system, fs = make()
    fs.grow("ext4", "/dev/sdb", "/staging")
    fs.grow("xfs", "/dev/sdc", "/staging2")
    assert system.calls == [["resize2fs", "--", "/dev/sdb"], ["xfs_growfs", "--", "/staging2"]]


def test_fs_type_default_and_unsupported():
    assert fs_type_or_default("") == "ext4"
    with pytest.raises(InvalidVolume, match="btrfs"):
        fs_type_or_default("btrfs")
