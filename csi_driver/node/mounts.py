"""What is mounted where (from /proc/self/mountinfo) and mount/umount as argv lists with deadlines.

mountinfo is the kernel's own view: unlike `findmnt` it costs no process, and unlike /proc/mounts it names the
device (major:minor) and the root inside the source, which tells a bind mount of a device node from its
filesystem.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .commands import Runner
from .errors import CommandFailed, CommandTimeout, PathBusy, UnmountFailed

log = logging.getLogger("berth.node.mounts")

MOUNTINFO = "/proc/self/mountinfo"
MOUNT_TIMEOUT = 120.0
UMOUNT_TIMEOUT = 30.0
# `umount -l` only detaches from the tree; it never waits for a server, so a short deadline suffices.
LAZY_UMOUNT_TIMEOUT = 10.0

_ESCAPE_RE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040, \\011, \\012, \\134)."""
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    major_minor: str
    root: str  # the path inside the source filesystem; for a bind mount of /dev/sdb, "/sdb"
    mount_point: str
    options: tuple[str, ...]  # per-mount options (ro/rw, nosuid...)
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse mountinfo(5) lines; optional fields end at the "-" separator.

    Lines end at "\n" only: the kernel escapes space, tab, newline and backslash in paths but writes every
    other byte as it is, so a mount point may hold "\r", "\v", "\x1c" or U+2028, all of which
    str.splitlines() would treat as line ends."""
    entries = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        fields = line.split(" ")
        sep = fields.index("-", 6)
        source = fields[sep + 2] if len(fields) > sep + 2 else ""
        super_opts = fields[sep + 3] if len(fields) > sep + 3 else ""
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                major_minor=fields[2],
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fs_type=fields[sep + 1],
                source=unescape(source),
                super_options=tuple(super_opts.split(",")) if super_opts else (),
            )
        )
    return entries


class MountTable:
    """Reads mountinfo afresh on every question: mounts change under us (kubelet, other RPCs)."""

    def __init__(self, path: str = MOUNTINFO) -> None:
        self.path = path

    def entries(self) -> list[MountEntry]:
        # newline="": text mode would otherwise turn a "\r" inside a mount point into a line end.
        with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            return parse_mountinfo(f.read())

    def at(self, path: str) -> MountEntry | None:
        """The top-most mount at `path` (the one a process sees), or None."""
        target = os.path.normpath(path)
        found = None
        for entry in self.entries():
            if entry.mount_point == target:
                found = entry  # later lines are mounted on top of earlier ones
        return found

    def is_mountpoint(self, path: str) -> bool:
        return self.at(path) is not None

    def users_of_device(self, device: str) -> list[str]:
        """Mount points using a block device: its filesystem, or its node bound onto a file (raw block
        publish shows up as devtmpfs with root "/<kernel name>")."""
        number = device_number(device)
        node_root = "/" + os.path.basename(os.path.realpath(device))
        return [
            e.mount_point
            for e in self.entries()
            if e.major_minor == number or (e.fs_type == "devtmpfs" and e.root == node_root)
        ]


def device_number(path: str) -> str:
    """`major:minor` of a block device node, as mountinfo names it."""
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


class Mounter:
    def __init__(self, runner: Runner, table: MountTable | None = None) -> None:
        self.runner = runner
        self.table = table or MountTable()

    def mount(self, source: str, target: str, fs_type: str | None, options: Sequence[str] = ()) -> None:
        argv = ["mount"]
        if fs_type:
            argv += ["-t", fs_type]
        if options:
            argv += ["-o", ",".join(options)]
        # "--" so a source or target starting with "-" is never read as an option.
        self.runner.run([*argv, "--", source, target], timeout=MOUNT_TIMEOUT)

    def bind(self, source: str, target: str, readonly: bool = False, options: Sequence[str] = ()) -> None:
        """Bind `source` onto `target`. A read-only bind needs a remount: the first bind ignores "ro"
        on older util-linux, and the explicit remount is what the kernel honours everywhere."""
        self.runner.run(["mount", "--bind", "--", source, target], timeout=MOUNT_TIMEOUT)
        extra = [o for o in options if o not in ("bind", "ro", "rw")]
        if readonly or extra:
            opts = ",".join(["remount", "bind", "ro" if readonly else "rw", *extra])
            try:
                self.runner.run(["mount", "-o", opts, "--", target], timeout=MOUNT_TIMEOUT)
            except (CommandFailed, CommandTimeout):
                # Never leave a writable bind behind when read-only was asked for.
                self.unmount(target)
                raise

    def unmount(self, target: str, timeout: float = UMOUNT_TIMEOUT) -> None:
        """Unmount `target` if mounted, bounded in time even for a dead NFS server.

        Order: plain umount; on timeout `umount -f` (aborts pending NFS RPCs); if that also hangs or fails,
        `umount -l` (detach now, clean up when no longer busy). The plugin never blocks past the deadlines.
        """
        if not self.table.is_mountpoint(target):
            return
        try:
            self.runner.run(["umount", "--", target], timeout=timeout)
            return
        except CommandTimeout:
            log.warning("umount timed out, forcing", extra={"target": target})
        except CommandFailed as err:
            if not self.table.is_mountpoint(target):
                return  # someone else unmounted it meanwhile
            if "busy" in err.stderr:
                raise PathBusy(
                    f"cannot unmount {target!r}: it is busy (a process still has files open or its working "
                    f"directory there, or something is mounted below it): {err}"
                ) from err
            raise UnmountFailed(f"cannot unmount {target!r}: {err}") from err
        try:
            self.runner.run(["umount", "-f", "--", target], timeout=timeout)
            return
        except (CommandTimeout, CommandFailed) as err:
            log.warning("umount -f failed, detaching lazily", extra={"target": target, "error": str(err)})
        self.runner.run(["umount", "-l", "--", target], timeout=LAZY_UMOUNT_TIMEOUT)

    def unmount_all(self, target: str, limit: int = 8) -> None:
        """Unmount every mount stacked at `target` (a retried publish may have mounted twice)."""
        for _ in range(limit):
            if not self.table.is_mountpoint(target):
                return
            self.unmount(target)
        raise UnmountFailed(f"{target!r} is still mounted after {limit} unmounts")

    def lazy_unmount(self, target: str) -> None:
        if self.table.is_mountpoint(target):
            self.runner.run(["umount", "-l", "--", target], timeout=LAZY_UMOUNT_TIMEOUT)
