"""A backend: one LVM thin pool on one storage host, plus the protocol that exports its volumes.

Everything a volume is (CSI name, parameters, content source, creation state, which nodes it is published to)
is kept in the LV's tags, so a restarted controller finds it all again and keeps no database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

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
from .ids import snapshot_lv_name, volume_lv_name
from .lvm import LvInfo, PoolCapacity, ThinPool

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


@dataclass(frozen=True)
class Snapshot:
    lv: str
    name: str
    source_lv: str
    size_bytes: int
    created: datetime


# mkfs refuses smaller devices: xfsprogs 5.19+ needs 300 MiB ("300MB"). ext4 has no practical minimum here.
FILESYSTEM_MINIMUM_BYTES = {"xfs": 300 << 20}


def filesystem_minimum_bytes(fs_type: str) -> int:
    return FILESYSTEM_MINIMUM_BYTES.get(fs_type, 0)


class Exporter(Protocol):
    """What differs between iSCSI and NFS: how a volume is made reachable, and by whom."""

    protocol: str

    def volume_context(self, lv: str) -> dict[str, str]:
        """What a node needs besides the publish context (e.g. the LUN's WWN, the NFS export path)."""
        ...

    def minimum_bytes(self, parameters: Mapping[str, str]) -> int:
        """The smallest volume that works with these StorageClass parameters (e.g. the filesystem's minimum)."""
        ...

    def check_parameters(self, parameters: Mapping[str, str]) -> None:
        """Refuse (InvalidRequest) StorageClass parameters this protocol cannot honour, before anything is made."""
        ...

    def prepare(self, lv: LvInfo, fresh: bool, max_bytes: int) -> None:
        """Make a new (or half-created) volume exportable, e.g. create its filesystem when `fresh`; a clone's
        filesystem grows to its LV. max_bytes: the backend's size limit (the host refuses to grow beyond it)."""
        ...

    def publish(self, lv: LvInfo, node: NodeRef, readonly: bool, secrets: Mapping[str, str]) -> dict[str, str]:
        """Let `node` reach the volume; returns publish_context. Idempotent."""
        ...

    def unpublish(self, lv: LvInfo, node: NodeRef) -> None:
        """Take `node`'s access away. Idempotent."""
        ...

    def teardown(self, lv: LvInfo) -> None:
        """Remove every export of the volume before the LV goes. Idempotent."""
        ...

    def grown(self, lv: LvInfo, max_bytes: int) -> bool:
        """Called after the LV grew, and on every retry of an expansion (so a grow that failed half-way is
        finished); returns whether the node must also expand (NodeExpandVolume). Idempotent."""
        ...

    @contextmanager
    def consistent(self, lv: LvInfo) -> Iterator[None]:
        """Hold the volume consistent (e.g. a frozen filesystem) while a snapshot is taken."""
        ...


class LvmBackend:
    def __init__(self, name: str, pool: ThinPool, exporter: Exporter, over_provisioning_ratio: float = 1.0):
        self.name = name
        self.pool = pool
        self.exporter = exporter
        self.over_provisioning_ratio = over_provisioning_ratio

    @property
    def protocol(self) -> str:
        return self.exporter.protocol

    # --- volumes ---

    def create_volume(
        self,
        name: str,
        required_bytes: int,
        limit_bytes: int,
        parameters: Mapping[str, str],
        source: ContentSource | None,
        default_bytes: int = 0,
    ) -> Volume:
        """Create, or finish creating, the volume for CSI name `name`; same name + same request → same volume.

        required_bytes 0 means "no size asked": a clone takes its source's size, a new volume default_bytes.
        Raises OutOfRange (above the backend's size limit, below the filesystem's minimum or the source's size, or
        beyond limit_bytes) and CapacityExhausted (the pool may not promise that much more) before anything is made;
        AlreadyExists for the same name with another request; NotFound for a missing source.
        """
        lv = volume_lv_name(self.name, name)
        meta = {
            meta_keys.KEY_NAME: name,
            meta_keys.KEY_KIND: KIND_VOLUME,
            KEY_BACKEND: self.name,
            **meta_keys.params_to_meta(parameters),
        }
        if source is not None:
            meta[meta_keys.KEY_SOURCE] = source.encode()
        existing = self.pool.find(lv)
        max_bytes: int | None = None
        if existing is not None:
            self._check_same_request(existing, meta, required_bytes, limit_bytes)
        else:
            self._check_parameters(parameters)
            source_info = self._source_info(source) if source is not None else None
            size = self._new_volume_size(required_bytes, limit_bytes, parameters, source_info, default_bytes)
            capacity = self.pool.capacity()
            max_bytes = self._size_limit(capacity)
            self._check_limit(size, required_bytes or size, max_bytes, capacity, "requested size")
            available = self._available(capacity)
            if size > available:
                raise CapacityExhausted(
                    f"backend {self.name} can offer {available} more bytes (thin pool free space x "
                    f"over-provisioning ratio {self.over_provisioning_ratio}); {size} requested"
                )
            creating = {**meta, meta_keys.KEY_STATE: meta_keys.STATE_CREATING}
            if source_info is None:
                existing = self.pool.create_volume(lv, size, creating)
            else:
                existing = self.pool.clone(source_info.name, lv, size, creating)
        if existing.meta.get(meta_keys.KEY_STATE) != meta_keys.STATE_READY:
            # A fresh LV, or one a crashed earlier attempt left half-made: finish it.
            if max_bytes is None:
                max_bytes = self.size_limit()
            try:
                self.exporter.prepare(existing, fresh=source is None, max_bytes=max_bytes)
            except StorageError as err:
                if not isinstance(err, TRANSIENT_ERRORS):
                    self._discard_unfinished(existing, err)
                raise
            existing = self.pool.update_meta(lv, {meta_keys.KEY_STATE: meta_keys.STATE_READY})
        return self._volume(existing)

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
    ) -> int:
        """The size a new volume gets: what was asked (or its source's size, or the default), at least the
        filesystem's minimum and the source's size, rounded up to extents; OutOfRange when that breaks limit_bytes."""
        if not required_bytes:
            # No size asked: a clone is as large as its source, a new volume gets the default.
            required_bytes = source.size_bytes if source is not None else default_bytes
        minimum = self.exporter.minimum_bytes(parameters)
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

    def _source_info(self, source: ContentSource) -> LvInfo:
        info = self.pool.find(source.lv)
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

    def get_volume(self, lv: str) -> Volume:
        info = self.pool.find(lv)
        if not self._owned(info, KIND_VOLUME):
            raise NotFound(f"volume {self.name}/{lv} not found")
        return self._volume(info)

    def list_volumes(self) -> list[Volume]:
        return [self._volume(i) for i in self.pool.list({meta_keys.KEY_KIND: KIND_VOLUME, KEY_BACKEND: self.name})]

    def delete_volume(self, lv: str) -> None:
        """Remove the volume; a missing one is fine. Thin snapshots of it stay valid (they share no LV)."""
        info = self.pool.find(lv)
        if not self._owned(info, KIND_VOLUME):
            return
        published = _published(info)
        if published:
            raise InUse(f"volume {self.name}/{lv} is still published to {', '.join(sorted(published))}")
        self.exporter.teardown(info)
        self.pool.remove(lv)

    def expand_volume(self, lv: str, required_bytes: int, limit_bytes: int) -> tuple[int, bool]:
        """Grow the volume; returns (new size, whether the node must expand too).

        OutOfRange above the backend's size limit, CapacityExhausted when the growth does not fit what the pool
        may still promise; both before anything on the host changes.
        """
        volume = self.get_volume(lv)
        size = self.pool.round_size(required_bytes)
        if limit_bytes and size > limit_bytes:
            raise OutOfRange(f"capacity {required_bytes} rounds up to {size}, above the limit {limit_bytes}")
        capacity = self.pool.capacity()
        max_bytes = self._size_limit(capacity)
        if size > volume.size_bytes:
            self._check_limit(size, required_bytes, max_bytes, capacity, "expansion to")
            available = self._available(capacity)
            if size - volume.size_bytes > available:
                raise CapacityExhausted(
                    f"growing {self.name}/{lv} by {size - volume.size_bytes} bytes needs more than the {available} "
                    f"bytes backend {self.name} can still offer (thin pool free space x over-provisioning ratio "
                    f"{self.over_provisioning_ratio})"
                )
            self.pool.resize(lv, size)
        # Also when the LV already had the size: a retry after lvextend succeeded and the filesystem grow failed
        # must still grow the filesystem (the exporter checks whether it is smaller than the LV).
        grown = self.pool.get(lv)
        return grown.size_bytes, self.exporter.grown(grown, max_bytes)

    # --- publication ---

    def publish(
        self, lv: str, node: NodeRef, readonly: bool, multi_node: bool, secrets: Mapping[str, str]
    ) -> dict[str, str]:
        info = self._ready_volume(lv)
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
        # Record after the export exists: a crash in between leaves an export Unpublish still removes.
        self.pool.update_meta(lv, {PUBLISHED_PREFIX + node.node_id: "ro" if readonly else "rw"})
        return context

    def unpublish(self, lv: str, node: NodeRef) -> None:
        info = self.pool.find(lv)
        if info is None:
            return  # a deleted volume is unpublished everywhere
        self.exporter.unpublish(info, node)
        self.pool.update_meta(lv, {PUBLISHED_PREFIX + node.node_id: None})

    def publications_of(self, node_id: str) -> int:
        return sum(1 for volume in self.list_volumes() if node_id in volume.published)

    def _ready_volume(self, lv: str) -> LvInfo:
        info = self.pool.find(lv)
        if not self._owned(info, KIND_VOLUME):
            raise NotFound(f"volume {self.name}/{lv} not found")
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
        existing = self.pool.find(lv)
        if existing is not None:
            if any(existing.meta.get(key) != value for key, value in meta.items()):
                raise AlreadyExists(f"snapshot {name!r} already exists for another source volume")
            return self._snapshot(existing)
        source = self._ready_volume(source_lv)
        with self.exporter.consistent(source):
            info = self.pool.snapshot(source_lv, lv, meta, read_only=True)
        return self._snapshot(info)

    def get_snapshot(self, lv: str) -> Snapshot:
        info = self.pool.find(lv)
        if not self._owned(info, KIND_SNAPSHOT):
            raise NotFound(f"snapshot {self.name}/{lv} not found")
        return self._snapshot(info)

    def list_snapshots(self) -> list[Snapshot]:
        return [self._snapshot(i) for i in self.pool.list({meta_keys.KEY_KIND: KIND_SNAPSHOT, KEY_BACKEND: self.name})]

    def delete_snapshot(self, lv: str) -> None:
        info = self.pool.find(lv)
        if info is None:
            return
        if not self._owned(info, KIND_SNAPSHOT):
            return
        self.pool.remove(lv)

    # --- capacity ---

    def available_bytes(self) -> int:
        return self._available(self.pool.capacity())

    def _available(self, capacity: PoolCapacity) -> int:
        promised = sum(v.size_bytes for v in self.list_volumes())
        # Thin pools promise more than they hold: offer the ratio times the pool, minus what is promised,
        # but never more than what is physically free times the ratio.
        by_ratio = int(capacity.size_bytes * self.over_provisioning_ratio) - promised
        return max(0, min(by_ratio, int(capacity.free_bytes * self.over_provisioning_ratio)))

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

    def _owned(self, info: LvInfo | None, kind: str) -> bool:
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
        )

    def _snapshot(self, info: LvInfo) -> Snapshot:
        source = ContentSource.decode(info.meta.get(meta_keys.KEY_SOURCE, ""))
        return Snapshot(
            lv=info.name,
            name=info.meta.get(meta_keys.KEY_NAME, ""),
            source_lv=source.lv if source else "",
            size_bytes=info.size_bytes,
            created=info.created or datetime.now(UTC),
        )


def human_bytes(size: int) -> str:
    """1073741824 → '1 GiB', 5.1 PiB stays readable; for messages only."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            break
        value /= 1024
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def _comparable(key: str) -> bool:
    return key not in (meta_keys.KEY_STATE, meta_keys.KEY_CREATED) and not key.startswith(PUBLISHED_PREFIX)


def _published(info: LvInfo) -> dict[str, bool]:
    return {
        key.removeprefix(PUBLISHED_PREFIX): value == "ro"
        for key, value in info.meta.items()
        if key.startswith(PUBLISHED_PREFIX)
    }
