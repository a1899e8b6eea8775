"""thin_metadata, the controller's side of snapshot metadata: which snapshots may be read, the host calls page by
page (each through the restricted host's forced command, as FakeRunner checks), bytes from chunks, errors."""

from __future__ import annotations

import json
import threading

import pytest

from csi_driver.storage import tags, thin_metadata
from csi_driver.storage import thin_metadata_host as host_side
from csi_driver.storage.backend import LvmBackend
from csi_driver.storage.errors import (
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
from csi_driver.storage.lvm import ThinPool
from csi_driver.storage.thin_metadata import ByteRange, allocated_blocks, changed_blocks

from ..fakes import FakeExporter
from .fakes import FakeRunner, lv_row, lvs_json

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 192 * KiB  # a chunk size that does not divide the volume: the last range is cut at the volume's end
SIZE = 4 * MiB  # 21 chunks and a third
BASE, TARGET, OTHER, VOLUME = "snap-aaaaaaaaaaaaaaaaaaaa", "snap-bbbbbbbbbbbbbbbbbbbb", "snap-cccccccccccccccccccc", \
    "vol-dddddddddddddddddddd"  # fmt: skip


def snapshot_row(name: str, thin_id: int, source: str = "vol-1", backend: str = "blk", size: int = SIZE) -> dict:
    meta = {"name": f"csi-{name}", "kind": "snapshot", "backend": backend, "src": f"volume:{source}"}
    return lv_row(name, size, tags.encode_tags(meta), attr="Vri-a-tz-k", origin=source, thin_id=str(thin_id))


class FakeHost:
    """The storage host: lvs answers with the pool and its LVs; the host program pages through `chunks` (begin,
    length in chunks) with the real program's RangeCollector, and records every request."""

    def __init__(self, runner: FakeRunner, chunks: list[tuple[int, int]]):
        self.chunks = chunks
        self.requests: list[dict] = []
        self.answer: dict | None = None  # instead of a page
        volume_tags = tags.encode_tags({"kind": "volume", "backend": "blk"})
        self.rows = [lv_row("pool", 1 << 30, attr="twi-aotz--", pool=""), snapshot_row(BASE, 7),
                     snapshot_row(TARGET, 9), snapshot_row(OTHER, 11, source="vol-2"),
                     lv_row(VOLUME, SIZE, volume_tags, thin_id="3")]  # fmt: skip
        runner.on_call("lvs", responder=lambda argv, _: (0, lvs_json(*self.rows), ""))
        runner.on_call("python3", responder=self.program)

    def program(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        assert argv[1:3] == ["-c", thin_metadata.host_program()] and len(argv) == 3, "one-shot, never --serve"
        request = host_side.validate_request(json.loads(stdin or b""))
        self.requests.append(request)
        if self.answer is not None:
            return 0, json.dumps(self.answer) + "\n", ""
        collector = host_side.RangeCollector(request["max_ranges"])
        collector.start = request["start_byte"] // CHUNK
        for begin, length in self.chunks:
            collector.add(begin, length)
        result = {"chunk_bytes": CHUNK, "ranges": collector.flat(), "next_chunk": collector.next_chunk, "warnings": []}
        return 0, json.dumps({"ok": True, "result": result}) + "\n", ""


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


def backend_on(runner: FakeRunner, protocol: str = "iscsi") -> LvmBackend:
    return LvmBackend("blk", ThinPool(runner, "berth", "pool"), FakeExporter(protocol))


def test_allocated_ranges_are_bytes_of_whole_chunks_cut_at_the_volumes_end(runner):
    host = FakeHost(runner, [(0, 2), (5, 1), (21, 1)])
    blocks = allocated_blocks(backend_on(runner), TARGET, 0)
    assert blocks.size_bytes == SIZE
    assert list(blocks.ranges) == [ByteRange(0, 2 * CHUNK), ByteRange(5 * CHUNK, CHUNK),
                                   ByteRange(21 * CHUNK, SIZE - 21 * CHUNK)]  # fmt: skip
    (request,) = host.requests
    assert request["op"] == "allocated" and request["thin_ids"] == [9] and (request["vg"], request["pool"]) == (
        "berth", "pool")  # fmt: skip
    assert request["budget_seconds"] == thin_metadata.METADATA_TIMEOUT - 30, "the host stops before our timeout"


def test_the_host_is_read_only_when_the_ranges_are(runner):
    host = FakeHost(runner, [(0, 1)])
    blocks = allocated_blocks(backend_on(runner), TARGET, 0)
    assert host.requests == [] and runner.argvs("lvs"), "the snapshot is checked at once, its chunks read lazily"
    assert next(blocks.ranges) == ByteRange(0, CHUNK) and len(host.requests) == 1


def test_ranges_come_page_by_page_in_order(runner, monkeypatch):
    monkeypatch.setattr(thin_metadata, "PAGE_RANGES", 2)
    host = FakeHost(runner, [(0, 1), (2, 1), (4, 2), (6, 1), (9, 1), (12, 3)])  # 4-5 and 6 touch: one range
    ranges = list(changed_blocks(backend_on(runner), BASE, TARGET, 0).ranges)
    assert [(r.offset // CHUNK, r.length // CHUNK) for r in ranges] == [(0, 1), (2, 1), (4, 3), (9, 1), (12, 3)]
    assert [r["start_byte"] for r in host.requests] == [0, 4 * CHUNK, 12 * CHUNK]
    assert all(r["thin_ids"] == [7, 9] and r["op"] == "delta" for r in host.requests)


def test_a_starting_offset_starts_at_its_chunk(runner):
    host = FakeHost(runner, [(0, 4), (8, 1)])
    ranges = list(changed_blocks(backend_on(runner), BASE, TARGET, 2 * CHUNK + 5).ranges)
    assert ranges == [ByteRange(2 * CHUNK, 2 * CHUNK), ByteRange(8 * CHUNK, CHUNK)]
    assert host.requests[0]["start_byte"] == 2 * CHUNK + 5


def test_an_offset_at_the_end_reads_nothing_and_beyond_it_is_out_of_range(runner):
    host = FakeHost(runner, [(0, 1)])
    assert list(allocated_blocks(backend_on(runner), TARGET, SIZE).ranges) == [] and host.requests == []
    with pytest.raises(OutOfRange, match=f"starting_offset {SIZE + 1} is outside snapshot blk/{TARGET}"):
        allocated_blocks(backend_on(runner), TARGET, SIZE + 1)


def test_unknown_snapshots_and_volumes_are_not_found(runner):
    FakeHost(runner, [])
    with pytest.raises(NotFound, match="snapshot blk/snap-0000"):
        allocated_blocks(backend_on(runner), "snap-0000", 0)
    with pytest.raises(NotFound, match=f"snapshot blk/{VOLUME} not found"):
        changed_blocks(backend_on(runner), BASE, VOLUME, 0)


def test_snapshots_of_two_volumes_have_no_delta(runner):
    FakeHost(runner, [])
    with pytest.raises(InvalidRequest, match="of volume vol-1.*of volume vol-2.*different volumes"):
        changed_blocks(backend_on(runner), BASE, OTHER, 0)


def test_file_volumes_have_no_block_metadata(runner):
    host = FakeHost(runner, [(0, 1)])
    with pytest.raises(NotSupported, match="block volumes only"):
        allocated_blocks(backend_on(runner, "nfs"), TARGET, 0)
    assert host.requests == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"kind": "not_found", "message": "Unable to find mapping tree for snap2 (9)"}, NotFound),
        ({"kind": "busy", "message": "another snapshot metadata read"}, Busy),
        ({"kind": "host_not_ready", "message": "thin_delta is not installed"}, HostNotReady),
        ({"kind": "timeout", "argv": ["thin_delta"], "timeout": 270}, CommandTimeout),
        ({"kind": "failed", "argv": ["thin_delta"], "rc": 1, "stderr": "metadata contains errors"}, CommandFailed),
        ({"kind": "internal", "message": "OSError: disk full"}, StorageError),
    ],
)
def test_host_errors_become_domain_errors(runner, error, expected):
    host = FakeHost(runner, [])
    host.answer = {"ok": False, "error": error}
    with pytest.raises(StorageError) as caught:
        list(changed_blocks(backend_on(runner), BASE, TARGET, 0).ranges)
    assert type(caught.value) is expected
    assert error.get("message", error.get("stderr", "thin_delta")) in str(caught.value)


