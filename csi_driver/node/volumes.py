"""Layer 3's front door: stage, unstage, publish, unpublish, stats and expand, protocol-neutral.

The CSI service calls only this. Protocol work goes through VolumeProtocol (iscsi.py, nfs.py); what must
survive a restart goes into the stage record before the step that needs undoing.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import (
    DeviceNotFound,
    InvalidVolume,
    MountConflict,
    NodeError,
    NotStaged,
    VolumeNotFound,
    WrongAccess,
)
from .filesystems import Filesystems, Usage, usage
from .locks import VolumeLocks
from .mounts import MountEntry, Mounter
from .nfs import bounded
from .protocol import BLOCK, MOUNT, StageRequest, VolumeProtocol
from .stage_record import RecordStore, StageRecord

log = logging.getLogger("berth.node.volumes")

# csi VolumeCapability.AccessMode.SINGLE_NODE_SINGLE_WRITER: one target path at a time on this node.
SINGLE_NODE_SINGLE_WRITER = 6


@dataclass(frozen=True)
class PublishRequest:
    volume_id: str
    staging_path: str
    target_path: str
    access_type: str
    readonly: bool = False
    access_mode: int = 0
    mount_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class VolumeStats:
    usage: Usage | None  # None when it cannot be measured (device gone, I/O error)
    abnormal: bool
    message: str
    block: bool


class NodeVolumes:
    def __init__(
        self,
        state_dir: str,
        protocols: Mapping[str, VolumeProtocol],
        mounter: Mounter,
        filesystems: Filesystems,
        statfs: Callable[[str], Usage] = usage,
    ) -> None:
        self.records = RecordStore(state_dir)
        self.protocols = dict(protocols)
        self.mounter = mounter
        self.fs = filesystems
        self.statfs = statfs
        self.locks = VolumeLocks()

    def _protocol(self, name: str) -> VolumeProtocol:
        try:
            return self.protocols[name]
        except KeyError:
            known = ", ".join(sorted(self.protocols)) or "none"
            raise InvalidVolume(f"volume protocol {name!r} is not served by this node (served: {known})") from None

    @contextmanager
    def _locked(self, volume_id: str, operation: str) -> Iterator[None]:
        with self.locks.hold(volume_id, operation):
            yield

    # --- stage ---

    def stage(self, request: StageRequest) -> None:
        protocol = self._protocol(request.volume_context.get("protocol", ""))
        with self._locked(request.volume_id, "NodeStageVolume"):
            wanted = protocol.new_record(request)
            existing = self.records.load(request.volume_id)
            if existing is not None:
                _check_same_staging(existing, wanted)
                if protocol.is_staged(existing):
                    return  # idempotent repeat
                wanted.targets = existing.targets
            protocol.stage(wanted, request, self.records.save)
            self.records.save(wanted)

    def unstage(self, volume_id: str, staging_path: str) -> None:
        with self._locked(volume_id, "NodeUnstageVolume"):
            record = self.records.load(volume_id)
            if record is None:
                # Nothing recorded: never staged here, or already unstaged. Clean a leftover mount only.
                self.mounter.unmount(staging_path)
                return
            if os.path.normpath(record.staging_path) != os.path.normpath(staging_path):
                raise VolumeNotFound(f"volume {volume_id} is staged at {record.staging_path}, not at {staging_path}")
            self._protocol(record.protocol).unstage(record)
            # Only now: a failed unstage keeps the record, so the retry still knows what to log out of.
            self.records.delete(volume_id)

    # --- publish ---

    def publish(self, request: PublishRequest) -> None:
        with self._locked(request.volume_id, "NodePublishVolume"):
            record = self.records.load(request.volume_id)
            if record is None:
                raise NotStaged(f"volume {request.volume_id} is not staged on this node; call NodeStageVolume first")
            if os.path.normpath(record.staging_path) != os.path.normpath(request.staging_path):
                raise NotStaged(
                    f"volume {request.volume_id} is staged at {record.staging_path}, not at {request.staging_path}"
                )
            if record.access_type != request.access_type:
                raise WrongAccess(
                    f"volume {request.volume_id} is staged for {record.access_type} access, "
                    f"publish asks for {request.access_type}"
                )
            target = os.path.normpath(request.target_path)
            protocol = self._protocol(record.protocol)
            source, match = self._publish_source(record, protocol)
            current = self.mounter.table.at(target)
            if current is not None:
                if not match(current):
                    raise MountConflict(f"target {target} already has {current.source} mounted, not this volume")
                if current.readonly != request.readonly:
                    raise MountConflict(
                        f"target {target} is already published {'read-only' if current.readonly else 'read-write'}"
                    )
                self._remember_target(record, target, request.readonly)
                return
            if request.access_mode == SINGLE_NODE_SINGLE_WRITER:
                others = [t for t in record.targets if t != target and self.mounter.table.is_mountpoint(t)]
                if others:
                    raise WrongAccess(
                        f"volume {request.volume_id} is SINGLE_NODE_SINGLE_WRITER and already published at {others[0]}"
                    )
            _create_target(target, block=record.access_type == BLOCK)
            options = request.mount_flags if record.access_type == MOUNT else ()
            self.mounter.bind(source, target, readonly=request.readonly, options=options)
            self._remember_target(record, target, request.readonly)

    def _publish_source(
        self, record: StageRecord, protocol: VolumeProtocol
    ) -> tuple[str, Callable[[MountEntry], bool]]:
        """What to bind, and how to recognise an existing bind of it in mountinfo."""
        if record.access_type == BLOCK:
            device = protocol.block_device(record)
            if device is None:
                raise DeviceNotFound(f"volume {record.volume_id} has no block device")
            node_root = "/" + os.path.basename(device)
            return device, lambda e: e.fs_type == "devtmpfs" and e.root == node_root
        staging = self.mounter.table.at(record.staging_path)
        if staging is None:
            raise NotStaged(
                f"volume {record.volume_id} is recorded as staged at {record.staging_path} but nothing is mounted "
                "there (node restarted?); NodeStageVolume must run again"
            )
        return record.staging_path, lambda e: e.major_minor == staging.major_minor and e.root == staging.root

    def _remember_target(self, record: StageRecord, target: str, readonly: bool) -> None:
        if record.targets.get(target) != readonly:
            record.targets[target] = readonly
            self.records.save(record)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        target = os.path.normpath(target_path)
        with self._locked(volume_id, "NodeUnpublishVolume"):
            self.mounter.unmount_all(target)
            _remove_target(target)
            record = self.records.load(volume_id)
            if record is not None and target in record.targets:
                del record.targets[target]
                self.records.save(record)

    # --- stats and expand ---

    def _record_for_path(self, volume_id: str, path: str) -> StageRecord:
        record = self.records.load(volume_id)
        if record is None:
            raise VolumeNotFound(f"volume {volume_id} is not staged or published on this node")
        path = os.path.normpath(path)
        if path != os.path.normpath(record.staging_path) and path not in record.targets:
            raise VolumeNotFound(f"volume {volume_id} is not staged or published at {path}")
        if path in record.targets and not self.mounter.table.is_mountpoint(path):
            raise VolumeNotFound(f"volume {volume_id} is no longer published at {path}")
        return record

    def stats(self, volume_id: str, path: str) -> VolumeStats:
        record = self._record_for_path(volume_id, path)
        protocol = self._protocol(record.protocol)
        problem = protocol.condition(record)
        if record.access_type == BLOCK:
            try:
                device = protocol.block_device(record)
                size = self.fs.block_size(device) if device else 0
            except NodeError as err:
                return VolumeStats(None, True, problem or str(err), block=True)
            return VolumeStats(Usage(size, 0, 0, 0, 0, 0), problem is not None, problem or "", block=True)
        try:
            measured = bounded(lambda: self.statfs(os.path.normpath(path)))
        except OSError as err:
            reason = "I/O error" if err.errno == errno.EIO else (err.strerror or str(err))
            return VolumeStats(None, True, problem or f"cannot read {path}: {reason}", block=False)
        return VolumeStats(measured, problem is not None, problem or "", block=False)

    def expand(self, volume_id: str, path: str) -> int:
        with self._locked(volume_id, "NodeExpandVolume"):
            record = self._record_for_path(volume_id, path)
            return self._protocol(record.protocol).expand(record)


def _check_same_staging(existing: StageRecord, wanted: StageRecord) -> None:
    if os.path.normpath(existing.staging_path) != os.path.normpath(wanted.staging_path):
        raise MountConflict(f"volume {existing.volume_id} is already staged at {existing.staging_path}")
    for field in ("protocol", "access_type", "fs_type", "readonly"):
        if getattr(existing, field) != getattr(wanted, field):
            raise MountConflict(
                f"volume {existing.volume_id} is already staged with {field}={getattr(existing, field)!r}, "
                f"not {getattr(wanted, field)!r}"
            )


def _create_target(target: str, block: bool) -> None:
    """Block: the device node is bound onto a file; mount: onto a directory. The CO made the parent."""
    if block:
        if os.path.isdir(target):
            raise MountConflict(f"target {target} is a directory; raw block needs a file")
        fd = os.open(target, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    else:
        os.makedirs(target, exist_ok=True)


def _remove_target(target: str) -> None:
    """Remove what publish created (CSI: the SP deletes target_path); leave anything non-empty alone."""
    try:
        if os.path.isdir(target):
            os.rmdir(target)
        else:
            os.unlink(target)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise MountConflict(f"cannot remove target {target}: {err.strerror}") from err
