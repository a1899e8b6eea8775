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
        """Validate the contexts and describe the staging, without touching the system."""
        ...

    def stage(self, record: StageRecord, request: StageRequest, save: SaveRecord, undo: Rollback) -> None:
        """Attach and mount at record.staging_path; call `save` as soon as there is something to undo, and
        push the inverse of every step that changed the node onto `undo` right after it succeeded."""
        ...

    def is_staged(self, record: StageRecord) -> bool:
        """True when the staging is complete and healthy (idempotent NodeStage returns at once)."""
        ...

    def unstage(self, record: StageRecord) -> None:
        """Undo stage; must work from the record alone, after a restart, with the device gone."""
        ...

    def block_device(self, record: StageRecord) -> str | None:
        """The device node to bind for raw block publish (None for file protocols)."""
        ...

    def member_paths(self, record: StageRecord) -> set[str]:
        """Kernel names of single paths that a bind of the volume must never use instead of block_device."""
        ...

    def expand(self, record: StageRecord) -> int:
        """Make the node see the new size (and grow the filesystem); returns the size in bytes or 0."""
        ...

    def condition(self, record: StageRecord) -> str | None:
        """None when healthy, else a sentence for VolumeCondition.message."""
        ...