@pytest.mark.parametrize(
    "result",
    [
        {"chunk_bytes": 0, "ranges": []},
        {"chunk_bytes": CHUNK, "ranges": [1]},
        {"chunk_bytes": CHUNK, "ranges": ["1", 1]},
        {"chunk_bytes": CHUNK, "ranges": [], "next_chunk": "2"},
        {"chunk_bytes": CHUNK, "ranges": [0, 1], "next_chunk": 0},  # would ask for the same page for ever
    ],
)
def test_an_answer_that_makes_no_sense_is_an_error(runner, result):
    host = FakeHost(runner, [])
    host.answer = {"ok": True, "result": result}
    with pytest.raises(StorageError, match="makes no sense|does not advance"):
        list(allocated_blocks(backend_on(runner), TARGET, 0).ranges)


def test_one_host_call_per_pool_at_a_time(runner, monkeypatch):
    """A pool has one metadata snapshot: a second reader of the same pool (any backend on it) waits here, within a
    bound, not on the host where it would hold one of the few SSH sessions."""
    FakeHost(runner, [(0, 1)])
    backend = backend_on(runner)
    lock = thin_metadata.POOL_LOCKS.of(backend.pool)
    assert thin_metadata.POOL_LOCKS.of(ThinPool(runner, "berth", "pool")) is lock
    assert thin_metadata.POOL_LOCKS.of(ThinPool(runner, "berth", "pool2")) is not lock
    monkeypatch.setattr(thin_metadata, "POOL_WAIT_SECONDS", 0.2)
    with lock:
        with pytest.raises(Busy, match="thin pool berth/pool"):
            list(allocated_blocks(backend, TARGET, 0).ranges)
    monkeypatch.setattr(thin_metadata, "POOL_WAIT_SECONDS", 30)
    lock.acquire()
    threading.Timer(0.2, lock.release).start()
    assert list(allocated_blocks(backend, TARGET, 0).ranges) == [ByteRange(0, CHUNK)], "it waited its turn"
