"""NFS volumes on the node: mount the export at the staging path; publish binds from there.

A server restart can leave the mount returning ESTALE for every call (csi-driver-nfs#927); staging checks
for that and replaces the mount (lazy unmount, then mount again). stat() on a hard mount of a dead server
blocks, so health checks run in a helper thread with a deadline.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from csi_driver.faults import fault_point

from .errors import InvalidVolume, MountConflict
from .filesystems import Usage, usage
from .mounts import Mounter
from .paths import make_directory
from .protocol import MOUNT, SaveRecord, StageRequest
from .rollback import Rollback
from .stage_record import StageRecord

log = logging.getLogger("berth.node.nfs")

DEFAULT_VERSION = "4.2"
HEALTH_TIMEOUT = 5.0
NFS_TYPES = ("nfs", "nfs4")
T = TypeVar("T")


class ServerNotResponding(OSError):
    pass


def bounded(fn: Callable[[], T], timeout: float = HEALTH_TIMEOUT) -> T:
    """Run fn in a daemon thread; raise ServerNotResponding if it does not return in time. The stuck
    thread is abandoned (it wakes up when the server does), never the gRPC worker."""
    box: dict[str, object] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller below
            box["error"] = err

    thread = threading.Thread(target=call, daemon=True, name="nfs-health")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ServerNotResponding(errno.ETIMEDOUT, f"no answer within {timeout:g} s (NFS server not responding?)")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def nfs_source(server: str, export: str) -> str:
    try:
        if ipaddress.ip_address(server).version == 6:
            server = f"[{server}]"
    except ValueError:
        pass  # a host name
    return f"{server}:{export}"


def mount_options(mount_flags: Sequence[str], readonly: bool) -> list[str]:
    """Capability mount_flags (StorageClass mountOptions) win; vers=4.2 unless they name a version."""
    options = [f for f in mount_flags if f not in ("ro", "rw")]
    if not any(o.split("=")[0] in ("vers", "nfsvers") for o in options):
        options.insert(0, f"vers={DEFAULT_VERSION}")
    options.append("ro" if readonly else "rw")
    return options


class NfsVolumes:
    name = "nfs"

    def __init__(self, mounter: Mounter) -> None:
        self.mounter = mounter

    def new_record(self, request: StageRequest) -> StageRecord:
        if request.access_type != MOUNT:
            raise InvalidVolume("an NFS volume can only be used with a mount access type, not block")
        server = request.volume_context.get("nfsServer", "")
        export = request.volume_context.get("nfsExport", "")
        if not server or not export.startswith("/"):
            raise InvalidVolume("volume_context needs nfsServer and an absolute nfsExport for an NFS volume")
        extra = [o for o in request.volume_context.get("nfsMountOptions", "").split(",") if o]
        return StageRecord(
            volume_id=request.volume_id,
            protocol=self.name,
            staging_path=request.staging_path,
            access_type=MOUNT,
            fs_type="nfs",
            mount_flags=[*extra, *request.mount_flags],
            readonly=request.readonly,
            access_mode=request.access_mode,
            nfs_source=nfs_source(server, export),
        )

    def stage(self, record: StageRecord, request: StageRequest, save: SaveRecord, undo: Rollback) -> None:
        current = self.mounter.table.at(record.staging_path)
        if current is not None:
            if current.fs_type not in NFS_TYPES or current.source != record.nfs_source:
                raise MountConflict(
                    f"staging path {record.staging_path} already has {current.source} ({current.fs_type}) mounted"
                )
            if self._stale(record.staging_path):
                log.warning("stale NFS handle, remounting", extra={"path": record.staging_path})
                self.mounter.lazy_unmount(record.staging_path)
            else:
                save(record)
                return
        save(record)
        if make_directory(record.staging_path):  # the CO should have; only if it did not is it ours to remove
            undo.push(f"remove {record.staging_path!r}", lambda: os.rmdir(record.staging_path))
        self.mounter.mount(
            record.nfs_source, record.staging_path, "nfs", mount_options(record.mount_flags, record.readonly)
        )
        undo.push(f"unmount {record.staging_path!r}", lambda: self.mounter.unmount(record.staging_path))
        fault_point("node-stage.mounted")

    def is_staged(self, record: StageRecord) -> bool:
        current = self.mounter.table.at(record.staging_path)
        if current is None or current.source != record.nfs_source:
            return False
        return not self._stale(record.staging_path)

    def _stale(self, path: str) -> bool:
        try:
            bounded(lambda: os.stat(path))
        except OSError as err:
            return err.errno == errno.ESTALE
        return False

    def unstage(self, record: StageRecord) -> None:
        # Bounded: umount, then -f, then -l; a dead server never blocks NodeUnstage for long.
        self.mounter.unmount(record.staging_path)

    def block_device(self, record: StageRecord) -> str | None:
        return None

    def member_paths(self, record: StageRecord) -> set[str]:
        return set()

    def expand(self, record: StageRecord) -> int:
        return 0  # the export grows on the server; nothing to do here

    def condition(self, record: StageRecord) -> str | None:
        try:
            bounded(lambda: os.statvfs(record.staging_path))
        except OSError as err:
            return f"NFS mount {record.nfs_source} at {record.staging_path}: {err.strerror or err}"
        return None

    def usage(self, path: str) -> Usage:
        return bounded(lambda: usage(path))
