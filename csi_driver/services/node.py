"""CSI Node service: check the request, call layer 3 (csi_driver.node), map its errors to gRPC codes.

Required fields are checked before anything is looked up: csi-sanity sends a made-up volume ID together
with a missing field and expects INVALID_ARGUMENT, not NOT_FOUND.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import grpc

from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.node import errors
from csi_driver.node.protocol import BLOCK, MOUNT, StageRequest, VolumeProtocol
from csi_driver.node.volumes import NodeVolumes, PublishRequest

log = logging.getLogger("berth.node")

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
_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.InvalidVolume, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.VolumeNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.MountConflict, grpc.StatusCode.ALREADY_EXISTS),
    (errors.NotStaged, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.WrongAccess, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.StillInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.OperationInFlight, grpc.StatusCode.ABORTED),
    (errors.LoginRefused, grpc.StatusCode.PERMISSION_DENIED),
    (errors.CommandTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.NodeError, grpc.StatusCode.INTERNAL),
)


class _Invalid(Exception):
    """A request field is missing or malformed."""


def _require(value: str, what: str) -> str:
    if not value:
        raise _Invalid(f"{what} is required")
    return value


def _access(request, what: str = "volume_capability") -> tuple[str, csi_pb2.VolumeCapability]:
    if not request.HasField("volume_capability"):
        raise _Invalid(f"{what} is required")
    capability = request.volume_capability
    kind = capability.WhichOneof("access_type")
    if kind not in (BLOCK, MOUNT):
        raise _Invalid(f"{what} must have an access type (block or mount)")
    if capability.access_mode.mode == _Mode.UNKNOWN:
        raise _Invalid(f"{what}.access_mode is required")
    return kind, capability


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, volumes: NodeVolumes, max_volumes_per_node: int = 0) -> None:
        self.node_id = node_id
        self.volumes = volumes
        self.max_volumes_per_node = max_volumes_per_node

    def _fail(self, context, err: Exception, rpc: str):
        if isinstance(err, _Invalid):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        for cls, code in _CODES:
            if isinstance(err, cls):
                level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
                log.log(level, "%s failed", rpc, extra={"code": code.name, "reason": str(err)})
                context.abort(code, str(err))
        # A bug or an unexpected OSError: still a readable INTERNAL, and the traceback in our log.
        log.exception("%s failed unexpectedly", rpc)
        context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: unexpected {type(err).__name__}: {err}")

    # --- capabilities and info ---

    def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=_Rpc(type=t)) for t in CAPABILITIES]
        )

    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id, max_volumes_per_node=self.max_volumes_per_node)

    # --- stage ---

    def NodeStageVolume(self, request, context):
        try:
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
        except Exception as err:
            self._fail(context, err, "NodeStageVolume")
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request, context):
        try:
            volume_id = _require(request.volume_id, "volume_id")
            staging = _require(request.staging_target_path, "staging_target_path")
            self.volumes.unstage(volume_id, staging)
        except Exception as err:
            self._fail(context, err, "NodeUnstageVolume")
        return csi_pb2.NodeUnstageVolumeResponse()

    # --- publish ---

    def NodePublishVolume(self, request, context):
        try:
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
                readonly=request.readonly,
                access_mode=capability.access_mode.mode,
                mount_flags=tuple(capability.mount.mount_flags) if kind == MOUNT else (),
            )
            self.volumes.publish(publish)
        except Exception as err:
            self._fail(context, err, "NodePublishVolume")
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request, context):
        try:
            volume_id = _require(request.volume_id, "volume_id")
            target = _require(request.target_path, "target_path")
            self.volumes.unpublish(volume_id, target)
        except Exception as err:
            self._fail(context, err, "NodeUnpublishVolume")
        return csi_pb2.NodeUnpublishVolumeResponse()

    # --- stats and expand ---

    def NodeGetVolumeStats(self, request, context):
        try:
            volume_id = _require(request.volume_id, "volume_id")
            path = _require(request.volume_path, "volume_path")
            stats = self.volumes.stats(volume_id, path)
        except Exception as err:
            self._fail(context, err, "NodeGetVolumeStats")
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

    def NodeExpandVolume(self, request, context):
        try:
            volume_id = _require(request.volume_id, "volume_id")
            path = _require(request.volume_path, "volume_path")
            if request.HasField("volume_capability"):
                _access(request)
            capacity = self.volumes.expand(volume_id, path)
        except Exception as err:
            self._fail(context, err, "NodeExpandVolume")
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=capacity)


def make_node_service(
    node_id: str, state_dir: str, max_volumes_per_node: int = 0, protocols: Sequence[str] = ("iscsi", "nfs")
) -> NodeService:
    """Wire layer 3 for a real node: local commands, the kernel's mount table, os-brick for iSCSI."""
    from csi_driver.node.commands import LocalRunner
    from csi_driver.node.filesystems import Filesystems
    from csi_driver.node.iscsi import IscsiVolumes, brick_connector_factory
    from csi_driver.node.mounts import Mounter
    from csi_driver.node.nfs import NfsVolumes

    runner = LocalRunner()
    mounter = Mounter(runner)
    filesystems = Filesystems(runner, mounter)
    served: dict[str, VolumeProtocol] = {}
    if "iscsi" in protocols:
        lock_dir = os.path.join(state_dir, "locks")
        served["iscsi"] = IscsiVolumes(runner, mounter, filesystems, brick_connector_factory(lock_dir))
    if "nfs" in protocols:
        served["nfs"] = NfsVolumes(mounter)
    return NodeService(node_id, NodeVolumes(state_dir, served, mounter, filesystems), max_volumes_per_node)
