"""CSI Node service: check the request, call layer 3 (csi_driver.node), map its errors to gRPC codes.

Required fields are checked before anything is looked up: csi-sanity sends a made-up volume ID together
with a missing field and expects INVALID_ARGUMENT, not NOT_FOUND.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc

from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.node import errors
from csi_driver.node.protocol import BLOCK, MOUNT, StageRequest, VolumeProtocol
from csi_driver.node.volumes import NodeVolumes, PublishRequest
from csi_driver.services.errors import ErrorCodes, OperationLocks, RpcRules, invalid

_Rpc = csi_pb2.NodeServiceCapability.RPC
_Mode = csi_pb2.VolumeCapability.AccessMode
CAPABILITIES = (
    _Rpc.STAGE_UNSTAGE_VOLUME,
    _Rpc.GET_VOLUME_STATS,
    _Rpc.EXPAND_VOLUME,
    _Rpc.VOLUME_CONDITION,
    _Rpc.SINGLE_NODE_MULTI_WRITER,
)
_READ_ONLY_MODES = (_Mode.SINGLE_NODE_READER_ONLY, _Mode.MULTI_NODE_READER_ONLY)

# Most specific first: the first matching class decides the code.
NODE_ERROR_CODES: ErrorCodes = [
    (errors.InvalidVolume, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidPath, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.VolumeNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.MountConflict, grpc.StatusCode.ALREADY_EXISTS),
    (errors.NotStaged, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.WrongAccess, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.StillInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PathBusy, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.LoginRefused, grpc.StatusCode.PERMISSION_DENIED),
    (errors.CommandTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.NodeError, grpc.StatusCode.INTERNAL),
]
node_rpc = RpcRules(NODE_ERROR_CODES)


def _require(value: str, what: str) -> str:
    if not value:
        raise invalid(f"{what} is required")
    return value


def _access(
    request: csi_pb2.NodeStageVolumeRequest | csi_pb2.NodePublishVolumeRequest | csi_pb2.NodeExpandVolumeRequest,
    what: str = "volume_capability",
) -> tuple[str, csi_pb2.VolumeCapability]:
    if not request.HasField("volume_capability"):
        raise invalid(f"{what} is required")
    capability = request.volume_capability
    kind = capability.WhichOneof("access_type")
    if kind not in (BLOCK, MOUNT):
        raise invalid(f"{what} must have an access type (block or mount)")
    if capability.access_mode.mode == _Mode.UNKNOWN:
        raise invalid(f"{what}.access_mode is required")
    return kind, capability


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, volumes: NodeVolumes, max_volumes_per_node: int = 0) -> None:
        self.node_id = node_id
        self.volumes = volumes
        self.max_volumes_per_node = max_volumes_per_node
        self.locks = OperationLocks()

    # --- capabilities and info ---

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=_Rpc(type=t)) for t in CAPABILITIES]
        )

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id, max_volumes_per_node=self.max_volumes_per_node)

    # --- stage ---

    @node_rpc(lock=("volume_id",))
    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        staging = _require(request.staging_target_path, "staging_target_path")
        kind, capability = _access(request)
        mode = capability.access_mode.mode
        readonly = request.publish_context.get("readonly") == "true" or mode in _READ_ONLY_MODES
        stage = StageRequest(
            volume_id=volume_id,
            staging_path=staging,
            access_type=kind,
            fs_type=capability.mount.fs_type if kind == MOUNT else "",
            mount_flags=tuple(capability.mount.mount_flags) if kind == MOUNT else (),
            readonly=readonly,
            access_mode=mode,
            volume_context=dict(request.volume_context),
            publish_context=dict(request.publish_context),
            secrets=dict(request.secrets),
        )
        self.volumes.stage(stage)
        return csi_pb2.NodeStageVolumeResponse()

    @node_rpc(lock=("volume_id",))
    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        staging = _require(request.staging_target_path, "staging_target_path")
        self.volumes.unstage(volume_id, staging)
        return csi_pb2.NodeUnstageVolumeResponse()

    # --- publish ---

    @node_rpc(lock=("volume_id",))
    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        target = _require(request.target_path, "target_path")
        kind, capability = _access(request)
        if not request.staging_target_path:
            # We advertise STAGE_UNSTAGE_VOLUME, so the CO must stage first and pass the staging path.
            raise errors.NotStaged("staging_target_path is required: this plugin stages volumes first")
        publish = PublishRequest(
            volume_id=volume_id,
            staging_path=request.staging_target_path,
            target_path=target,
            access_type=kind,
            readonly=request.readonly or capability.access_mode.mode in _READ_ONLY_MODES,
            access_mode=capability.access_mode.mode,
            mount_flags=tuple(capability.mount.mount_flags) if kind == MOUNT else (),
        )
        self.volumes.publish(publish)
        return csi_pb2.NodePublishVolumeResponse()

    @node_rpc(lock=("volume_id",))
    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        target = _require(request.target_path, "target_path")
        self.volumes.unpublish(volume_id, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # --- stats and expand ---

    @node_rpc
    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        volume_id = _require(request.volume_id, "volume_id")
        path = _require(request.volume_path, "volume_path")
        stats = self.volumes.stats(volume_id, path)
        unit = csi_pb2.VolumeUsage
        usage = []
        if stats.usage is not None:
            u = stats.usage
            if stats.block:
                usage.append(unit(total=u.total_bytes, unit=unit.BYTES))
            else:
                usage.append(unit(total=u.total_bytes, available=u.available_bytes, used=u.used_bytes, unit=unit.BYTES))
                usage.append(unit(total=u.total_inodes, available=u.free_inodes, used=u.used_inodes, unit=unit.INODES))
        condition = csi_pb2.VolumeCondition(abnormal=stats.abnormal, message=stats.message or "healthy")
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    @node_rpc(lock=("volume_id",))
    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        path = _require(request.volume_path, "volume_path")
        if request.HasField("volume_capability"):
            _access(request)
        capacity = self.volumes.expand(volume_id, path)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=capacity)


def make_node_service(
    node_id: str, state_dir: str, max_volumes_per_node: int = 0, protocols: Sequence[str] = ("iscsi", "nfs")
) -> NodeService:
    """Wire layer 3 for a real node: local commands, the kernel's mount table, os-brick for iSCSI.
    A node ID Kubernetes cannot store is a ConfigError: the program stops at start-up and says why."""
    from csi_driver.config import ConfigError
    from csi_driver.node.commands import LocalRunner
    from csi_driver.node.filesystems import Filesystems
    from csi_driver.node.identity import NodeIdTooLong, check_node_id
    from csi_driver.node.iscsi import IscsiVolumes, brick_connector_factory, brick_lock_sweeper
    from csi_driver.node.mounts import Mounter
    from csi_driver.node.nfs import NfsVolumes

    try:
        check_node_id(node_id)
    except NodeIdTooLong as err:
        raise ConfigError(str(err)) from err
    runner = LocalRunner()
    mounter = Mounter(runner)
    filesystems = Filesystems(runner, mounter)
    served: dict[str, VolumeProtocol] = {}
    if "iscsi" in protocols:
        lock_dir = os.path.join(state_dir, "locks")
        served["iscsi"] = IscsiVolumes(
            runner, mounter, filesystems, brick_connector_factory(lock_dir), sweep_locks=brick_lock_sweeper(lock_dir)
        )
    if "nfs" in protocols:
        served["nfs"] = NfsVolumes(mounter)
    return NodeService(node_id, NodeVolumes(state_dir, served, mounter, filesystems), max_volumes_per_node)
