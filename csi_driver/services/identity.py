"""CSI Identity service: who the plugin is, what it offers, and whether it is ready to serve."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi_driver import __version__
from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.services.readiness import CHECK_TIMEOUT_SECONDS, BoundedCheck, ReadinessCheck, run_checks

log = logging.getLogger("berth.identity")

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(
        self,
        driver_name: str,
        controller: bool,
        checks: Sequence[ReadinessCheck] = (),
        check_timeout: float = CHECK_TIMEOUT_SECONDS,
        snapshot_metadata: bool = False,
    ) -> None:
        self.driver_name = driver_name
        self.controller = controller
        self.snapshot_metadata = snapshot_metadata  # the SnapshotMetadata service is served (controller mode)
        self.checks = [BoundedCheck(check) for check in checks]
        self.check_timeout = check_timeout

    def not_ready_reason(self) -> str | None:
        """None when every readiness check passes within the time bound, else what is wrong.

        Probe and the HTTP health endpoint both ask this.
        """
        return run_checks(self.checks, self.check_timeout)

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=__version__)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        capabilities = []
        if self.controller:
            capabilities += [
                csi_pb2.PluginCapability(service=_Service(type=_Service.CONTROLLER_SERVICE)),
                csi_pb2.PluginCapability(service=_Service(type=_Service.GROUP_CONTROLLER_SERVICE)),
                csi_pb2.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)),
            ]
        if self.snapshot_metadata:
            capabilities.append(csi_pb2.PluginCapability(service=_Service(type=_Service.SNAPSHOT_METADATA_SERVICE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=capabilities)

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        reason = self.not_ready_reason()
        if reason:
            log.warning("not ready", extra={"reason": reason})
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"not ready: {reason}")
        return csi_pb2.ProbeResponse(ready=BoolValue(value=True))
