"""A backend: one LVM thin pool on one storage host, plus the protocol that exports its volumes.

Everything a volume is (CSI name, parameters, content source, creation state, which nodes it is published to)
is kept in the LV's tags, so a restarted controller finds it all again and keeps no database.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol, TypeGuard

from csi_driver.faults import fault_point

from . import tags as meta_keys
from .errors import (
    AlreadyExists,
    Busy,
    CapacityExhausted,
    CommandTimeout,
    HostUnreachable,
    InUse,
    InvalidRequest,
    NotFound,
    OutOfRange,
    StorageError,
)
from .ids import group_snapshot_key, member_snapshot_lv_name, snapshot_lv_name, volume_lv_name
from .lvm import LvInfo, PoolCapacity, PoolView, ThinPool

log = logging.getLogger("berth.storage")

KIND_VOLUME = "volume"
KIND_SNAPSHOT = "snapshot"
# Which backend made the LV: backends may share one thin pool (e.g. an iSCSI and an NFS backend on one host).
KEY_BACKEND = "backend"
# Metadata key prefix of a publication: pub.<node id> = "ro" | "rw".
PUBLISHED_PREFIX = "pub."
# Failures a retry may get past; a volume that hit one stays half-made for the retry to finish.
TRANSIENT_ERRORS = (Busy, CommandTimeout, HostUnreachable)
# No volume is ever larger, whatever the over-provisioning policy says: no pool Berth serves comes near it, and every
# size stays exact where a tool parses it as a double (2**53). Requests of 2**62 bytes and more once reached
# lvextend and the storage host; now they stop here with OUT_OF_RANGE.
MAX_VOLUME_BYTES = 1 << 53
# How long a group snapshot's fence may hold its volumes' I/O before the storage host lifts it by itself (the
# controller may die inside it). A group that took longer is not one instant: it is removed, and the CO retries.
FENCE_SECONDS = 60
# StorageClass parameters that only one protocol understands: parameter → protocol.
EXPORT_OPTIONS_PARAMETER = "nfsExportOptions"
PROTOCOL_PARAMETERS = {EXPORT_OPTIONS_PARAMETER: "nfs"}
# The config key of the policy, named in every message that refuses a size because of it.
POLICY_KEY = "backends.{backend}.lvm.over_provisioning_ratio"


@dataclass(frozen=True)
class NodeRef:
    """A node as the storage host needs it: its CSI node ID, iSCSI initiator name and IP addresses."""

    node_id: str
    initiator: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class ContentSource:
    kind: Literal["snapshot", "volume"]
    lv: str

    def encode(self) -> str:
        return f"{self.kind}:{self.lv}"

    @classmethod
    def decode(cls, text: str) -> ContentSource | None:
        kind, _, lv = text.partition(":")
        return cls(kind, lv) if kind in ("snapshot", "volume") and lv else None  # type: ignore[arg-type]


@dataclass(frozen=True)
class Volume:
    lv: str
    name: str
    size_bytes: int
    parameters: dict[str, str]
    source: ContentSource | None
    published: dict[str, bool]  # node ID → read-only
    ready: bool
    active: bool
    context: dict[str, str] = field(default_factory=dict)
    mutable: dict[str, str] = field(default_factory=dict)  # mutable parameters (VolumeAttributesClass)


@dataclass(frozen=True)
class Snapshot:
    lv: str
    name: str
    source_lv: str
    size_bytes: int
    created: datetime
    group: str = ""  # the key of the group snapshot it is a member of (ids.group_snapshot_key), if any


@dataclass(frozen=True)
class GroupSnapshot:
    key: str  # ids.group_snapshot_key: the group snapshot's ID within its backend
    members: list[Snapshot]

    @property
    def created(self) -> datetime:
        return min(member.created for member in self.members)


# mkfs refuses smaller devices: xfsprogs 5.19+ needs 300 MiB ("300MB"). ext4 has no practical minimum here.
FILESYSTEM_MINIMUM_BYTES = {"xfs": 300 << 20}


def filesystem_minimum_bytes(fs_type: str) -> int:
    return FILESYSTEM_MINIMUM_BYTES.get(fs_type, 0)


class Exporter(Protocol):
    """What differs between iSCSI and NFS: how a volume is made reachable, and by whom.

    Every method that reaches the host may also raise the runner's errors (CommandFailed, CommandTimeout,
    HostUnreachable), Busy (the host lock stayed taken, or the request's time ran out) and StorageError (any other
    host failure); "Raises" below names what each adds."""

    protocol: str
    # False when prepare() has nothing to do for a fresh volume (not a clone): its LV is then created ready.
    fresh_needs_prepare: bool

    @property
    def mutable_parameters(self) -> Mapping[str, tuple[str, ...]]:
        """Mutable parameters (CreateVolume mutable_parameters, ControllerModifyVolume): key → allowed values."""
        ...

    def volume_context(self, lv: str) -> dict[str, str]:
        """What a node needs besides the publish context (e.g. the LUN's WWN, the NFS export path).
        Raises InvalidRequest (an invalid LV name)."""
        ...

    def minimum_bytes(self, parameters: Mapping[str, str]) -> int:
        """The smallest volume that works with these StorageClass parameters (e.g. the filesystem's minimum).
        Raises nothing."""
        ...

    def check_parameters(self, parameters: Mapping[str, str]) -> None:
        """Refuse StorageClass parameters this protocol cannot honour, before anything is made.
        Raises InvalidRequest (nfs: bad nfsExportOptions)."""
        ...

    def prepare(self, lv: LvInfo, fresh: bool, max_bytes: int) -> None:
        """Make a new (or half-created) volume exportable, e.g. create its filesystem when `fresh`; a clone's
        filesystem grows to its LV. max_bytes: the backend's size limit (the host refuses to grow beyond it).
        Raises (nfs; iscsi has nothing to do) InvalidRequest (a mount point outside the export root), NotFound (no
        LV device), InUse (something else mounted there, or a foreign filesystem), OutOfRange (above max_bytes)."""
        ...

    def publish(self, lv: LvInfo, node: NodeRef, readonly: bool, secrets: Mapping[str, str]) -> dict[str, str]:
        """Let `node` reach the volume; returns publish_context. Idempotent.
        Raises InvalidRequest (bad CHAP secrets; nfs: a node without addresses), NotFound (nfs: no LV device),
        InUse (iscsi: the backstore or LUN 0 holds another device; nfs: something else mounted there),
        HostNotReady (iscsi: no rtslib on the host)."""
        ...

    def unpublish(self, lv: LvInfo, node: NodeRef) -> None:
        """Take `node`'s access away. Idempotent.
        Raises InvalidRequest (a bad initiator or addresses), InUse (iscsi: the target has no TPG 1),
        HostNotReady (iscsi)."""
        ...

    def modify(self, lv: LvInfo) -> None:
        """Apply the mutable parameters in `lv`'s metadata to its live export, if it has one (publish applies them
        to a new one). Idempotent.
        Raises InvalidRequest (bad export options), HostNotReady (iscsi)."""
        ...

    def teardown(self, lv: LvInfo) -> None:
        """Remove every export of the volume before the LV goes. Idempotent.
        Raises InvalidRequest (an invalid LV name), InUse (iscsi: another target still uses the backstore; nfs: the
        filesystem is still in use on the host), HostNotReady (iscsi)."""
        ...

    def grown(self, lv: LvInfo, max_bytes: int) -> bool:
        """Called after the LV grew, and on every retry of an expansion (so a grow that failed half-way is
        finished); returns whether the node must also expand (NodeExpandVolume). Idempotent.
        Raises (nfs; iscsi has nothing to do) NotFound (no LV device), InUse (something else mounted there),
        OutOfRange (the LV is above max_bytes)."""
        ...

    @contextmanager
    def consistent(self, lv: LvInfo) -> Iterator[None]:
        """Hold the volume consistent (e.g. a frozen filesystem) while a snapshot is taken.
        Raises (nfs; iscsi has nothing to do) NotFound (not mounted), InUse (something else mounted there)."""
        ...

    def fence(self, lvs: Sequence[LvInfo], token: str, seconds: int) -> None:
        """Stop all I/O of the nodes to these volumes, at the storage host (a group snapshot's common instant): what
        the host acknowledged stays, what comes after waits in the nodes. Lifted by unfence(token), or by the host
        itself after `seconds`.
        Raises InvalidRequest (a bad token or too many volumes), HostNotReady (iscsi)."""
        ...

    def unfence(self, token: str) -> None:
        """Lift the fence `token` (idempotent).
        Raises InvalidRequest (a bad token), HostNotReady (iscsi)."""
        ...


class LvmBackend:
    def __init__(
        self,
        name: str,
        pool: ThinPool,
        exporter: Exporter,
        over_provisioning_ratio: float = 1.0,
        full_threshold_percent: float = 100.0,  # no threshold; the config's default is 95
    ):
        self.name = name
        self.pool = pool
        self.exporter = exporter
        self.over_provisioning_ratio = over_provisioning_ratio
        self.full_threshold_percent = full_threshold_percent

    @property
    def protocol(self) -> str:
        return self.exporter.protocol

    @property
    def mutable_parameters(self) -> Mapping[str, tuple[str, ...]]:
        return self.exporter.mutable_parameters

    # --- volumes ---

    def create_volume(
        self,
        name: str,
        required_bytes: int,
        limit_bytes: int,
        parameters: Mapping[str, str],
        source: ContentSource | None,
        default_bytes: int = 0,
        mutable: Mapping[str, str] | None = None,
        filesystems: Sequence[str] = (),
    ) -> Volume:
        """Create, or finish creating, the volume for CSI name `name`; same name + same request → same volume.

        required_bytes 0 means "no size asked": a clone takes its source's size, a new volume default_bytes.
        Raises OutOfRange (above the backend's size limit, below the filesystem's minimum or the source's size, or
        beyond limit_bytes) and CapacityExhausted (the pool may not promise that much more) before anything is made;
        AlreadyExists for the same name with another request; NotFound for a missing source.
        `mutable`: the mutable parameters, already checked against `mutable_parameters`. `filesystems`: the fs
        types the capabilities will format the volume with (Kubernetes passes csi.storage.k8s.io/fstype there, not
        in the parameters); a new volume is at least as large as each needs.
        """
        lv = volume_lv_name(self.name, name)
        meta = {
            meta_keys.KEY_NAME: name,
            meta_keys.KEY_KIND: KIND_VOLUME,
            KEY_BACKEND: self.name,
            **meta_keys.params_to_meta(parameters),
            **meta_keys.params_to_meta(mutable or {}, meta_keys.MUTABLE_PREFIX),
        }
        if source is not None:
            meta[meta_keys.KEY_SOURCE] = source.encode()
        view = self.pool.view()
        existing = view.find(lv)
        max_bytes: int | None = None
        if existing is not None:
            self._check_same_request(existing, meta, required_bytes, limit_bytes)
        else:
            self._check_parameters(parameters)
            source_info = self._source_info(source, view) if source is not None else None
            size = self._new_volume_size(
                required_bytes, limit_bytes, parameters, source_info, default_bytes, filesystems
            )
            capacity = view.capacity
            self._check_room(capacity, "volume")
            max_bytes = self._size_limit(capacity)
            self._check_limit(size, required_bytes or size, max_bytes, capacity, "requested size")
            available = self._available(view)
            if size > available:
                raise CapacityExhausted(
                    f"backend {self.name} can offer {available} more bytes (thin pool free space below "
                    f"{self.full_threshold_percent:g}% full x over-provisioning ratio {self.over_provisioning_ratio}); "
                    f"{size} requested"
                )
            # A fresh volume that needs no preparing (iSCSI) is ready as soon as its LV exists: one lvchange fewer.
            finished = source_info is None and not self.exporter.fresh_needs_prepare
            state = meta_keys.STATE_READY if finished else meta_keys.STATE_CREATING
            creating = {**meta, meta_keys.KEY_STATE: state}
            if source_info is None:
                existing = self.pool.create_volume(lv, size, creating, known_absent=True)
            else:
                existing = self.pool.clone(source_info, lv, size, creating, known_absent=True)
            fault_point("create-volume.lv-created")
        if existing.meta.get(meta_keys.KEY_STATE) != meta_keys.STATE_READY:
            # A fresh LV, or one a crashed earlier attempt left half-made: finish it.
            if max_bytes is None:
                max_bytes = self._size_limit(view.capacity)
            try:
                self.exporter.prepare(existing, fresh=source is None, max_bytes=max_bytes)
            except StorageError as err:
                if not isinstance(err, TRANSIENT_ERRORS):
                    self._discard_unfinished(existing, err)
                raise
            fault_point("create-volume.prepared")
            existing = self.pool.update_meta(lv, {meta_keys.KEY_STATE: meta_keys.STATE_READY}, existing)
        return self._volume(existing)

    def adopt_volume(self, lv: str, name: str, parameters: Mapping[str, str]) -> Volume:
        """Bring an existing thin LV of this backend's pool under Berth's management as the volume for CSI name
        `name` (`berth adopt`, docs/adoption.md): tagged, renamed to that name's LV, then prepared as a clone is (NFS:
        its filesystem mounted, grown to the LV and listed for export; iSCSI: nothing before the first publish).
        Each step can be retried: running it again finishes an interrupted adoption, or returns the volume.
        Raises NotFound (no such LV), InUse (the LV is open), InvalidRequest (not a thin LV of this pool, or already
        Berth's), AlreadyExists (`name` is another volume)."""
        target = volume_lv_name(self.name, name)
        adopting = {meta_keys.KEY_NAME: name, meta_keys.KEY_KIND: KIND_VOLUME, KEY_BACKEND: self.name,
                    meta_keys.KEY_ADOPTED: lv}  # fmt: skip
        info = self.pool.find(target)
        if info is not None and not _meta_matches(info, adopting):
            raise AlreadyExists(f"volume {name!r} already exists in backend {self.name}")
        if info is None:
            info = self._adoptable(lv, adopting)
            if not _meta_matches(info, adopting):
                meta = {**adopting, **meta_keys.params_to_meta(parameters),
                        meta_keys.KEY_STATE: meta_keys.STATE_ADOPTING}  # fmt: skip
                info = self.pool.update_meta(lv, meta, info)
            self.pool.rename(lv, target)
            info = self.pool.get(target)
        if info.meta.get(meta_keys.KEY_STATE) != meta_keys.STATE_READY:
            try:
                self.exporter.prepare(info, fresh=False, max_bytes=self.size_limit())
            except StorageError as err:
                if not isinstance(err, TRANSIENT_ERRORS):
                    self._undo_adoption(info, lv, err)
                raise
            info = self.pool.update_meta(target, {meta_keys.KEY_STATE: meta_keys.STATE_READY}, info)
        return self._volume(info)

    def _undo_adoption(self, info: LvInfo, original: str, cause: Exception) -> None:
        """An LV that could not be prepared goes back to what it was: its old name, no Berth tags."""
        log.warning("giving back an LV that could not be adopted", extra={"lv": original, "error": str(cause)})
        try:
            self.exporter.teardown(info)
            self.pool.drop_meta(info.name, info)
            self.pool.rename(info.name, original)
        except StorageError as err:
            log.error("could not give the LV back", extra={"lv": info.name, "original": original, "error": str(err)})

    def _adoptable(self, lv: str, adopting: Mapping[str, str]) -> LvInfo:
        """The LV to adopt, or why it cannot be adopted."""
        where = f"{self.pool.vg}/{lv}"
        info = self.pool.find(lv)
        if info is None:
            raise NotFound(f"no LV {where}")
        if info.pool != self.pool.pool:
            raise InvalidRequest(
                f"{where} is not a thin LV of {self.pool.vg}/{self.pool.pool}, the pool of backend {self.name}"
            )
        if info.meta and not _meta_matches(info, adopting):
            owner = info.meta.get(KEY_BACKEND, "unknown")
            raise InvalidRequest(f"{where} is already managed by Berth (backend {owner}, name "
                                 f"{info.meta.get(meta_keys.KEY_NAME, '?')!r})")  # fmt: skip
        if info.open:
            raise InUse(f"{where} is in use on the storage host (open: mounted, exported or attached); "
                        "stop what uses it, then adopt it")  # fmt: skip
        return info

    def _check_parameters(self, parameters: Mapping[str, str]) -> None:
        for key, protocol in PROTOCOL_PARAMETERS.items():
            if key in parameters and protocol != self.protocol:
                raise InvalidRequest(
                    f"StorageClass parameter {key} applies to {protocol} backends; "
                    f"backend {self.name} is {self.protocol}"
                )
        self.exporter.check_parameters(parameters)

    def _new_volume_size(
        self,
        required_bytes: int,
        limit_bytes: int,
        parameters: Mapping[str, str],
        source: LvInfo | None,
        default_bytes: int,
        filesystems: Sequence[str] = (),
    ) -> int:
        """The size a new volume gets: what was asked (or its source's size, or the default), at least the
        filesystem's minimum and the source's size, rounded up to extents; OutOfRange when that breaks limit_bytes."""
        if not required_bytes:
            # No size asked: a clone is as large as its source, a new volume gets the default.
            required_bytes = source.size_bytes if source is not None else default_bytes
        minimum = max(self.exporter.minimum_bytes(parameters), *map(filesystem_minimum_bytes, filesystems), 0)
        if limit_bytes and limit_bytes < minimum:
            raise OutOfRange(
                f"limit_bytes {limit_bytes} is below {minimum} bytes, the smallest volume this backend's "
                "filesystem can hold (xfs needs 300 MiB; ext4 has no such minimum)"
            )
        if source is not None and limit_bytes and limit_bytes < source.size_bytes:
            raise OutOfRange(
                f"limit_bytes {limit_bytes} is below the size of the source ({source.size_bytes} bytes): "
                "a clone or restore is at least as large as its source"
            )
        size = self.pool.round_size(max(required_bytes, minimum, source.size_bytes if source else 0))
        if limit_bytes and size > limit_bytes:
            raise OutOfRange(
                f"capacity {required_bytes} rounds up to {size} bytes (extent {self.pool.extent_size()} bytes), "
                f"above the limit of {limit_bytes} bytes"
            )
        return size

    def _discard_unfinished(self, info: LvInfo, cause: Exception) -> None:
        """A volume that failed to finish was never handed out: remove it now, so that a CO that gives up
        (PVC deleted) leaks nothing. A transient failure keeps it for the retry to finish instead."""
        log.warning("removing a volume that could not be finished", extra={"lv": info.name, "error": str(cause)})
        try:
            self.exporter.teardown(info)
            self.pool.remove(info.name)
        except StorageError as err:
            log.error("could not remove the unfinished volume", extra={"lv": info.name, "error": str(err)})

    def _source_info(self, source: ContentSource, view: PoolView) -> LvInfo:
        info = view.find(source.lv)
        expected_kind = KIND_SNAPSHOT if source.kind == "snapshot" else KIND_VOLUME
        if info is None or not self._owned(info, expected_kind):
            raise NotFound(f"source {source.kind} {self.name}/{source.lv} not found")
        return info

    def _check_same_request(
        self, existing: LvInfo, meta: Mapping[str, str], required_bytes: int, limit_bytes: int
    ) -> None:
        name = meta[meta_keys.KEY_NAME]
        if existing.meta.get(meta_keys.KEY_NAME) != name:
            raise AlreadyExists(f"LV {existing.name} belongs to another volume (name hash collision)")
        differences = sorted(
            k for k in set(meta) | set(existing.meta) if _comparable(k) and meta.get(k) != existing.meta.get(k)
        )
        if differences:
            raise AlreadyExists(
                f"volume {name!r} already exists with different parameters or source ({', '.join(differences)})"
            )
        if existing.size_bytes < required_bytes or (limit_bytes and existing.size_bytes > limit_bytes):
            raise AlreadyExists(
                f"volume {name!r} already exists with {existing.size_bytes} bytes, incompatible with the "
                f"requested range {required_bytes}..{limit_bytes or 'unlimited'}"
            )

    def view(self) -> PoolView:
        """The pool and its LVs from one lvs, for an RPC that reads them several times (pass it on as `view`)."""
        return self.pool.view()

    def get_volume(self, lv: str, view: PoolView | None = None) -> Volume:
        return self._volume(self._owned_volume(view.find(lv) if view is not None else self.pool.find(lv), lv))

    def _owned_volume(self, info: LvInfo | None, lv: str) -> LvInfo:
        if not self._owned(info, KIND_VOLUME):
            raise NotFound(f"volume {self.name}/{lv} not found")
        return info

    def list_volumes(self, view: PoolView | None = None) -> list[Volume]:
        mine = {meta_keys.KEY_KIND: KIND_VOLUME, KEY_BACKEND: self.name}
        return [self._volume(i) for i in (view.list(mine) if view is not None else self.pool.list(mine))]

    def delete_volume(self, lv: str) -> None:
        """Remove the volume; a missing one is fine. Thin snapshots of it stay valid (they share no LV)."""
        info = self.pool.find(lv)
        if not self._owned(info, KIND_VOLUME):
            return
        published = _published(info)
        if published:
            raise InUse(f"volume {self.name}/{lv} is still published to {', '.join(sorted(published))}")
        self.exporter.teardown(info)
        fault_point("delete-volume.exports-removed")
        self.pool.remove(lv)

    def expand_volume(self, lv: str, required_bytes: int, limit_bytes: int) -> tuple[int, bool]:
        """Grow the volume; returns (new size, whether the node must expand too).

        OutOfRange above the backend's size limit, CapacityExhausted when the growth does not fit what the pool
        may still promise; both before anything on the host changes.
        """
        view = self.pool.view()
        volume = self._owned_volume(view.find(lv), lv)
        size = self.pool.round_size(required_bytes)
        if limit_bytes and size > limit_bytes:
            raise OutOfRange(f"capacity {required_bytes} rounds up to {size}, above the limit {limit_bytes}")
        capacity = view.capacity
        max_bytes = self._size_limit(capacity)
        if size > volume.size_bytes:
            self._check_limit(size, required_bytes, max_bytes, capacity, "expansion to")
            available = self._available(view)
            if size - volume.size_bytes > available:
                raise CapacityExhausted(
                    f"growing {self.name}/{lv} by {size - volume.size_bytes} bytes needs more than the {available} "
                    f"bytes backend {self.name} can still offer (thin pool free space below "
                    f"{self.full_threshold_percent:g}% full x over-provisioning ratio {self.over_provisioning_ratio})"
                )
            self.pool.resize(lv, size)
            fault_point("expand-volume.lv-grown")
        # Also when the LV already had the size: a retry after lvextend succeeded and the filesystem grow failed
        # must still grow the filesystem (the exporter checks whether it is smaller than the LV).
        grown = self.pool.get(lv)
        return grown.size_bytes, self.exporter.grown(grown, max_bytes)

    def modify_volume(self, lv: str, mutable: Mapping[str, str]) -> None:
        """Change mutable parameters (already checked against `mutable_parameters`) of a live volume, no detach.

        Tags first: they are what every later publish applies, so a failure after them is finished by the CO's
        retry or the next publish. Raises NotFound, and the exporter's errors.
        """
        self.get_volume(lv)
        info = self.pool.update_meta(lv, meta_keys.params_to_meta(mutable, meta_keys.MUTABLE_PREFIX))
        self.exporter.modify(info)

    # --- publication ---

    def publish(
        self,
        lv: str,
        node: NodeRef,
        readonly: bool,
        multi_node: bool,
        secrets: Mapping[str, str],
        view: PoolView | None = None,
    ) -> dict[str, str]:
        info = self._ready_volume(lv, view)
        published = _published(info)
        if node.node_id in published:
            if published[node.node_id] != readonly:
                mode = "read-only" if published[node.node_id] else "read-write"
                raise AlreadyExists(f"volume {self.name}/{lv} is already published {mode} to this node")
        elif published and not multi_node:
            raise InUse(
                f"volume {self.name}/{lv} is published to {', '.join(sorted(published))}; its access mode "
                "allows a single node (use a MULTI_NODE_* access mode to publish on several nodes)"
            )
        context = self.exporter.publish(info, node, readonly, secrets)
        fault_point("publish.exported")
        # Record after the export exists: a crash in between leaves an export Unpublish still removes.
        self.pool.update_meta(lv, {PUBLISHED_PREFIX + node.node_id: "ro" if readonly else "rw"}, info)
        return context

    def unpublish(self, lv: str, node: NodeRef) -> None:
        info = self.pool.find(lv)
        if info is None:
            return  # a deleted volume is unpublished everywhere
        self.exporter.unpublish(info, node)
        fault_point("unpublish.unexported")
        self.pool.update_meta(lv, {PUBLISHED_PREFIX + node.node_id: None}, info)

    def _ready_volume(self, lv: str, view: PoolView | None = None) -> LvInfo:
        info = self._owned_volume(view.find(lv) if view is not None else self.pool.find(lv), lv)
        if info.meta.get(meta_keys.KEY_STATE) != meta_keys.STATE_READY:
            raise InUse(f"volume {self.name}/{lv} is still being created")
        return info

    # --- snapshots ---

    def create_snapshot(self, name: str, source_lv: str) -> Snapshot:
        lv = snapshot_lv_name(self.name, name)
        meta = {
            meta_keys.KEY_NAME: name,
            meta_keys.KEY_KIND: KIND_SNAPSHOT,
            KEY_BACKEND: self.name,
            meta_keys.KEY_SOURCE: ContentSource("volume", source_lv).encode(),
        }
        view = self.pool.view()
        existing = view.find(lv)
        if existing is not None:
            if any(existing.meta.get(key) != value for key, value in meta.items()):
                raise AlreadyExists(f"snapshot {name!r} already exists for another source volume")
            return self._snapshot(existing)
        source = self._ready_volume(source_lv, view)
        self._check_room(view.capacity, "snapshot")
        with self.exporter.consistent(source):
            info = self.pool.snapshot(source, lv, meta, read_only=True, known_absent=True)
        fault_point("create-snapshot.taken")
        return self._snapshot(info)

    def create_group_snapshot(self, name: str, source_lvs: Sequence[str]) -> GroupSnapshot:
        """Snapshot all volumes `source_lvs` (distinct) at one instant: the exporter fences every origin's I/O at the
        storage host before the first snapshot is cut and lifts the fence after the last (docs/group-snapshots.md).

        Same name + same volumes → the same group. AlreadyExists for the name with other volumes; NotFound for a
        missing volume. A failure removes the members already made; a retry after a crash half-way removes the
        members left over and starts again (they were cut at another instant than the rest would be).
        """
        key = group_snapshot_key(self.name, name)
        wanted = {lv: member_snapshot_lv_name(self.name, name, lv) for lv in source_lvs}
        members = self._group_members(key)
        if members:
            sources = {_source_lv(info) for info in members}
            if members[0].meta.get(meta_keys.KEY_GROUP_SIZE) != str(len(wanted)) or not sources <= set(wanted):
                raise AlreadyExists(f"group snapshot {name!r} already exists with other source volumes")
            if len(members) == len(wanted):
                return self._group(key, members)
            log.warning("removing a group snapshot left half-made", extra={"group": key})
            self._remove_all(info.name for info in members)
        origins = [self._ready_volume(lv) for lv in source_lvs]
        self._check_room(self.pool.capacity(), "group snapshot")
        made: list[LvInfo] = []
        token = secrets.token_hex(16)
        try:
            # The common instant: no member takes a write from fence to unfence, so each snapshot shows the state
            # at the fence, whenever in the fence it is cut.
            fenced_at = time.monotonic()
            self.exporter.fence(origins, token, FENCE_SECONDS)
            for origin in origins:
                meta = {
                    meta_keys.KEY_NAME: name,
                    meta_keys.KEY_KIND: KIND_SNAPSHOT,
                    KEY_BACKEND: self.name,
                    meta_keys.KEY_SOURCE: ContentSource("volume", origin.name).encode(),
                    meta_keys.KEY_GROUP: key,
                    meta_keys.KEY_GROUP_SIZE: str(len(wanted)),
                }
                made.append(self.pool.snapshot(origin, wanted[origin.name], meta, read_only=True, known_absent=True))
            self.exporter.unfence(token)
            if time.monotonic() - fenced_at >= FENCE_SECONDS:
                raise Busy(
                    f"group snapshot {name!r} took longer than the {FENCE_SECONDS} s its fence may last, so its "
                    "members may show different instants: it was removed; retry"
                )
        except StorageError:
            try:
                self.exporter.unfence(token)
            except StorageError as err:  # the host's timer lifts it anyway; report the first error
                log.error("cannot lift a group snapshot's fence", extra={"group": key, "error": str(err)})
            # A timed-out lvcreate may still have made its LV: remove every member name, not only `made`.
            self._remove_all(wanted.values())
            raise
        return self._group(key, made)

    def get_group_snapshot(self, key: str) -> GroupSnapshot:
        members = self._group_members(key)
        if not members:
            raise NotFound(f"group snapshot {self.name}/{key} not found")
        return self._group(key, members)

    def delete_group_snapshot(self, key: str) -> None:
        """Remove every member; a missing group is fine."""
        self._remove_all(info.name for info in self._group_members(key))

    def _group_members(self, key: str) -> list[LvInfo]:
        return self.pool.list({meta_keys.KEY_KIND: KIND_SNAPSHOT, KEY_BACKEND: self.name, meta_keys.KEY_GROUP: key})

    def _group(self, key: str, members: Iterable[LvInfo]) -> GroupSnapshot:
        return GroupSnapshot(key, sorted((self._snapshot(info) for info in members), key=lambda s: s.lv))

    def _remove_all(self, lvs: Iterable[str]) -> None:
        """Remove each LV (a missing one is fine), trying all of them; raises the first failure."""
        failures: list[StorageError] = []
        for lv in lvs:
            try:
                self.pool.remove(lv)
            except StorageError as err:
                log.error("cannot remove a group snapshot member", extra={"lv": lv, "error": str(err)})
                failures.append(err)
        if failures:
            raise failures[0]

    def get_snapshot(self, lv: str) -> Snapshot:
        info = self.pool.find(lv)
        if not self._owned(info, KIND_SNAPSHOT):
            raise NotFound(f"snapshot {self.name}/{lv} not found")
        return self._snapshot(info)

    def snapshot_lvs(self, *lvs: str) -> list[LvInfo]:
        """The LVs of these snapshots of this backend, read by one lvs (thin ids included); NotFound for the first
        that is not one."""
        view = self.pool.view()
        infos = [view.find(lv) for lv in lvs]
        for lv, info in zip(lvs, infos, strict=True):
            if not self._owned(info, KIND_SNAPSHOT):
                raise NotFound(f"snapshot {self.name}/{lv} not found")
        return [info for info in infos if info is not None]

    def list_snapshots(self) -> list[Snapshot]:
        return [self._snapshot(i) for i in self.pool.list({meta_keys.KEY_KIND: KIND_SNAPSHOT, KEY_BACKEND: self.name})]

    def delete_snapshot(self, lv: str) -> None:
        info = self.pool.find(lv)
        if info is None:
            return
        if not self._owned(info, KIND_SNAPSHOT):
            return
        group = info.meta.get(meta_keys.KEY_GROUP)
        if group:
            raise InvalidRequest(
                f"snapshot {self.name}/{lv} is a member of group snapshot {self.name}/{group} and cannot be deleted "
                "alone: delete the group (DeleteVolumeGroupSnapshot)"
            )
        self.pool.remove(lv)

    # --- capacity ---

    def available_bytes(self) -> int:
        return self._available(self.pool.view())

    def _available(self, view: PoolView) -> int:
        capacity = view.capacity
        promised = sum(i.size_bytes for i in view.list({meta_keys.KEY_KIND: KIND_VOLUME, KEY_BACKEND: self.name}))
        # Thin pools promise more than they hold: offer the ratio times the pool, minus what is promised,
        # but never more than what is physically free below the full threshold, times the ratio.
        by_ratio = int(capacity.size_bytes * self.over_provisioning_ratio) - promised
        below_threshold = int(capacity.size_bytes * self.full_threshold_percent / 100) - capacity.used_bytes
        if _over_threshold(capacity, self.full_threshold_percent):
            below_threshold = 0
        return max(0, min(by_ratio, int(max(0, below_threshold) * self.over_provisioning_ratio)))

    def _check_room(self, capacity: PoolCapacity, what: str) -> None:
        """CapacityExhausted once the pool's data or metadata use reaches the full threshold: a pool that fills
        fails the writes of every volume in it, so nothing new may take its space first."""
        if _over_threshold(capacity, self.full_threshold_percent):
            raise CapacityExhausted(
                f"thin pool {self.pool.vg}/{self.pool.pool} is {capacity.data_percent:g}% full (metadata "
                f"{capacity.metadata_percent:g}%), at or above backend {self.name}'s full_threshold_percent of "
                f"{self.full_threshold_percent:g}: no new {what} until space is freed or the pool grows"
            )

    def pool_problem(self, view: PoolView | None = None) -> str | None:
        """Why writes to this backend's volumes fail now (the thin pool is out of data or metadata space); None
        while they can succeed. A VolumeCondition's message. `view`: the pool as the caller just read it."""
        capacity = view.capacity if view is not None else self.pool.capacity()
        if capacity.data_percent >= 100 or capacity.metadata_percent >= 100:
            pool = f"{self.pool.vg}/{self.pool.pool}"
            usage = f"data {capacity.data_percent:g}%, metadata {capacity.metadata_percent:g}%"
            return f"thin pool {pool} is full ({usage}): writes to blocks the volume has not written before fail"
        return None

    def size_limit(self) -> int:
        """The largest volume this backend ever makes (see _size_limit)."""
        return self._size_limit(self.pool.capacity())

    def _size_limit(self, capacity: PoolCapacity) -> int:
        """No single volume may promise more than the whole pool may: the thin pool's size times the
        over-provisioning ratio, rounded down to extents, and never above MAX_VOLUME_BYTES."""
        extent = self.pool.extent_size()
        by_policy = int(capacity.size_bytes * self.over_provisioning_ratio) // extent * extent
        return min(by_policy, MAX_VOLUME_BYTES)

    def _check_limit(self, size: int, requested: int, max_bytes: int, capacity: PoolCapacity, what: str) -> None:
        """OutOfRange naming the request as asked (`requested`; `size` is it rounded up to extents)."""
        if size <= max_bytes:
            return
        key = POLICY_KEY.format(backend=self.name)
        raise OutOfRange(
            f"{what} {requested} bytes ({human_bytes(requested)}) is above the limit of backend {self.name}, "
            f"{max_bytes} bytes "
            f"({human_bytes(max_bytes)}): a volume may be at most the thin pool's size "
            f"({human_bytes(capacity.size_bytes)}) times {key} ({self.over_provisioning_ratio:g}), and never more "
            f"than {human_bytes(MAX_VOLUME_BYTES)}"
        )

    def _owned(self, info: LvInfo | None, kind: str) -> TypeGuard[LvInfo]:
        return (
            info is not None and info.meta.get(meta_keys.KEY_KIND) == kind and info.meta.get(KEY_BACKEND) == self.name
        )

    # --- conversions ---

    def _volume(self, info: LvInfo) -> Volume:
        source_text = info.meta.get(meta_keys.KEY_SOURCE, "")
        return Volume(
            lv=info.name,
            name=info.meta.get(meta_keys.KEY_NAME, ""),
            size_bytes=info.size_bytes,
            parameters=meta_keys.meta_to_params(info.meta),
            source=ContentSource.decode(source_text) if source_text else None,
            published=_published(info),
            ready=info.meta.get(meta_keys.KEY_STATE) == meta_keys.STATE_READY,
            active=info.active,
            context={
                "protocol": self.protocol,
                "backend": self.name,
                **self.exporter.volume_context(info.name),
            },
            mutable=meta_keys.meta_to_params(info.meta, meta_keys.MUTABLE_PREFIX),
        )

    def _snapshot(self, info: LvInfo) -> Snapshot:
        return Snapshot(
            lv=info.name,
            name=info.meta.get(meta_keys.KEY_NAME, ""),
            source_lv=_source_lv(info),
            size_bytes=info.size_bytes,
            created=info.created or datetime.now(UTC),
            group=info.meta.get(meta_keys.KEY_GROUP, ""),
        )


def _over_threshold(capacity: PoolCapacity, threshold_percent: float) -> bool:
    return max(capacity.data_percent, capacity.metadata_percent) >= threshold_percent


def _source_lv(info: LvInfo) -> str:
    source = ContentSource.decode(info.meta.get(meta_keys.KEY_SOURCE, ""))
    return source.lv if source else ""


def _meta_matches(info: LvInfo, meta: Mapping[str, str]) -> bool:
    return all(info.meta.get(k) == v for k, v in meta.items())


def by_pool(backends: Iterable[LvmBackend]) -> list[list[LvmBackend]]:
    """Backends grouped by the thin pool they share (same runner, VG and pool), so one lvs serves each group."""
    groups: dict[tuple[object, ...], list[LvmBackend]] = {}
    for backend in backends:
        groups.setdefault(backend.pool.key, []).append(backend)
    return list(groups.values())


def publications_of(group: Sequence[LvmBackend], node_id: str, view: PoolView | None = None) -> int:
    """Volumes of the backends of one thin pool (a group of by_pool) published to node_id, from one lvs (or from
    `view`, that pool as the caller just read it)."""
    names = {backend.name for backend in group}
    key = PUBLISHED_PREFIX + node_id
    kind = {meta_keys.KEY_KIND: KIND_VOLUME}
    volumes = view.list(kind) if view is not None else group[0].pool.list(kind)
    return sum(1 for info in volumes if info.meta.get(KEY_BACKEND) in names and key in info.meta)


def human_bytes(size: int) -> str:
    """1073741824 → '1 GiB', 5.1 PiB stays readable; for messages only."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            break
        value /= 1024
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def _comparable(key: str) -> bool:
    """Whether a retried CreateVolume must match this key. Mutable parameters need not: ModifyVolume may have
    changed them since the first CreateVolume."""
    return key not in (meta_keys.KEY_STATE, meta_keys.KEY_CREATED) and not key.startswith(
        (PUBLISHED_PREFIX, meta_keys.MUTABLE_PREFIX)
    )


def _published(info: LvInfo) -> dict[str, bool]:
    return {
        key.removeprefix(PUBLISHED_PREFIX): value == "ro"
        for key, value in info.meta.items()
        if key.startswith(PUBLISHED_PREFIX)
    }
