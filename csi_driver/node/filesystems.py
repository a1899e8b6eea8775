"""Filesystems on block devices: detect blank, mkfs only when blank, mount, grow online, report usage.

The one rule that matters: a device that carries any signature (filesystem, partition table, LVM, RAID)
is never formatted. `blkid -p` reads the device itself (no cache) and exits 2 when it finds nothing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .commands import Runner
from .errors import CommandFailed, FilesystemError, InvalidVolume
from .mounts import Mounter

log = logging.getLogger("berth.node.filesystems")

SUPPORTED = ("ext4", "xfs")
DEFAULT_FS = "ext4"
BLKID_NOTHING_FOUND = 2
MKFS_TIMEOUT = 600.0
GROW_TIMEOUT = 600.0
# mkfs may leave a short last block group unused; a difference below this is layout, not a larger volume.
GROW_THRESHOLD_BYTES = 16 << 20
_XFS_DATA_RE = re.compile(r"^data\s+=\s*bsize=(\d+)\s+blocks=(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Signature:
    """What blkid found: a filesystem TYPE, or a PTTYPE (partition table), or both."""

    fs_type: str | None
    partition_table: str | None


@dataclass(frozen=True)
class Usage:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    free_inodes: int
    used_inodes: int


def fs_type_or_default(fs_type: str) -> str:
    fs_type = fs_type or DEFAULT_FS
    if fs_type not in SUPPORTED:
        raise InvalidVolume(f"fs_type {fs_type!r} is not supported (use one of {', '.join(SUPPORTED)})")
    return fs_type


class Filesystems:
    def __init__(self, runner: Runner, mounter: Mounter) -> None:
        self.runner = runner
        self.mounter = mounter

    def probe(self, device: str) -> Signature | None:
        """None when the device is blank; raises FilesystemError when blkid cannot read it."""
        result = self.runner.run(["blkid", "-p", "-o", "export", "--", device], check=False, timeout=60)
        if result.rc == BLKID_NOTHING_FOUND:
            return None
        if result.rc != 0:
            raise FilesystemError(f"cannot probe {device}: blkid exited {result.rc}: {result.stderr.strip()}")
        values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        # Any other signature (LVM2_member, linux_raid_member, crypto_LUKS...) counts as data, not blank.
        found = Signature(values.get("TYPE"), values.get("PTTYPE"))
        if found.fs_type is None and found.partition_table is None:
            found = Signature(values.get("USAGE", "unknown"), None)
        return found

    def ensure_filesystem(self, device: str, fs_type: str) -> bool:
        """mkfs `fs_type` on `device` if it is blank; returns True when it formatted.

        A device already holding `fs_type` is left alone (restage, restart, a volume restored from a
        snapshot); anything else is an error, because formatting it would destroy someone's data.
        """
        signature = self.probe(device)
        if signature is None:
            self.runner.run(self._mkfs_argv(fs_type, device), timeout=MKFS_TIMEOUT)
            return True
        if signature.partition_table:
            raise FilesystemError(
                f"{device} holds a {signature.partition_table} partition table; refusing to format or mount it"
            )
        if signature.fs_type != fs_type:
            raise FilesystemError(
                f"{device} already holds {signature.fs_type} but {fs_type} was requested; not formatting it"
            )
        return False

    @staticmethod
    def _mkfs_argv(fs_type: str, device: str) -> list[str]:
        # No discard pass: the LUN is a fresh thin LV, and discarding 10 GiB over iSCSI only costs time.
        # No -f/-F: if blkid and mkfs disagree about "blank", mkfs refusing is the safe outcome.
        if fs_type == "xfs":
            return ["mkfs.xfs", "-K", "-q", "--", device]
        return ["mkfs.ext4", "-E", "nodiscard", "-q", "--", device]

    def mount(self, device: str, target: str, fs_type: str, flags: Sequence[str], readonly: bool) -> None:
        """Mount without fsck: ext4 replays its journal and xfs its log on mount; an fsck of a volume that
        another node may have open (RWX block misuse) would do damage, and a full check can take hours."""
        options = [f for f in flags if f not in ("ro", "rw")]
        options.append("ro" if readonly else "rw")
        if fs_type == "xfs" and "nouuid" not in options:
            # A clone or restored snapshot carries its source's XFS UUID; without nouuid the second mount
            # on the same node fails with "Filesystem has duplicate UUID".
            options.append("nouuid")
        self.mounter.mount(device, target, fs_type, options)

    def grow(self, fs_type: str, device: str, mount_path: str) -> None:
        """Grow a mounted filesystem to fill its (already rescanned) device."""
        if fs_type == "xfs":
            argv = ["xfs_growfs", "--", mount_path]  # xfs grows through the mount point
        elif fs_type == "ext4":
            argv = ["resize2fs", "--", device]  # online resize of a mounted ext4 works on the device
        else:
            raise FilesystemError(f"cannot grow a {fs_type} filesystem")
        try:
            self.runner.run(argv, timeout=GROW_TIMEOUT)
        except CommandFailed as err:
            raise FilesystemError(f"growing {fs_type} on {device} failed: {err}") from err

    def filesystem_size(self, fs_type: str, device: str, mount_path: str) -> int:
        """Bytes the filesystem on `device` (mounted at `mount_path`) spans, from its own superblock."""
        if fs_type == "xfs":
            out = self.runner.run(["xfs_info", "--", mount_path], timeout=60).stdout
            match = _XFS_DATA_RE.search(out)
            if match is None:
                raise FilesystemError(f"cannot read the size of the xfs filesystem at {mount_path!r} from xfs_info")
            return int(match.group(1)) * int(match.group(2))
        out = self.runner.run(["dumpe2fs", "-h", "--", device], timeout=60).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        try:
            return int(fields["Block count"]) * int(fields["Block size"])
        except (KeyError, ValueError):
            raise FilesystemError(f"cannot read the size of the ext4 filesystem on {device} from dumpe2fs") from None

    def grow_to_device(self, fs_type: str, device: str, mount_path: str) -> bool:
        """Grow a mounted filesystem that is smaller than its device; True when it grew.

        A clone or restored snapshot larger than its source gets no NodeExpandVolume from Kubernetes (the PVC
        was never resized), so staging is the moment to notice that its filesystem still has the source's size.
        """
        device_bytes = self.block_size(device)
        fs_bytes = self.filesystem_size(fs_type, device, mount_path)
        if device_bytes - fs_bytes <= GROW_THRESHOLD_BYTES:
            return False
        log.info(
            "filesystem smaller than its device, growing",
            extra={"device": device, "fs_bytes": fs_bytes, "device_bytes": device_bytes},
        )
        self.grow(fs_type, device, mount_path)
        return True

    def block_size(self, device: str) -> int:
        result = self.runner.run(["blockdev", "--getsize64", device], timeout=30)
        return int(result.stdout.strip())

    def flush(self, device: str) -> None:
        self.runner.run(["blockdev", "--flushbufs", device], timeout=120)


def usage(path: str) -> Usage:
    """Bytes and inodes of the filesystem at `path`; OSError (EIO, ESTALE, ENOENT) propagates."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    available = st.f_bavail * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return Usage(total, available, used, st.f_files, st.f_ffree, st.f_files - st.f_ffree)
