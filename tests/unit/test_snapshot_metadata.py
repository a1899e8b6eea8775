"""The SnapshotMetadata service end to end over real gRPC: the servicer, the storage layer, and the real host program
run as `python3 -c <source>` by a LocalRunner, against fake lvs / dmsetup / thin_delta / thin_dump on its PATH."""

from __future__ import annotations

import os
import sys

import grpc
import pytest
import yaml

from csi_driver import cli
from csi_driver.config import parse_config
from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.server.endpoint import parse_endpoint
from csi_driver.server.grpc_server import CsiServer, ServerOptions
from csi_driver.services import snapshot_metadata
from csi_driver.services.identity import IdentityService
from csi_driver.services.snapshot_metadata import SnapshotMetadataService
from csi_driver.storage import tags, thin_metadata
from csi_driver.storage.backend import LvmBackend
from csi_driver.storage.lvm import ThinPool
from csi_driver.storage.runner import LocalRunner
from tests.unit.fakes import FakeExporter
from tests.unit.storage.fakes import (
    DELTA_CHUNKS,
    DUMP_CHUNKS,
    THIN_DELTA_XML,
    THIN_DUMP_XML,
    FakeThinTools,
    lv_row,
    lvs_json,
)

CHUNK = 64 << 10
SIZE = 64 * CHUNK  # 4 MiB
BASE, TARGET, OTHER, EMPTY = (f"blk/snap-{c * 20}" for c in "abce")
FILES = "files/snap-" + "f" * 20
Status = grpc.StatusCode


def snapshot_row(snapshot_id: str, thin_id: int, source: str = "vol-1", size: int = SIZE) -> dict:
    backend, lv = snapshot_id.split("/")
    meta = {"name": f"csi-{lv}", "kind": "snapshot", "backend": backend, "src": f"volume:{source}"}
    return lv_row(lv, size, tags.encode_tags(meta), attr="Vri-a-tz-k", origin=source, thin_id=str(thin_id))


@pytest.fixture
def host(tmp_path) -> FakeThinTools:
    tools = FakeThinTools(tmp_path)
    rows = [lv_row("pool", 1 << 30, attr="twi-aotz--", pool=""), snapshot_row(BASE, 7), snapshot_row(TARGET, 9),
            snapshot_row(OTHER, 11, source="vol-2"), snapshot_row(EMPTY, 12), snapshot_row(FILES, 13)]  # fmt: skip
    (tools.dir / "lvs.json").write_text(lvs_json(*rows))
    tools.output(THIN_DELTA_XML)
    return tools


@pytest.fixture
def stub(host, tmp_path, monkeypatch):
    # As on a storage host, the program finds no csi_driver to import: the interpreter itself (not this virtualenv),
    # no PYTHONPATH, and a working directory (on sys.path with -c) outside this checkout.
    (host.bin / "python3").symlink_to(os.path.realpath(sys.executable))
    monkeypatch.chdir(tmp_path)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(host.env(), BERTH_THIN_METADATA_DIR=str(tmp_path / "state"))
    runner = LocalRunner(env=env)
    backends = {
        "blk": LvmBackend("blk", ThinPool(runner, "berth", "pool"), FakeExporter("iscsi")),
        "files": LvmBackend("files", ThinPool(runner, "berth", "pool"), FakeExporter("nfs")),
    }
    service = SnapshotMetadataService(backends)
    server = CsiServer(
        parse_endpoint(f"unix://{tmp_path}/csi.sock"),
        [lambda s: csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(service, s)],
        ServerOptions(),
    )
    server.start()
    channel = grpc.insecure_channel(f"unix:{tmp_path}/csi.sock")
    yield csi_pb2_grpc.SnapshotMetadataStub(channel)
    channel.close()
    server.stop(0)
    runner.close()


def allocated(stub, snapshot_id=TARGET, **fields) -> list[csi_pb2.GetMetadataAllocatedResponse]:
    request = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snapshot_id, **fields)
    return list(stub.GetMetadataAllocated(request, timeout=60))


