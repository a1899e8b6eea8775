"""CSI GroupController service: crash-consistent snapshots of several volumes of one backend (docs/group-snapshots.md).

It is the Controller service's companion: it uses that service's backends, ID parsing (a group snapshot ID is
`<backend>/grp-<hash>`), snapshot messages and operation locks, so a group snapshot and a DeleteVolume or
ControllerExpandVolume of one of its volumes never run at the same time.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from csi_driver import ids
from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.services.controller import IGNORED_PARAMETER_PREFIX, ControllerService
from csi_driver.services.errors import invalid, rpc
from csi_driver.services.validation import check_maps, check_name
from csi_driver.storage.backend import GroupSnapshot, LvmBackend
from csi_driver.storage.errors import NotFound

_Rpc = csi_pb2.GroupControllerServiceCapability.RPC
CAPABILITIES = [_Rpc.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]


class GroupControllerService(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, controller: ControllerService) -> None:
        self.controller = controller
        self.locks = controller.locks  # a group snapshot and a DeleteVolume of a member must not overlap

    @rpc
    def GroupControllerGetCapabilities(
        self, request: csi_pb2.GroupControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        return csi_pb2.GroupControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.GroupControllerServiceCapability(rpc=_Rpc(type=cap)) for cap in CAPABILITIES]
        )

    @rpc(lock=("name", "source_volume_ids"))
    def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        check_name("CreateVolumeGroupSnapshot name", request.name)
        check_maps(request)
        unknown = sorted(key for key in request.parameters if not key.startswith(IGNORED_PARAMETER_PREFIX))
        if unknown:
            raise invalid(f"unknown group snapshot parameter(s) {', '.join(unknown)}: Berth takes none")
        volume_ids = list(request.source_volume_ids)
        if not volume_ids:
            raise invalid("CreateVolumeGroupSnapshot needs source_volume_ids")
        repeated = sorted({v for v in volume_ids if volume_ids.count(v) > 1})
        if repeated:
            raise invalid(f"source_volume_ids name {', '.join(repeated)} more than once")
        located = [self.controller._locate(volume_id) for volume_id in volume_ids]
        backends = sorted({backend.name for backend, _ in located})
        if len(backends) > 1:
            raise invalid(
                f"the volumes of a group snapshot must share one backend, these are on {', '.join(backends)}: "
                "one instant can only be held on one storage host and thin pool"
            )
        backend = located[0][0]
        group = backend.create_group_snapshot(request.name, [lv for _, lv in located])
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=self._message(backend, group))

    @rpc(lock=("group_snapshot_id",))
    def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        if not request.group_snapshot_id:
            raise invalid("DeleteVolumeGroupSnapshot needs a group_snapshot_id")
        check_maps(request)
        try:
            backend, key = self.controller._locate(request.group_snapshot_id, "group snapshot")
        except NotFound:
            return csi_pb2.DeleteVolumeGroupSnapshotResponse()  # nothing Berth made: nothing to delete
        try:
            group = backend.get_group_snapshot(key)
        except NotFound:
            return csi_pb2.DeleteVolumeGroupSnapshotResponse()
        # An ID missing from the list is a mismatch; a listed one already gone is a retry's doing.
        _check_listed(self._member_ids(backend, group), request.snapshot_ids, exact=False)
        backend.delete_group_snapshot(key)
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    @rpc
    def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        if not request.group_snapshot_id:
            raise invalid("GetVolumeGroupSnapshot needs a group_snapshot_id")
        check_maps(request)
        backend, key = self.controller._locate(request.group_snapshot_id, "group snapshot")
        group = backend.get_group_snapshot(key)
        _check_listed(self._member_ids(backend, group), request.snapshot_ids, exact=True)
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=self._message(backend, group))

    def _member_ids(self, backend: LvmBackend, group: GroupSnapshot) -> set[str]:
        return {ids.join_volume_id(backend.name, member.lv) for member in group.members}

    def _message(self, backend: LvmBackend, group: GroupSnapshot) -> csi_pb2.VolumeGroupSnapshot:
        created = Timestamp()
        created.FromDatetime(group.created)
        return csi_pb2.VolumeGroupSnapshot(
            group_snapshot_id=ids.join_volume_id(backend.name, group.key),
            snapshots=[self.controller._snapshot_message(backend, member) for member in group.members],
            creation_time=created,
            ready_to_use=True,
        )


def _check_listed(members: set[str], listed: Iterable[str], exact: bool) -> None:
    """INVALID_ARGUMENT when the request's snapshot_ids (optional for Berth) do not match the group's members."""
    listed = set(listed)
    if not listed:
        return
    unlisted, strangers = sorted(members - listed), sorted(listed - members) if exact else []
    if unlisted or strangers:
        problems = ([f"leave out its members {', '.join(unlisted)}"] if unlisted else []) + (
            [f"name {', '.join(strangers)}, which are not its members"] if strangers else []
        )
        raise invalid(f"snapshot_ids do not match the group snapshot: they {' and '.join(problems)}")
