"""CSI Controller service: validates requests, picks the backend, calls it, and answers in CSI terms."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from csi_driver import ids
from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.services.capabilities import MULTI_NODE_MODES, READ_ONLY_MODES, describe, problem_with
from csi_driver.services.errors import OperationLocks, RpcError, invalid, rpc
from csi_driver.services.validation import check_maps, check_mutable_parameters, check_name
from csi_driver.storage.backend import (
    PROTOCOL_PARAMETERS,
    ContentSource,
    LvmBackend,
    NodeRef,
    Snapshot,
    Volume,
    by_pool,
    publications_of,
)
from csi_driver.storage.errors import HostUnreachable, NotFound
from csi_driver.storage.lvm import PoolView

log = logging.getLogger("berth.controller")

GiB = 1 << 30
DEFAULT_SIZE = 1 * GiB
# StorageClass parameters Berth understands; the external-provisioner's own (csi.storage.k8s.io/...) are ignored.
KNOWN_PARAMETERS = {"backend", "fsType", *PROTOCOL_PARAMETERS}
IGNORED_PARAMETER_PREFIX = "csi.storage.k8s.io/"

_Rpc = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = [
    _Rpc.CREATE_DELETE_VOLUME,
    _Rpc.PUBLISH_UNPUBLISH_VOLUME,
    _Rpc.LIST_VOLUMES,
    _Rpc.LIST_VOLUMES_PUBLISHED_NODES,
    _Rpc.GET_CAPACITY,
    _Rpc.CREATE_DELETE_SNAPSHOT,
    _Rpc.LIST_SNAPSHOTS,
    _Rpc.GET_SNAPSHOT,
    _Rpc.CLONE_VOLUME,
    _Rpc.PUBLISH_READONLY,
    _Rpc.EXPAND_VOLUME,
    _Rpc.GET_VOLUME,
    _Rpc.VOLUME_CONDITION,
    _Rpc.SINGLE_NODE_MULTI_WRITER,
    _Rpc.MODIFY_VOLUME,
]

T = TypeVar("T")


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(
        self,
        backends: Mapping[str, LvmBackend],
        default_backend: str | None = None,
        max_volumes_per_node: int = 0,
    ) -> None:
        self.backends = dict(backends)
        self.default_backend = default_backend or (
            next(iter(self.backends)) if len(self.backends) == 1 else None
        )
        self.max_volumes_per_node = max_volumes_per_node
        self.locks = OperationLocks()

    # --- helpers ---

    def _backend_for_parameters(self, parameters: Mapping[str, str]) -> LvmBackend:
        name = parameters.get("backend") or self.default_backend
        if not name:
            raise invalid(
                f"no backend chosen: set the StorageClass parameter 'backend' to one of {self._names()}"
            )
        if name not in self.backends:
            raise invalid(f"unknown backend {name!r}: configured backends are {self._names()}")
        return self.backends[name]

    def _names(self) -> str:
        return ", ".join(sorted(self.backends)) or "(none)"

    def _locate(self, object_id: str, what: str = "volume") -> tuple[LvmBackend, str]:
        return locate(self.backends, object_id, what)

    def _volume_message(self, backend: LvmBackend, volume: Volume) -> csi_pb2.Volume:
        message = csi_pb2.Volume(
            volume_id=ids.join_volume_id(backend.name, volume.lv),
            capacity_bytes=volume.size_bytes,
            volume_context=volume.context,
        )
        if volume.source is not None:
            source_id = ids.join_volume_id(backend.name, volume.source.lv)
            if volume.source.kind == "snapshot":
                message.content_source.snapshot.snapshot_id = source_id
            else:
                message.content_source.volume.volume_id = source_id
        return message

    def _snapshot_message(self, backend: LvmBackend, snapshot: Snapshot) -> csi_pb2.Snapshot:
        created = Timestamp()
        created.FromDatetime(snapshot.created)
        return csi_pb2.Snapshot(
            snapshot_id=ids.join_volume_id(backend.name, snapshot.lv),
            source_volume_id=ids.join_volume_id(backend.name, snapshot.source_lv),
            size_bytes=snapshot.size_bytes,
            creation_time=created,
            ready_to_use=True,
            group_snapshot_id=ids.join_volume_id(backend.name, snapshot.group) if snapshot.group else "",
        )

    # --- capabilities ---

    @rpc
    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.ControllerServiceCapability(rpc=_Rpc(type=cap)) for cap in CAPABILITIES]
        )

    # --- volumes ---

    @rpc(lock=("name",))
    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        check_name("CreateVolume name", request.name)
        check_maps(request)
        if not request.volume_capabilities:
            raise invalid("CreateVolume needs at least one volume capability")
        _check_parameters(request.parameters)
        backend = self._backend_for_parameters(request.parameters)
        _check_capabilities(request.volume_capabilities, backend.protocol)
        fs_type = request.parameters.get("fsType")
        if fs_type and problem_with(_mount_capability(fs_type), backend.protocol):
            raise invalid(
                f"parameter fsType={fs_type!r}: {problem_with(_mount_capability(fs_type), backend.protocol)}"
            )
        check_mutable_parameters(request.mutable_parameters, backend.mutable_parameters, backend.name)
        required, limit = _capacity_range(request.capacity_range)
        source = self._content_source(backend, request)
        volume = backend.create_volume(
            request.name,
            required,
            limit,
            request.parameters,
            source,
            default_bytes=DEFAULT_SIZE,
            mutable=request.mutable_parameters,
            filesystems=[c.mount.fs_type for c in request.volume_capabilities if c.HasField("mount")],
        )
        return csi_pb2.CreateVolumeResponse(volume=self._volume_message(backend, volume))

    def _content_source(
        self, backend: LvmBackend, request: csi_pb2.CreateVolumeRequest
    ) -> ContentSource | None:
        if not request.HasField("volume_content_source"):
            return None
        source = request.volume_content_source
        if source.HasField("snapshot"):
            kind, source_id = "snapshot", source.snapshot.snapshot_id
        elif source.HasField("volume"):
            kind, source_id = "volume", source.volume.volume_id
        else:
            raise invalid("volume_content_source names neither a snapshot nor a volume")
        source_backend, lv = self._locate(source_id, kind)
        if source_backend is not backend:
            raise invalid(
                f"source {kind} {source_id!r} lives on backend {source_backend.name}; a clone must be made on the "
                f"same backend, not {backend.name}"
            )
        return ContentSource(kind, lv)  # type: ignore[arg-type]

    @rpc(lock=("volume_id",))
    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise invalid("DeleteVolume needs a volume_id")
        check_maps(request)
        try:
            backend, lv = self._locate(request.volume_id)
        except NotFound:
            log.info("delete of unknown volume ID is a no-op", extra={"volume_id": request.volume_id})
            return csi_pb2.DeleteVolumeResponse()
        backend.delete_volume(lv)
        return csi_pb2.DeleteVolumeResponse()

    @rpc(lock=("volume_id",))
    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        if not request.volume_id:
            raise invalid("ControllerPublishVolume needs a volume_id")
        if not request.node_id:
            raise invalid("ControllerPublishVolume needs a node_id")
        if not request.HasField("volume_capability"):
            raise invalid("ControllerPublishVolume needs a volume_capability")
        check_maps(request)
        node = _node(request.node_id)
        backend, lv = self._locate(request.volume_id)
        _check_capabilities([request.volume_capability], backend.protocol)
        mode = request.volume_capability.access_mode.mode
        readonly = request.readonly or mode in READ_ONLY_MODES
        view = backend.view()  # one lvs serves the volume, its readiness and this pool's publication count
        volume = backend.get_volume(lv, view)
        if node.node_id not in volume.published:
            self._check_attach_limit(node.node_id, backend, view)
        publish_context = backend.publish(lv, node, readonly, mode in MULTI_NODE_MODES, request.secrets, view)
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=publish_context)

    def _check_attach_limit(self, node_id: str, read: LvmBackend, view: PoolView) -> None:
        """`view`: the pool of backend `read` as just read; the other pools are read here."""
        if not self.max_volumes_per_node:
            return
        attached = 0
        for group in by_pool(self.backends.values()):  # backends sharing a thin pool: one lvs for all of them
            try:
                attached += publications_of(group, node_id, view if read in group else None)
            except HostUnreachable as err:
                # One dead storage host must not stop publishing on the others; kubelet still keeps the node to
                # the max_volumes_per_node of NodeGetInfo.
                names = ",".join(backend.name for backend in group)
                log.warning("cannot count publications", extra={"backend": names, "error": str(err)})
        if attached >= self.max_volumes_per_node:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"node already has {attached} volumes published, the limit is {self.max_volumes_per_node}",
            )

    @rpc(lock=("volume_id",))
    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        if not request.volume_id:
            raise invalid("ControllerUnpublishVolume needs a volume_id")
        check_maps(request)
        try:
            backend, lv = self._locate(request.volume_id)
        except NotFound:
            return csi_pb2.ControllerUnpublishVolumeResponse()  # nothing Berth made: nothing to undo
        nodes = [_node(request.node_id)] if request.node_id else self._published_nodes(backend, lv)
        for node in nodes:
            backend.unpublish(lv, node)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    def _published_nodes(self, backend: LvmBackend, lv: str) -> list[NodeRef]:
        try:
            return [_node(node_id) for node_id in backend.get_volume(lv).published]
        except NotFound:
            return []

    @rpc
    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise invalid("ValidateVolumeCapabilities needs a volume_id")
        if not request.volume_capabilities:
            raise invalid("ValidateVolumeCapabilities needs at least one volume capability")
        check_maps(request)
        backend, lv = self._locate(request.volume_id)
        backend.get_volume(lv)
        problems = [p for p in (problem_with(c, backend.protocol) for c in request.volume_capabilities) if p]
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @rpc
    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        entries = []
        views: dict[tuple[object, ...], PoolView] = {}  # one lvs per thin pool, for every backend on it
        for name in sorted(self.backends):
            backend = self.backends[name]
            if backend.pool.key not in views:
                views[backend.pool.key] = backend.view()
            view = views[backend.pool.key]
            volumes = backend.list_volumes(view)
            pool_problem = backend.pool_problem(view) if volumes else None
            for volume in volumes:
                status = csi_pb2.ListVolumesResponse.VolumeStatus(
                    published_node_ids=sorted(volume.published), volume_condition=_condition(volume, pool_problem)
                )
                entries.append(
                    csi_pb2.ListVolumesResponse.Entry(
                        volume=self._volume_message(backend, volume), status=status
                    )
                )
        page, next_token = _paginate(
            entries, lambda e: e.volume.volume_id, request.starting_token, request.max_entries
        )
        return csi_pb2.ListVolumesResponse(entries=page, next_token=next_token)

    @rpc
    def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeResponse:
        if not request.volume_id:
            raise invalid("ControllerGetVolume needs a volume_id")
        backend, lv = self._locate(request.volume_id)
        volume = backend.get_volume(lv)
        condition = _condition(volume, backend.pool_problem())
        status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=sorted(volume.published), volume_condition=condition
        )
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume_message(backend, volume), status=status
        )

    @rpc
    def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetCapacityResponse:
        check_maps(request)
        backends = (
            [self._backend_for_parameters(request.parameters)]
            if request.parameters.get("backend") or self.default_backend
            else list(self.backends.values())
        )
        total = 0
        for backend in backends:
            if any(problem_with(c, backend.protocol) for c in request.volume_capabilities):
                continue  # this backend cannot serve such volumes at all
            total += backend.available_bytes()
        return csi_pb2.GetCapacityResponse(available_capacity=total)

    @rpc(lock=("volume_id",))
    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        if not request.volume_id:
            raise invalid("ControllerExpandVolume needs a volume_id")
        if not request.HasField("capacity_range"):
            raise invalid("ControllerExpandVolume needs a capacity_range")
        check_maps(request)
        required, limit = _capacity_range(request.capacity_range)
        backend, lv = self._locate(request.volume_id)
        if request.HasField("volume_capability"):
            _check_capabilities([request.volume_capability], backend.protocol)
        size, node_expansion = backend.expand_volume(lv, required, limit)
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=node_expansion
        )

    @rpc(lock=("volume_id",))
    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        if not request.volume_id:
            raise invalid("ControllerModifyVolume needs a volume_id")
        check_maps(request)
        backend, lv = self._locate(request.volume_id)
        if not request.mutable_parameters:
            raise invalid("ControllerModifyVolume needs mutable_parameters")
        check_mutable_parameters(request.mutable_parameters, backend.mutable_parameters, backend.name)
        backend.modify_volume(lv, request.mutable_parameters)
        return csi_pb2.ControllerModifyVolumeResponse()

    # --- snapshots ---

    @rpc(lock=("name", "source_volume_id"))
    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        check_name("CreateSnapshot name", request.name)
        check_maps(request)
        if not request.source_volume_id:
            raise invalid("CreateSnapshot needs a source_volume_id")
        backend, lv = self._locate(request.source_volume_id)
        snapshot = backend.create_snapshot(request.name, lv)
        return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot_message(backend, snapshot))

    @rpc(lock=("snapshot_id",))
    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        if not request.snapshot_id:
            raise invalid("DeleteSnapshot needs a snapshot_id")
        check_maps(request)
        try:
            backend, lv = self._locate(request.snapshot_id, "snapshot")
        except NotFound:
            return csi_pb2.DeleteSnapshotResponse()
        backend.delete_snapshot(lv)
        return csi_pb2.DeleteSnapshotResponse()

    @rpc
    def GetSnapshot(
        self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetSnapshotResponse:
        if not request.snapshot_id:
            raise invalid("GetSnapshot needs a snapshot_id")
        backend, lv = self._locate(request.snapshot_id, "snapshot")
        return csi_pb2.GetSnapshotResponse(snapshot=self._snapshot_message(backend, backend.get_snapshot(lv)))

    @rpc
    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        check_maps(request)
        snapshots = []
        for name in sorted(self.backends):
            backend = self.backends[name]
            snapshots += [self._snapshot_message(backend, s) for s in backend.list_snapshots()]
        if request.snapshot_id:
            snapshots = [s for s in snapshots if s.snapshot_id == request.snapshot_id]
        if request.source_volume_id:
            snapshots = [s for s in snapshots if s.source_volume_id == request.source_volume_id]
        page, next_token = _paginate(
            snapshots, lambda s: s.snapshot_id, request.starting_token, request.max_entries
        )
        entries = [csi_pb2.ListSnapshotsResponse.Entry(snapshot=s) for s in page]
        return csi_pb2.ListSnapshotsResponse(entries=entries, next_token=next_token)


def locate(backends: Mapping[str, LvmBackend], object_id: str, what: str = "volume") -> tuple[LvmBackend, str]:
    """Backend and LV of a volume/snapshot ID; an ID Berth could not have made is simply not found."""
    try:
        backend, lv = ids.split_volume_id(object_id)
    except ids.InvalidId as err:
        raise NotFound(f"{what} {object_id!r} not found: {err}") from None
    if backend not in backends:
        raise NotFound(f"{what} {object_id!r} not found: no configured backend is called {backend!r}")
    return backends[backend], lv


def _node(node_id: str) -> NodeRef:
    try:
        parsed = ids.parse_node_id(node_id)
    except ids.InvalidId as err:
        raise NotFound(
            f"node {node_id!r} not found: not a node ID from Berth's NodeGetInfo ({err})"
        ) from None
    return NodeRef(node_id=node_id, initiator=parsed.iqn, addresses=parsed.addresses)


def _check_parameters(parameters: Mapping[str, str]) -> None:
    unknown = sorted(
        key
        for key in parameters
        if key not in KNOWN_PARAMETERS and not key.startswith(IGNORED_PARAMETER_PREFIX)
    )
    if unknown:
        raise invalid(
            f"unknown StorageClass parameter(s) {', '.join(unknown)}; "
            f"Berth understands {', '.join(sorted(KNOWN_PARAMETERS))}"
        )


def _check_capabilities(capabilities: Iterable[csi_pb2.VolumeCapability], protocol: str) -> None:
    for capability in capabilities:
        problem = problem_with(capability, protocol)
        if problem:
            raise invalid(f"volume capability {describe(capability)}: {problem}")


def _mount_capability(fs_type: str) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )


def _capacity_range(capacity_range: csi_pb2.CapacityRange) -> tuple[int, int]:
    required, limit = capacity_range.required_bytes, capacity_range.limit_bytes
    if required < 0 or limit < 0:
        raise invalid("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise RpcError(grpc.StatusCode.OUT_OF_RANGE, f"required_bytes {required} exceeds limit_bytes {limit}")
    if not required and limit:
        required = min(DEFAULT_SIZE, limit)
    return required, limit


def _condition(volume: Volume, pool_problem: str | None) -> csi_pb2.VolumeCondition:
    if not volume.ready:
        return csi_pb2.VolumeCondition(abnormal=True, message="volume creation has not finished")
    if not volume.active:
        return csi_pb2.VolumeCondition(abnormal=True, message="the LV is not active on the storage host")
    if pool_problem:
        return csi_pb2.VolumeCondition(abnormal=True, message=pool_problem)
    return csi_pb2.VolumeCondition(abnormal=False, message="volume is healthy")


def _paginate(
    items: Sequence[T], key: Callable[[T], str], token: str, max_entries: int
) -> tuple[list[T], str]:
    """Sorted pages; the token is the key of the first item of the next page, stable across deletions."""
    if max_entries < 0:
        raise invalid("max_entries must not be negative")
    ordered = sorted(items, key=key)
    start = 0
    if token:
        try:
            ids.split_volume_id(token)
        except ids.InvalidId:
            raise RpcError(
                grpc.StatusCode.ABORTED, f"starting_token {token!r} is not a token Berth issued"
            ) from None
        start = next((i for i, item in enumerate(ordered) if key(item) >= token), len(ordered))
    end = start + max_entries if max_entries else len(ordered)
    next_token = key(ordered[end]) if end < len(ordered) else ""
    return list(ordered[start:end]), next_token