def delta(stub, base=BASE, target=TARGET, **fields) -> list[csi_pb2.GetMetadataDeltaResponse]:
    request = csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=base, target_snapshot_id=target, **fields)
    return list(stub.GetMetadataDelta(request, timeout=60))


def tuples(messages) -> list[tuple[int, int]]:
    return [(b.byte_offset, b.size_bytes) for m in messages for b in m.block_metadata]


def in_bytes(chunks: list[int]) -> list[tuple[int, int]]:
    return [(begin * CHUNK, length * CHUNK) for begin, length in zip(chunks[::2], chunks[1::2], strict=True)]


def status_of(call, *args, **fields) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **fields)
    return caught.value.code(), caught.value.details()


def test_delta_streams_the_changed_ranges_in_bytes(stub, host):
    messages = delta(stub)
    assert tuples(messages) == in_bytes(DELTA_CHUNKS)
    assert {(m.block_metadata_type, m.volume_capacity_bytes) for m in messages} == {(csi_pb2.VARIABLE_LENGTH, SIZE)}
    assert host.dmsetup_calls() == ["reserve_metadata_snap", "release_metadata_snap"] and not host.held
    assert "--snap1 7 --snap2 9 /dev/mapper/berth-pool_tmeta" in (host.dir / "tool.log").read_text()


def test_allocated_streams_the_mapped_ranges(stub, host):
    host.output(THIN_DUMP_XML)
    assert tuples(allocated(stub)) == in_bytes(DUMP_CHUNKS)
    assert "thin_dump -m --dev-id 9" in (host.dir / "tool.log").read_text()


def test_max_results_bounds_every_message(stub):
    messages = delta(stub, max_results=1)
    assert [len(m.block_metadata) for m in messages] == [1, 1, 1, 1]
    assert tuples(messages) == in_bytes(DELTA_CHUNKS)


def test_a_continued_stream_starts_at_the_range_holding_the_offset(stub):
    offset = 12 * CHUNK + 1  # inside the range 10-14 (chunks)
    first, *_ = tuples(delta(stub, starting_offset=offset))
    assert first == (12 * CHUNK, 3 * CHUNK) and offset < first[0] + first[1], "the spec's S < B0.offset + size"
    assert tuples(delta(stub, starting_offset=SIZE)) == [], "nothing lies at the very end"


def test_a_snapshot_without_data_still_tells_the_volumes_size(stub, host):
    host.output('<superblock data_block_size="128"><device dev_id="12" mapped_blocks="0"/></superblock>')
    (message,) = allocated(stub, EMPTY)
    assert message.volume_capacity_bytes == SIZE and not message.block_metadata


def test_ranges_come_from_several_host_calls_in_order(stub, host, monkeypatch):
    monkeypatch.setattr(thin_metadata, "PAGE_RANGES", 1)
    messages = delta(stub)
    assert tuples(messages) == in_bytes(DELTA_CHUNKS)
    assert (host.dir / "runs").read_text().strip() == "4", "one host call per range"
    assert host.dmsetup_calls() == ["reserve_metadata_snap", "release_metadata_snap"] * 4


def test_a_failure_after_the_first_page_ends_the_stream_with_its_status(stub, host, monkeypatch):
    monkeypatch.setattr(thin_metadata, "PAGE_RANGES", 2)
    host.flag("fail-run-2", "Unable to find mapping tree for snap2 (9)\n")  # the snapshot went meanwhile
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for message in stub.GetMetadataDelta(
            csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=BASE, target_snapshot_id=TARGET, max_results=2), timeout=60
        ):
            received.append(message)
    assert tuples(received) == in_bytes(DELTA_CHUNKS[:4])
    assert caught.value.code() == Status.NOT_FOUND and "snap2 (9)" in caught.value.details()
    assert not host.held


