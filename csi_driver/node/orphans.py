"""Stage records whose device or mount is gone, found and (on request) removed: `berth orphans --node`.

A record is stale when its staging is not whole any more (the iSCSI device is gone, or nothing, or something else,
is mounted at the staging path), no publish target of it is mounted, and it has not changed for the time limit (so a
NodeStageVolume in progress in the plugin, which saves the record before it logs in, is never taken for one).
Removal is NodeUnstageVolume's own path (NodeVolumes.unstage): log out, remove the maps, unmount, forget the record.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import NodeError
from .stage_record import StageRecord
from .volumes import NodeVolumes


@dataclass(frozen=True)
class StaleStage:
    volume_id: str
    protocol: str
    staging_path: str
    reason: str
    age_seconds: int


def find_stale_stages(
    volumes: NodeVolumes, older_than_seconds: float, now: Callable[[], float] = time.time
) -> list[StaleStage]:
    found = []
    for record in volumes.records.all():
        try:
            age = now() - os.path.getmtime(volumes.records.path(record.volume_id))
        except (OSError, ValueError):
            continue  # gone meanwhile (unstaged)
        reason = _why_stale(volumes, record)
        if reason is not None and age >= older_than_seconds:
            found.append(StaleStage(record.volume_id, record.protocol, record.staging_path, reason, int(age)))
    return found


def remove_stale_stages(
    volumes: NodeVolumes, stale: Iterable[StaleStage], older_than_seconds: float, now: Callable[[], float] = time.time
) -> list[tuple[StaleStage, str | None]]:
    """Unstage each one that is still stale; (stale, None) when removed, else (stale, why not)."""
    still = {s.volume_id for s in find_stale_stages(volumes, older_than_seconds, now)}
    outcomes: list[tuple[StaleStage, str | None]] = []
    for entry in stale:
        if entry.volume_id not in still:
            outcomes.append((entry, "no longer stale (staged again, published, or unstaged meanwhile)"))
            continue
        try:
            volumes.unstage(entry.volume_id, entry.staging_path)
            outcomes.append((entry, None))
        except NodeError as err:
            outcomes.append((entry, str(err)))
    return outcomes


def _why_stale(volumes: NodeVolumes, record: StageRecord) -> str | None:
    """None while the staging is whole or a pod's publish target still holds it; else why it is stale."""
    if any(volumes.mounter.table.is_mountpoint(target) for target in record.targets):
        return None  # in use: NodeUnpublish, then NodeUnstage, are kubelet's to call
    protocol = volumes.protocols.get(record.protocol)
    if protocol is None:
        return f"protocol {record.protocol!r} is not served by this node any more"
    if protocol.is_staged(record):
        return None
    return protocol.condition(record) or f"nothing of it is mounted at {record.staging_path}"
