"""Every name Berth derives on the storage host, in one place.

LV names are a pure function of the backend and the CSI request name, so a retried CreateVolume lands on the same
LV (idempotency) without the controller keeping any database, and backends sharing a volume group never collide.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from csi_driver.ids import IQN_PATTERN, MAX_INITIATOR_NAME_BYTES, is_initiator_name

from .errors import InvalidRequest

VOLUME_PREFIX = "vol-"
SNAPSHOT_PREFIX = "snap-"
GROUP_PREFIX = "grp-"
# 20 hex = 80 bits: collisions are negligible, and the full CSI name is kept in a tag and checked.
NAME_HASH_HEX = 20
# LVM LV names: [A-Za-z0-9+_.-], not starting with '-', max 127 chars; we use a stricter subset.
_LV_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_.-]{0,126}")
_VG_NAME_RE = _LV_NAME_RE
_IQN_RE = re.compile(IQN_PATTERN)  # target names: iqn only
# LIO NAA IEEE registered extended identifiers use the Linux OUI 00:14:05 by default.
LIO_NAA_PREFIX = "6001405"


def _digest(backend: str, csi_name: str) -> str:
    if not csi_name:
        raise InvalidRequest("name must not be empty")
    return hashlib.sha256(f"{backend}\0{csi_name}".encode()).hexdigest()[:NAME_HASH_HEX]


def volume_lv_name(backend: str, csi_name: str) -> str:
    """LV name for a CreateVolume request name in `backend`."""
    return VOLUME_PREFIX + _digest(backend, csi_name)


def snapshot_lv_name(backend: str, csi_name: str) -> str:
    """LV name for a CreateSnapshot request name in `backend`."""
    return SNAPSHOT_PREFIX + _digest(backend, csi_name)


def group_snapshot_key(backend: str, csi_name: str) -> str:
    """The backend-local part of a group snapshot's ID (`<backend>/grp-...`) for a CreateVolumeGroupSnapshot name.

    No LV carries this name: it is the tag that marks the group's member snapshots."""
    return GROUP_PREFIX + _digest(backend, csi_name)


def member_snapshot_lv_name(backend: str, group_name: str, source_lv: str) -> str:
    """LV name of the member of group `group_name` taken of `source_lv`: a retried CreateVolumeGroupSnapshot lands on
    the same LVs. No CSI name holds U+0000, so no CreateSnapshot name can map to it."""
    return snapshot_lv_name(backend, f"{group_name}\0{check_lv_name(source_lv)}")


def is_berth_lv(lv_name: str) -> bool:
    return bool(re.fullmatch(rf"(vol|snap)-[0-9a-f]{{{NAME_HASH_HEX}}}", lv_name))


def check_lv_name(name: str) -> str:
    if not _LV_NAME_RE.fullmatch(name) or name in (".", "..") or name.startswith("snapshot"):
        raise InvalidRequest(f"invalid LV name {name!r}")
    return name


def check_vg_name(name: str) -> str:
    if not _VG_NAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid VG/pool name {name!r}")
    return name


def check_initiator(iqn: str) -> str:
    """Accept iqn./eui./naa. initiator names: the one rule of csi_driver.ids."""
    if not is_initiator_name(iqn):
        raise InvalidRequest(f"invalid iSCSI initiator name {iqn!r}")
    return iqn


def target_iqn(iqn_prefix: str, lv_name: str) -> str:
    """One target per volume: <prefix>:<lv name>. LIO stores iqn names lower-case."""
    iqn = f"{iqn_prefix.rstrip(':')}:{check_lv_name(lv_name)}".lower()
    if not _IQN_RE.fullmatch(iqn) or len(iqn) > MAX_INITIATOR_NAME_BYTES:
        raise InvalidRequest(f"invalid target IQN {iqn!r} (check iqn_prefix)")
    return iqn


def volume_serial(lv_name: str) -> str:
    """T10 unit serial of the backstore: stable per volume, so nodes can predict the WWN."""
    digest = hashlib.sha256(b"berth-serial:" + check_lv_name(lv_name).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16]))


def naa_wwn(serial: str) -> str:
    """The NAA id LIO derives from a unit serial (udev: /dev/disk/by-id/wwn-0x<this>).

    LIO builds a NAA type 6 id from the OUI 001405 and the first 25 hex digits of the serial.
    """
    hexdigits = "".join(c for c in serial.lower() if c in "0123456789abcdef")[:25]
    return LIO_NAA_PREFIX + hexdigits.ljust(25, "0")