@pytest.mark.parametrize(
    ("call", "fields", "code", "words"),
    [
        (allocated, {"snapshot_id": ""}, Status.INVALID_ARGUMENT, "needs a snapshot_id"),
        (allocated, {"snapshot_id": "blk/snap-" + "0" * 20}, Status.NOT_FOUND, "not found"),
        (allocated, {"snapshot_id": "nonsense"}, Status.NOT_FOUND, "not found"),
        (allocated, {"snapshot_id": "nfs-2/snap-" + "0" * 20}, Status.NOT_FOUND, "no configured backend"),
        (allocated, {"starting_offset": -1}, Status.OUT_OF_RANGE, "negative"),
        (allocated, {"starting_offset": SIZE + 1}, Status.OUT_OF_RANGE, f"whose volume has {SIZE} bytes"),
        (allocated, {"max_results": -5}, Status.INVALID_ARGUMENT, "max_results -5"),
        (allocated, {"snapshot_id": FILES}, Status.FAILED_PRECONDITION, "block volumes only"),
        (delta, {"base": ""}, Status.INVALID_ARGUMENT, "needs a base_snapshot_id"),
        (delta, {"target": ""}, Status.INVALID_ARGUMENT, "needs a target_snapshot_id"),
        (delta, {"target": OTHER}, Status.INVALID_ARGUMENT, "different volumes"),
        (delta, {"target": FILES}, Status.INVALID_ARGUMENT, "on backend files"),
        (delta, {"starting_offset": -1}, Status.OUT_OF_RANGE, "negative"),
        (delta, {"target": "blk/snap-" + "0" * 20}, Status.NOT_FOUND, "not found"),
    ],
)
def test_errors(stub, host, call, fields, code, words):
    actual, details = status_of(call, stub, **fields)
    assert actual == code and words in details, details
    assert host.dmsetup_calls() == [], "nothing was read on the host"


def test_a_metadata_snapshot_someone_else_holds_is_failed_precondition(stub, host):
    host.flag("held")
    code, details = status_of(delta, stub)
    assert code == Status.FAILED_PRECONDITION and "release_metadata_snap" in details and host.held


def test_the_capability_and_service_come_with_a_block_backend(tmp_path):
    identity = IdentityService("berth.test", controller=True, snapshot_metadata=True)
    capabilities = identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), None).capabilities
    services = {c.service.type for c in capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in services
    for protocol, offered in (("iscsi", True), ("nfs", False)):
        backend = {"protocol": protocol, "host": {"address": "local"}, "lvm": {"volume_group": "berth",
                   "thin_pool": "pool"}, "iscsi": {"portals": ["198.18.0.1:3260"],
                   "iqn_prefix": "iqn.2026-11.io.berth.storage"}, "nfs": {"server": "198.18.0.1"}}  # fmt: skip
        del backend["nfs" if protocol == "iscsi" else "iscsi"]
        config = parse_config(yaml.safe_load(yaml.safe_dump({"backends": {"b": backend}})))
        socket = tmp_path / f"{protocol}.sock"
        args = cli.build_parser().parse_args(["--mode", "controller", "--endpoint", f"unix://{socket}"])
        server = cli.build_server(args, config)
        server.start()
        try:
            channel = grpc.insecure_channel(f"unix:{socket}")
            answer = csi_pb2_grpc.IdentityStub(channel).GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
            reported = {c.service.type for c in answer.capabilities if c.HasField("service")}
            assert (csi_pb2.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in reported) is offered
            code, _ = status_of(allocated, csi_pb2_grpc.SnapshotMetadataStub(channel), snapshot_id="")
            assert code == (Status.INVALID_ARGUMENT if offered else Status.UNIMPLEMENTED)
            channel.close()
        finally:
            server.stop(0)


def test_messages_stay_bounded_whatever_max_results_asks():
    ranges = iter([thin_metadata.ByteRange(i * CHUNK, CHUNK) for i in range(5)])
    assert [len(m) for m in snapshot_metadata._messages(ranges, 2)] == [2, 2, 1]
    assert snapshot_metadata._per_message(0, 0) == snapshot_metadata.DEFAULT_MAX_RESULTS
    assert snapshot_metadata._per_message(0, 1 << 30) == snapshot_metadata.MAX_RESULTS_CAP
