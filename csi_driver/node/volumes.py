"""Layer 3's front door: stage, unstage, publish, unpublish, stats and expand, protocol-neutral.

The CSI service calls only this, one call per volume at a time (its per-RPC lock). Protocol work goes through
VolumeProtocol (iscsi.py, nfs.py); what must survive a restart goes into the stage record before the step that
needs undoing.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from .errors import (
    DeviceNotFound,
    InvalidPath,
    InvalidVolume,
    MountConflict,
    NodeError,
    NotStaged,
    RecordUnreadable,
    VolumeNotFound,
    WrongAccess,
)
from .filesystems import Filesystems, Usage, usage
from .mounts import MountEntry, Mounter
from .nfs import bounded
from .paths import canonical_path, checked_path, make_directory, make_file, remove_created
from .protocol import BLOCK, StageRequest, VolumeProtocol
from .rollback import Rollback
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

    def _protocol(self, name: str) -> VolumeProtocol:
        try:
            return self.protocols[name]
        except KeyError:
            known = ", ".join(sorted(self.protocols)) or "none"
            raise InvalidVolume(f"volume protocol {name!r} is not served by this node (served: {known})") from None

    # --- stage ---

    def stage(self, request: StageRequest) -> None:
        request = replace(request, staging_path=checked_path(request.staging_path, "staging_target_path"))
        protocol = self._protocol(request.volume_context.get("protocol", ""))
        wanted = protocol.new_record(request)
        try:
            existing = self.records.load(request.volume_id)
        except RecordUnreadable as err:
            # A new stage of the same volume attaches the same LUN or export, and its record replaces what is lost.
            log.warning(
                "setting aside an unreadable stage record", extra={"volume": request.volume_id, "error": str(err)}
            )
            self.records.set_aside(request.volume_id)
            existing = None
        in_use = existing is not None and self._published(existing)
        if existing is not None:
            if protocol.is_staged(existing):
                _check_same_staging(existing, wanted)
                return  # idempotent repeat
            if in_use:  # lost its staging mount or device while a target still holds it: redo on top
                _check_same_staging(existing, wanted)
            elif _differs(existing, wanted):
                # The remains of a stage that crashed or failed before its undo existed: they would make
                # every later stage ALREADY_EXISTS, and nothing uses them.
                log.warning("removing the remains of an earlier stage", extra={"volume": existing.volume_id})
                self._protocol(existing.protocol).unstage(existing)
                self.records.delete(existing.volume_id)
            wanted.targets, wanted.created = existing.targets, existing.created
        with Rollback("NodeStageVolume", cleaned_by="NodeUnstageVolume") as undo:
            if not in_use:  # the oldest step: forgotten only when everything else was undone
                undo.push("remove the stage record", lambda: self.records.delete(request.volume_id))
            protocol.stage(wanted, request, self.records.save, undo)
            self.records.save(wanted)

    def _published(self, record: StageRecord) -> bool:
        return any(self.mounter.table.is_mountpoint(target) for target in record.targets)

    def unstage(self, volume_id: str, staging_path: str) -> None:
        staging = checked_path(staging_path, "staging_target_path")
        record = self.records.load(volume_id)
        if record is None:
            # Nothing recorded: never staged here, or already unstaged. Clean a leftover mount only.
            self.mounter.unmount(staging)
            return
        if os.path.normpath(record.staging_path) != staging:
            raise VolumeNotFound(f"volume {volume_id} is staged at {record.staging_path!r}, not at {staging!r}")
        self._protocol(record.protocol).unstage(record)
        # Only now: a failed unstage keeps the record, so the retry still knows what to log out of.
        self.records.delete(volume_id)

    # --- publish ---

    def publish(self, request: PublishRequest) -> None:
        staging = checked_path(request.staging_path, "staging_target_path")
        target = checked_path(request.target_path, "target_path")
        record = self.records.load(request.volume_id)
        if record is None:
            raise NotStaged(f"volume {request.volume_id} is not staged on this node; call NodeStageVolume first")
        if os.path.normpath(record.staging_path) != staging:
            raise NotStaged(f"volume {request.volume_id} is staged at {record.staging_path!r}, not at {staging!r}")
        if record.access_type != request.access_type:
            raise WrongAccess(
                f"volume {request.volume_id} is staged for {record.access_type} access, "
                f"publish asks for {request.access_type}"
            )
        protocol = self._protocol(record.protocol)
        readonly = request.readonly or record.readonly  # a read-only staging is never published writable
        source, match = self._publish_source(record, protocol)
        current = self.mounter.table.at(target)
        if current is not None:
            if match(current):
                if current.readonly != readonly:
                    raise MountConflict(
                        f"target {target!r} is already published {'read-only' if current.readonly else 'read-write'}"
                    )
                self._remember_target(record, target, readonly)
                return
            if not _binds_a_single_path(current, protocol.member_paths(record)):
                raise MountConflict(f"target {target!r} already has {current.source} mounted, not this volume")
            # An earlier publish raced multipathd and bound one path of the LUN: bind the map instead.
            log.warning(
                "target binds a single path, replacing it with the multipath map",
                extra={"target": target, "path": current.root, "device": source},
            )
            self.mounter.unmount(target)
        if request.access_mode == SINGLE_NODE_SINGLE_WRITER:
            others = [t for t in record.targets if t != target and self.mounter.table.is_mountpoint(t)]
            if others:
                raise WrongAccess(
                    f"volume {request.volume_id} is SINGLE_NODE_SINGLE_WRITER and already published at {others[0]}"
                )
        self._bind(record, source, target, readonly, request.mount_flags)

    def _bind(self, record: StageRecord, source: str, target: str, readonly: bool, flags: tuple[str, ...]) -> None:
        block = record.access_type == BLOCK
        with Rollback("NodePublishVolume", cleaned_by="NodeUnpublishVolume") as undo:
            if make_file(target) if block else make_directory(target):
                record.created.append(target)  # saved before the bind: a crash still knows the file is ours
                self.records.save(record)
                undo.push(f"remove {target!r}", lambda: self._remove_created(record, target))
            self.mounter.bind(source, target, readonly=readonly, options=() if block else flags)
            undo.push(f"unmount {target!r}", lambda: self.mounter.unmount(target))
            self._remember_target(record, target, readonly)

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
        target = checked_path(target_path, "target_path")
        self.mounter.unmount_all(target)
        try:
            record = self.records.load(volume_id)
        except RecordUnreadable as err:  # the target is unmounted; NodeUnstage reports the record
            log.warning("unpublished with an unreadable stage record", extra={"volume": volume_id, "error": str(err)})
            return
        if record is None:
            return  # nothing says Berth created the target, so it stays (CSI: the SP removes only its own)
        if target in record.created:
            self._remove_created(record, target)
        if record.targets.pop(target, None) is not None:
            self.records.save(record)

    def _remove_created(self, record: StageRecord, target: str) -> None:
        remove_created(target)
        record.created.remove(target)
        self.records.save(record)

    # --- stats and expand ---

    def _record_for_path(self, volume_id: str, path: str) -> tuple[StageRecord, str]:
        """The record of a volume staged or published at `path`, and the path in canonical form."""
        try:
            # csi-sanity asks for stats at "some/path" and expects NOT_FOUND: a path that cannot name a staging
            # or target path names no volume.
            path = canonical_path(path, "volume_path")
        except InvalidPath as err:
            raise VolumeNotFound(f"volume {volume_id} is not staged or published at {path!r}: {err}") from err
        record = self.records.load(volume_id)
        if record is None:
            raise VolumeNotFound(f"volume {volume_id} is not staged or published on this node")
        if path != os.path.normpath(record.staging_path) and path not in record.targets:
            raise VolumeNotFound(f"volume {volume_id} is not staged or published at {path!r}")
        if path in record.targets and not self.mounter.table.is_mountpoint(path):
            raise VolumeNotFound(f"volume {volume_id} is no longer published at {path!r}")
        return record, path

    def stats(self, volume_id: str, path: str) -> VolumeStats:
        record, path = self._record_for_path(volume_id, path)
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
            measured = bounded(lambda: self.statfs(path))
        except OSError as err:
            reason = "I/O error" if err.errno == errno.EIO else (err.strerror or str(err))
            return VolumeStats(None, True, problem or f"cannot read {path!r}: {reason}", block=False)
        return VolumeStats(measured, problem is not None, problem or "", block=False)

    def expand(self, volume_id: str, path: str) -> int:
        record, _ = self._record_for_path(volume_id, path)
        return self._protocol(record.protocol).expand(record)


def _check_same_staging(existing: StageRecord, wanted: StageRecord) -> None:
    if os.path.normpath(existing.staging_path) != os.path.normpath(wanted.staging_path):
        raise MountConflict(f"volume {existing.volume_id} is already staged at {existing.staging_path}")
    for field in ("protocol", "access_type", "fs_type", "readonly", "wwn", "nfs_source"):
        if field in ("wwn", "nfs_source") and not getattr(wanted, field):
            continue  # what the LUN or export is: compared when the request names it
        if getattr(existing, field) != getattr(wanted, field):
            raise MountConflict(
                f"volume {existing.volume_id} is already staged with {field}={getattr(existing, field)!r}, "
                f"not {getattr(wanted, field)!r}"
            )


def _differs(existing: StageRecord, wanted: StageRecord) -> bool:
    try:
        _check_same_staging(existing, wanted)
    except MountConflict:
        return True
    return False


def _binds_a_single_path(entry: MountEntry, single_paths: set[str]) -> bool:
    """A raw block bind of one path behind the volume's multipath map (devtmpfs root "/sdX")."""
    return entry.fs_type == "devtmpfs" and entry.root.lstrip("/") in single_paths
