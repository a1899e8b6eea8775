"""Which bytes of a snapshot hold data, and which changed between two snapshots of a volume: the storage side of the
CSI SnapshotMetadata service, read from dm-thin's own metadata on the storage host (thin_metadata_host.py).

Only block volumes have a meaning here (iSCSI backends); an NFS volume's users see files, not its LV's chunks. The
ranges come from the host a page at a time, as the caller consumes them: one host call (one metadata snapshot, one
run of thin_delta or thin_dump) per PAGE_RANGES ranges, so neither the host's answer nor the controller's memory grows
with the volume. See docs/snapshot-metadata.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from . import tags as meta_keys
from . import thin_metadata_host
from .backend import LvmBackend
from .errors import (
    Busy,
    CommandFailed,
    CommandTimeout,
    HostNotReady,
    InvalidRequest,
    NotFound,
    NotSupported,
    OutOfRange,
    StorageError,
)
from .lvm import LvInfo, ThinPool
from .runner import HOST_START_MARGIN, call_host_program, host_program_source

log = logging.getLogger("berth.storage.thin_metadata")

# A host call reads the pool's whole mapping of the devices (thin_delta has no start offset), so it is given long:
# about 1 TiB of 64 KiB chunks under an emulated CPU (docs/snapshot-metadata.md). The sidecar's own default limit
# for a whole stream is 10 minutes.
METADATA_TIMEOUT = 300.0
# Ranges per host call: its JSON answer stays under about 6 MB, far below what the runner reads at once.
PAGE_RANGES = 200_000
# How long a request waits while another one reads the same pool's metadata from this controller (one metadata
# snapshot per pool; waiting here, not on the host, keeps the host's few SSH sessions free for other calls).
POOL_WAIT_SECONDS = 120.0
BLOCK_PROTOCOLS = frozenset({"iscsi"})

_KIND_TO_ERROR: dict[str, type[StorageError]] = {
    "invalid": InvalidRequest,
    "not_found": NotFound,
    "busy": Busy,
    "host_not_ready": HostNotReady,
}


@dataclass(frozen=True)
class ByteRange:
    offset: int
    length: int


@dataclass(frozen=True)
class BlockMap:
    """A snapshot's (or a pair's) ranges: the volume's size, and the ranges in ascending byte order, each a whole
    number of pool chunks (the last one cut at the volume's end), adjacent ones merged. `ranges` reads the host
    lazily, so iterating it raises the host's errors: NotFound (a snapshot deleted meanwhile), Busy (the pool's
    metadata stayed taken), HostNotReady, HostUnreachable, CommandFailed, CommandTimeout, StorageError."""

    size_bytes: int
    ranges: Iterator[ByteRange]


def allocated_blocks(backend: LvmBackend, snapshot_lv: str, starting_offset: int) -> BlockMap:
    """The ranges of the snapshot that hold data (every chunk ever written and not discarded), from the chunk holding
    `starting_offset` on. NotFound, NotSupported (not a block volume's), OutOfRange (offset beyond the snapshot)."""
    (snapshot,) = backend.snapshot_lvs(snapshot_lv)
    _check_block_backend(backend)
    _check_offset(starting_offset, snapshot, backend)
    pages = _Pages(backend.pool, "allocated", [_thin_id(snapshot)])
    return BlockMap(snapshot.size_bytes, pages.ranges(starting_offset, snapshot.size_bytes))


def changed_blocks(backend: LvmBackend, base_lv: str, target_lv: str, starting_offset: int) -> BlockMap:
    """The ranges that differ between two snapshots of one volume (written, overwritten or discarded in between),
    from the chunk holding `starting_offset` on, up to the target's size. NotFound, NotSupported, OutOfRange, and
    InvalidRequest for snapshots of two different volumes."""
    base, target = backend.snapshot_lvs(base_lv, target_lv)
    _check_block_backend(backend)
    base_source, target_source = (info.meta.get(meta_keys.KEY_SOURCE, "") for info in (base, target))
    if base_source != target_source:
        raise InvalidRequest(
            f"snapshots {backend.name}/{base_lv} ({_origin(base_source)}) and {backend.name}/{target_lv} "
            f"({_origin(target_source)}) are of different volumes; a delta compares two snapshots of one volume"
        )
    _check_offset(starting_offset, target, backend)
    pages = _Pages(backend.pool, "delta", [_thin_id(base), _thin_id(target)])
    return BlockMap(target.size_bytes, pages.ranges(starting_offset, target.size_bytes))


def _check_block_backend(backend: LvmBackend) -> None:
    if backend.protocol not in BLOCK_PROTOCOLS:
        raise NotSupported(
            f"backend {backend.name} serves {backend.protocol} file volumes: snapshot metadata (allocated and "
            "changed blocks) is offered for block volumes only (iSCSI backends); back the volume up in full"
        )


def _check_offset(starting_offset: int, snapshot: LvInfo, backend: LvmBackend) -> None:
    if not 0 <= starting_offset <= snapshot.size_bytes:
        raise OutOfRange(
            f"starting_offset {starting_offset} is outside snapshot {backend.name}/{snapshot.name}, whose volume "
            f"has {snapshot.size_bytes} bytes"
        )


def _thin_id(snapshot: LvInfo) -> int:
    if snapshot.thin_id is None:
        raise StorageError(f"lvs reported no thin id for {snapshot.vg}/{snapshot.name}")
    return snapshot.thin_id


def _origin(source: str) -> str:
    kind, _, lv = source.partition(":")
    return f"of {kind} {lv}" if lv else "of no recorded volume"


def host_program() -> str:
    return host_program_source("thin_metadata_host.py")


class _PoolLocks:
    """One host call per thin pool at a time from this controller (backends sharing a pool share its lock)."""

    def __init__(self) -> None:
        self._locks: dict[tuple[object, ...], threading.Lock] = {}
        self._guard = threading.Lock()

    def of(self, pool: ThinPool) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(pool.key, threading.Lock())


POOL_LOCKS = _PoolLocks()


@dataclass(frozen=True)
class _Page:
    chunk_bytes: int
    chunks: list[tuple[int, int]]  # (begin, length) in chunks
    next_chunk: int | None


class _Pages:
    """The ranges of one request, fetched from the host page by page."""

    def __init__(self, pool: ThinPool, op: str, thin_ids: list[int]):
        self.pool = pool
        self.op = op
        self.thin_ids = thin_ids

    def ranges(self, start: int, end: int) -> Iterator[ByteRange]:
        """Byte ranges from the chunk holding `start` on, cut at `end` (the volume's size)."""
        while start < end:
            page = self._fetch(start)
            for begin, length in page.chunks:
                offset = begin * page.chunk_bytes
                if offset >= end:
                    return
                yield ByteRange(offset, min((begin + length) * page.chunk_bytes, end) - offset)
            if page.next_chunk is None:
                return
            if page.next_chunk * page.chunk_bytes <= start:
                raise StorageError(f"the storage host's next page (chunk {page.next_chunk}) does not advance")
            start = page.next_chunk * page.chunk_bytes

    def _fetch(self, start: int) -> _Page:
        request = {
            "v": thin_metadata_host.PROTOCOL,
            "op": self.op,
            "vg": self.pool.vg,
            "pool": self.pool.pool,
            "thin_ids": self.thin_ids,
            "start_byte": start,
            "max_ranges": PAGE_RANGES,
            "budget_seconds": METADATA_TIMEOUT - HOST_START_MARGIN,
        }
        lock = POOL_LOCKS.of(self.pool)
        if not lock.acquire(timeout=POOL_WAIT_SECONDS):
            raise Busy(
                f"another snapshot metadata request has read thin pool {self.pool.vg}/{self.pool.pool} for over "
                f"{POOL_WAIT_SECONDS:g} s (a pool has one metadata snapshot at a time); retry later"
            )
        try:
            response = call_host_program(
                self.pool.runner, "python3", host_program(), "thin_metadata_host", request, METADATA_TIMEOUT,
                resident=False,
            )  # fmt: skip
        finally:
            lock.release()
        if not response.get("ok"):
            raise _error(self.op, response.get("error") or {})
        return _page(response.get("result") or {})


def _page(result: Mapping[str, Any]) -> _Page:
    for warning in result.get("warnings") or []:
        log.warning("snapshot metadata: %s", warning)
    flat = result.get("ranges")
    chunk_bytes, next_chunk = result.get("chunk_bytes"), result.get("next_chunk")
    if not (
        isinstance(chunk_bytes, int) and chunk_bytes > 0
        and isinstance(flat, list) and len(flat) % 2 == 0 and all(isinstance(n, int) and n >= 0 for n in flat)
        and (next_chunk is None or isinstance(next_chunk, int))
    ):  # fmt: skip
        raise StorageError(f"the storage host's snapshot metadata answer makes no sense: {dict(result)!r:.300}")
    return _Page(chunk_bytes, list(zip(flat[::2], flat[1::2], strict=True)), next_chunk)


def _error(op: str, err: Mapping[str, Any]) -> StorageError:
    kind = err.get("kind", "")
    if kind == "timeout":
        return CommandTimeout(list(err.get("argv") or [op]), float(err.get("timeout") or 0))
    if kind == "failed":
        return CommandFailed(list(err.get("argv") or [op]), int(err.get("rc", -1)), str(err.get("stderr", "")))
    return _KIND_TO_ERROR.get(kind, StorageError)(f"snapshot metadata ({op}): {err.get('message', 'unknown error')}")
