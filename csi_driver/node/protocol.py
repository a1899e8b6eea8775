"""The seam between protocol-neutral node logic (volumes.py) and iSCSI/NFS: one small interface.

volume_context `protocol` picks the implementation once; everything after that (unstage, stats, expand)
goes through the stage record's `protocol`, so a restarted plugin makes the same choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .rollback import Rollback
from .stage_record import StageRecord

BLOCK = "block"
MOUNT = "mount"


@dataclass(frozen=True)
class StageRequest:
    volume_id: str
    staging_path: str
    access_type: str  # BLOCK | MOUNT
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()
    readonly: bool = False
    access_mode: int = 0
    volume_context: Mapping[str, str] = field(default_factory=dict)
    publish_context: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict)


SaveRecord = Callable[[StageRecord], None]


class VolumeProtocol(Protocol):
    name: str

    def new_record(self, request: StageRequest) -> StageRecord:
        """Validate the contexts and describe the staging, without touching the system.
        Raises InvalidVolume (an access type, access mode, fs_type or context the protocol cannot use)."""
        ...

    def stage(self, record: StageRecord, request: StageRequest, save: SaveRecord, undo: Rollback) -> None:
        """Attach and mount at record.staging_path; call `save` as soon as there is something to undo, and
        push the inverse of every step that changed the node onto `undo` right after it succeeded.
        Raises InvalidVolume (iscsi: bad publish_context), AttachFailed, LoginRefused, WwnMismatch (iscsi: connector
        set-up, login or device discovery), DetachFailed (iscsi: dropping a wrong attach failed), MountConflict (nfs:
        another mount at the staging path; a non-directory there), PathUnusable (cannot create it), UnmountFailed,
        PathBusy (iscsi: a stale mount there), FilesystemError (iscsi: foreign data, unreadable device, failed grow),
        CommandFailed, CommandTimeout (mount, mkfs, iscsiadm, blockdev)."""
        ...

    def is_staged(self, record: StageRecord) -> bool:
        """True when the staging is complete and healthy (idempotent NodeStage returns at once).
        Raises nothing of its own."""
        ...

    def unstage(self, record: StageRecord) -> None:
        """Undo stage; must work from the record alone, after a restart, with the device gone.
        Raises StillInUse (iscsi: a publish target still uses the device), UnmountFailed, PathBusy (the staging
        mount), DetachFailed (iscsi: connector set-up, logout, device removal or map flush),
        CommandFailed, CommandTimeout."""
        ...

    def block_device(self, record: StageRecord) -> str | None:
        """The device node to bind for raw block publish (None for file protocols).
        Raises DeviceNotFound (iscsi: no device, or no multipath map within the wait)."""
        ...

    def member_paths(self, record: StageRecord) -> set[str]:
        """Kernel names of single paths that a bind of the volume must never use instead of block_device.
        Raises nothing of its own."""
        ...

    def expand(self, record: StageRecord) -> int:
        """Make the node see the new size (and grow the filesystem); returns the size in bytes or 0.
        Raises (iscsi only; nfs does nothing) AttachFailed (connector set-up, or the rescan kept failing),
        DeviceNotFound, FilesystemError (the grow failed), CommandFailed, CommandTimeout (blockdev, a grow that timed
        out)."""
        ...

    def condition(self, record: StageRecord) -> str | None:
        """None when healthy, else a sentence for VolumeCondition.message.
        Raises nothing of its own (a problem is the returned sentence)."""
        ...
