"""Fakes for node tests: a command runner that records argv and keeps an in-memory mount table, and an
os-brick connector that records calls. No root, no devices, no kernel needed."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from csi_driver.node.commands import Result
from csi_driver.node.errors import CommandFailed, CommandTimeout
from csi_driver.node.mounts import MountEntry, MountTable, device_number

Handler = Callable[[list[str]], Result | Exception | None]


class FakeTable(MountTable):
    def __init__(self) -> None:
        super().__init__(path="/nonexistent")
        self.mounts: list[MountEntry] = []
        self._next_id = 100

    def entries(self) -> list[MountEntry]:
        return list(self.mounts)

    def add(self, source: str, target: str, fs_type: str, major_minor: str, root: str = "/", ro: bool = False):
        self._next_id += 1
        entry = MountEntry(
            self._next_id, 1, major_minor, root, os.path.normpath(target), ("ro" if ro else "rw",), fs_type, source, ()
        )
        self.mounts.append(entry)
        return entry

    def remove_top(self, target: str) -> None:
        target = os.path.normpath(target)
        for i in range(len(self.mounts) - 1, -1, -1):
            if self.mounts[i].mount_point == target:
                del self.mounts[i]
                return


class FakeSystem:
    """Runner: records every argv; `handlers` may answer or raise; mount/umount update `table`."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.table = FakeTable()
        self.handlers: list[Handler] = []
        self.blank_devices: set[str] = set()
        self.fs_types: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.fs_sizes: dict[str, int] = {}  # device → bytes its filesystem spans (mkfs: the whole device)

    def commands(self, name: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == name]

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True) -> Result:
        args = list(argv)
        self.calls.append(args)
        for handler in self.handlers:
            answer = handler(args)
            if isinstance(answer, Exception):
                raise answer
            if answer is not None:
                return self._checked(args, answer, check)
        return self._checked(args, self._default(args), check)

    @staticmethod
    def _checked(args: list[str], result: Result, check: bool) -> Result:
        if check and result.rc != 0:
            raise CommandFailed(args, result.rc, result.stderr)
        return result

    def _default(self, args: list[str]) -> Result:
        name = args[0]
        if name == "blkid":
            device = args[-1]
            fs = self.fs_types.get(device)
            return Result(0, f"DEVNAME={device}\nTYPE={fs}\n", "") if fs else Result(2, "", "")
        if name.startswith("mkfs."):
            self.fs_types[args[-1]] = name.split(".", 1)[1]
            self.fs_sizes[args[-1]] = self.sizes.get(args[-1], 0)
            return Result(0, "", "")
        if name == "dumpe2fs":
            return Result(0, f"Block count:              {self.fs_sizes[args[-1]] // 4096}\nBlock size:  4096\n", "")
        if name == "xfs_info":
            device = self._device_at(args[-1])
            blocks = self.fs_sizes[device] // 4096
            return Result(0, f"meta-data=x isize=512\ndata     =        bsize=4096   blocks={blocks}, imaxpct=25\n", "")
        if name in ("resize2fs", "xfs_growfs"):
            mounted = self.table.at(args[-1])
            device = args[-1] if name == "resize2fs" else mounted.source if mounted else ""
            self.fs_sizes[device] = self.sizes.get(device, 0)
            return Result(0, "", "")
        if name == "blockdev" and args[1] == "--getsize64":
            return Result(0, f"{self.sizes.get(args[-1], 0)}\n", "")
        if name == "mount":
            return self._mount(args)
        if name == "umount":
            target = args[-1]
            if not self.table.is_mountpoint(target):
                return Result(32, "", f"umount: {target}: not mounted.")
            self.table.remove_top(target)
        return Result(0, "", "")

    def _device_at(self, mount_path: str) -> str:
        entry = self.table.at(mount_path)
        assert entry is not None, f"nothing mounted at {mount_path}"
        return entry.source

    def _mount(self, args: list[str]) -> Result:
        source, target = args[-2], args[-1]
        if "--bind" in args:
            staged = self.table.at(source)
            if staged is not None:
                self.table.add(staged.source, target, staged.fs_type, staged.major_minor, staged.root)
            else:  # a device node bound onto a file
                self.table.add("udev", target, "devtmpfs", "0:5", "/" + os.path.basename(source))
            return Result(0, "", "")
        if "-o" in args and args[args.index("-o") + 1].startswith("remount"):
            target = args[-1]
            top = self.table.at(target)
            assert top is not None
            self.table.remove_top(target)
            ro = "ro" in args[args.index("-o") + 1].split(",")
            self.table.add(top.source, target, top.fs_type, top.major_minor, top.root, ro=ro)
            return Result(0, "", "")
        fs_type = args[args.index("-t") + 1] if "-t" in args else "auto"
        options = args[args.index("-o") + 1].split(",") if "-o" in args else []
        number = device_number(source) if os.path.exists(source) else "0:77"
        self.table.add(source, target, fs_type, number, "/", ro="ro" in options)
        return Result(0, "", "")


def timeout_for(prefix: list[str]) -> Handler:
    def handler(args: list[str]) -> Exception | None:
        return CommandTimeout(args, 1.0) if args[: len(prefix)] == prefix else None

    return handler


class FakeConnector:
    """Records os-brick calls; `device` is what connect_volume reports."""

    def __init__(self, device: str = "", wwn: str = "", log: list | None = None) -> None:
        self.device = device
        self.wwn = wwn
        self.log: list[tuple] = log if log is not None else []
        self.connect_error: Exception | None = None
        self.disconnect_error: Exception | None = None
        self.extend_errors: list[Exception] = []  # raised one per extend_volume call, in order

    def connect_volume(self, connection_properties: dict) -> dict:
        self.log.append(("connect", connection_properties))
        if self.connect_error:
            raise self.connect_error
        return {"type": "block", "path": self.device, "scsi_wwn": self.wwn}

    def disconnect_volume(self, connection_properties, device_info, force=False, ignore_errors=False) -> None:
        self.log.append(("disconnect", connection_properties, device_info, force, ignore_errors))
        if self.disconnect_error:
            raise self.disconnect_error

    def extend_volume(self, connection_properties: dict) -> int:
        self.log.append(("extend", connection_properties))
        if self.extend_errors:
            raise self.extend_errors.pop(0)
        return 0
