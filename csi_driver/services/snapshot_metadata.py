"""CSI SnapshotMetadata service (changed-block tracking): the ranges of a snapshot that hold data, and the ranges that
changed between two snapshots of one volume, streamed to the caller (the external-snapshot-metadata sidecar).

Served in controller mode when a backend serves block volumes (iSCSI); docs/snapshot-metadata.md has the design.
Ranges are VARIABLE_LENGTH: whole pool chunks with adjacent ones merged, so a volume written end to end is one tuple
instead of one per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import grpc

from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.services.controller import locate
from csi_driver.services.errors import RpcError, invalid, rpc
from csi_driver.services.validation import check_maps
from csi_driver.storage.backend import LvmBackend
from csi_driver.storage.thin_metadata import ByteRange, allocated_blocks, changed_blocks

# Tuples per message when the request leaves it to us (max_results 0), and at most: 64 Ki tuples are about 1 MiB,
# well under gRPC's default 4 MiB message limit.
DEFAULT_MAX_RESULTS = 4096
MAX_RESULTS_CAP = 65536


class SnapshotMetadataService(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, backends: Mapping[str, LvmBackend]) -> None:
        self.backends = dict(backends)

    @rpc
    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        if not request.snapshot_id:
            raise invalid("GetMetadataAllocated needs a snapshot_id")
        check_maps(request)
        per_message = _per_message(request.starting_offset, request.max_results)
        backend, lv = locate(self.backends, request.snapshot_id, "snapshot")
        blocks = allocated_blocks(backend, lv, request.starting_offset)
        for tuples in _messages(blocks.ranges, per_message):
            yield csi_pb2.GetMetadataAllocatedResponse(
                block_metadata_type=csi_pb2.VARIABLE_LENGTH,
                volume_capacity_bytes=blocks.size_bytes,
                block_metadata=tuples,
            )

    @rpc
    def GetMetadataDelta(
        self, request: csi_pb2.GetMetadataDeltaRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        if not request.base_snapshot_id:
            raise invalid("GetMetadataDelta needs a base_snapshot_id")
        if not request.target_snapshot_id:
            raise invalid("GetMetadataDelta needs a target_snapshot_id")
        check_maps(request)
        per_message = _per_message(request.starting_offset, request.max_results)
        backend, base_lv = locate(self.backends, request.base_snapshot_id, "base snapshot")
        target_backend, target_lv = locate(self.backends, request.target_snapshot_id, "target snapshot")
        if target_backend is not backend:
            raise invalid(
                f"base snapshot {request.base_snapshot_id!r} is on backend {backend.name} and target snapshot "
                f"{request.target_snapshot_id!r} on backend {target_backend.name}: a delta compares two snapshots "
                "of one volume"
            )
        blocks = changed_blocks(backend, base_lv, target_lv, request.starting_offset)
        for tuples in _messages(blocks.ranges, per_message):
            yield csi_pb2.GetMetadataDeltaResponse(
                block_metadata_type=csi_pb2.VARIABLE_LENGTH,
                volume_capacity_bytes=blocks.size_bytes,
                block_metadata=tuples,
            )


def _per_message(starting_offset: int, max_results: int) -> int:
    """Tuples per message. A negative starting_offset is OUT_OF_RANGE (the spec's code for an offset outside the
    volume; one beyond its end is found once the snapshot is read), a negative max_results INVALID_ARGUMENT."""
    if starting_offset < 0:
        raise RpcError(grpc.StatusCode.OUT_OF_RANGE, f"starting_offset {starting_offset} is negative")
    if max_results < 0:
        raise invalid(f"max_results {max_results} is negative (0 lets Berth choose)")
    return min(max_results, MAX_RESULTS_CAP) if max_results else DEFAULT_MAX_RESULTS


def _messages(ranges: Iterator[ByteRange], per_message: int) -> Iterator[list[csi_pb2.BlockMetadata]]:
    """The ranges in lists of at most per_message; at least one list (maybe empty), so that even a snapshot with no
    data tells the caller the volume's size."""
    batch: list[csi_pb2.BlockMetadata] = []
    sent = False
    for block in ranges:
        batch.append(csi_pb2.BlockMetadata(byte_offset=block.offset, size_bytes=block.length))
        if len(batch) == per_message:
            yield batch
            batch, sent = [], True
    if batch or not sent:
        yield batch
