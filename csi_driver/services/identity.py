"""CSI Identity service: who the plugin is, what it offers, and whether it is ready to serve."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi_driver import __version__
from csi_driver.csi import csi_pb2, csi_pb2_grpc

log = logging.getLogger("berth.identity")

# A readiness check returns None when healthy, or a sentence saying what is wrong.
ReadinessCheck = Callable[[], str | None]

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, driver_name: str, controller: bool, checks: Sequence[ReadinessCheck] = ()) -> None:
        self.driver_name = driver_name
        self.controller = controller
        self.checks = list(checks)

    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=__version__)

    def GetPluginCapabilities(self, request, context):
        capabilities = []
        if self.controller:
            capabilities += [
                csi_pb2.PluginCapability(service=_Service(type=_Service.CONTROLLER_SERVICE)),
                csi_pb2.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)),
            ]
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=capabilities)

    def Probe(self, request, context):
        problems = [problem for problem in (check() for check in self.checks) if problem]
        if problems:
            reason = "; ".join(problems)
            log.warning("not ready", extra={"reason": reason})
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"not ready: {reason}")
        return csi_pb2.ProbeResponse(ready=BoolValue(value=True))
