"""One JSON file per staged volume: everything NodeUnstage needs after a plugin restart, with the device gone.

`<state_dir>/volumes/<quoted volume id>.json` (or `sha256=<hex>.json`, see record_file_name), written atomically
(temp file, fsync, rename, fsync dir), so a crash leaves the old record or the new one, never half of one. The state
dir must be on the host (not container-local): losing these files is how other drivers leak iSCSI sessions
(truenas-csi#55).

CHAP secrets are never written: logout and device removal need no credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CleanupFailed, PathUnusable, RecordUnreadable

log = logging.getLogger("berth.node.stage_record")

FORMAT_VERSION = 1
# Below NAME_MAX (255) with ".json"; a quoted 128-byte UTF-8 volume ID can take 384.
MAX_QUOTED_NAME = 240
_SECRET_KEYS = ("auth_password", "auth_username", "discovery_auth_password", "discovery_auth_username")


@dataclass
class StageRecord:
    volume_id: str
    protocol: str  # "iscsi" | "nfs"
    staging_path: str
    access_type: str  # "block" | "mount"
    fs_type: str = ""
    mount_flags: list[str] = field(default_factory=list)
    readonly: bool = False
    access_mode: int = 0  # csi VolumeCapability.AccessMode.Mode
    # iSCSI: what os-brick needs to disconnect, and what identifies the LUN.
    connection_properties: dict[str, Any] = field(default_factory=dict)
    device_path: str = ""
    wwn: str = ""
    multipath: bool = False
    # NFS: "server:/export".
    nfs_source: str = ""
    # target path → readonly, for publish idempotency, SINGLE_NODE_SINGLE_WRITER and stats path checks.
    targets: dict[str, bool] = field(default_factory=dict)
    # target paths Berth itself created (the file or directory a publish binds onto): the only ones unpublish
    # removes. Written right after the creation, before the bind.
    created: list[str] = field(default_factory=list)
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["connection_properties"] = {k: v for k, v in self.connection_properties.items() if k not in _SECRET_KEYS}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StageRecord:
        """ValueError when the text is not a record (not JSON, not an object, a required field missing)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        known = {f for f in cls.__dataclass_fields__}
        try:
            # Ignore keys from a newer plugin version rather than refuse to unstage.
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise ValueError(str(err)) from err


def record_file_name(volume_id: str) -> str:
    """Volume IDs contain "/"; percent-quoting is reversible, so two IDs never share a file. An ID too long once
    quoted, or starting with "." (hidden, or "." and ".."), is named by its SHA-256: quote() always escapes "=", so
    no quoted name looks like one."""
    name = urllib.parse.quote(volume_id, safe="")
    if len(name) > MAX_QUOTED_NAME or name.startswith("."):
        name = "sha256=" + hashlib.sha256(volume_id.encode()).hexdigest()
    return name + ".json"


class RecordStore:
    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "volumes")

    def path(self, volume_id: str) -> str:
        return os.path.join(self.dir, record_file_name(volume_id))

    def load(self, volume_id: str) -> StageRecord | None:
        """None when the volume has no record. Raises RecordUnreadable for one that cannot be read: taking it for
        absent would unstage nothing and leak the session and map it describes."""
        path = self.path(volume_id)
        try:
            return _read(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise RecordUnreadable(
                f"the stage record of volume {volume_id} ({path}) cannot be read: {err}. What its stage attached is "
                "unknown: check this node's iSCSI sessions, multipath maps and mounts of the volume, then remove "
                "the file"
            ) from err

    def set_aside(self, volume_id: str) -> None:
        """Rename an unreadable record to `<name>.unreadable` (kept for a person to read, never loaded again)."""
        path = self.path(volume_id)
        try:
            os.replace(path, path + ".unreadable")
        except OSError as err:
            raise PathUnusable(f"cannot set aside the unreadable stage record {path}: {err}") from err

    def save(self, record: StageRecord) -> None:
        """Raises PathUnusable when the state dir cannot take the record (no space, read-only, permissions)."""
        try:
            self._write(record)
        except OSError as err:
            raise PathUnusable(
                f"cannot write the stage record of volume {record.volume_id} in {self.dir}: {err}"
            ) from err

    def _write(self, record: StageRecord) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        final = self.path(record.volume_id)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(self.dir)

    def delete(self, volume_id: str) -> None:
        """Raises CleanupFailed when the record cannot be removed (a read-only state dir): the volume is then still
        known as staged here, and a retry finds it."""
        try:
            os.unlink(self.path(volume_id))
            _fsync_dir(self.dir)
        except FileNotFoundError:
            return
        except OSError as err:
            raise CleanupFailed(f"cannot remove the stage record of volume {volume_id} in {self.dir}: {err}") from err

    def all(self) -> list[StageRecord]:
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                try:
                    records.append(_read(os.path.join(self.dir, name)))
                except (OSError, ValueError) as err:
                    log.warning("unreadable stage record", extra={"file": name, "error": str(err)})
        return records


def _read(path: str) -> StageRecord:
    with open(path, encoding="utf-8") as f:
        return StageRecord.from_json(f.read())


def _fsync_dir(path: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
