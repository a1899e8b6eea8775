"""Registration with kubelet: the job node-driver-registrar does, done in-process.

kubelet watches its plugins_registry directory (/var/lib/kubelet/plugins_registry) for sockets. For
`<driver>-reg.sock` it calls Registration.GetInfo, checks the answer, dials the CSI endpoint named there, and
reports the outcome with NotifyRegistrationStatus. Removing the socket deregisters the driver.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures

import grpc

from csi_driver.kubelet import pluginregistration_pb2, pluginregistration_pb2_grpc
from csi_driver.server.grpc_server import serve_on_unix_socket

log = logging.getLogger("berth.registration")

PLUGIN_TYPE = "CSIPlugin"
# The CSI versions this plugin speaks, as kubelet's CSI plugin handler parses them (it needs major version 1).
SUPPORTED_VERSIONS = ("1.0.0",)


def registration_socket_path(registration_dir: str, driver_name: str) -> str:
    return os.path.join(registration_dir, f"{driver_name}-reg.sock")


class RegistrationService(pluginregistration_pb2_grpc.RegistrationServicer):
    def __init__(self, driver_name: str, csi_endpoint: str) -> None:
        self.driver_name = driver_name
        self.csi_endpoint = csi_endpoint

    def GetInfo(
        self, request: pluginregistration_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> pluginregistration_pb2.PluginInfo:
        return pluginregistration_pb2.PluginInfo(
            type=PLUGIN_TYPE,
            name=self.driver_name,
            endpoint=self.csi_endpoint,
            supported_versions=SUPPORTED_VERSIONS,
        )

    def NotifyRegistrationStatus(
        self, request: pluginregistration_pb2.RegistrationStatus, context: grpc.ServicerContext
    ) -> pluginregistration_pb2.RegistrationStatusResponse:
        if request.plugin_registered:
            log.info("registered with kubelet", extra={"driver": self.driver_name, "endpoint": self.csi_endpoint})
        else:
            # kubelet retries while the socket stays, so keep serving; its reason is what the operator needs.
            log.error(
                "kubelet refused the registration",
                extra={"driver": self.driver_name, "endpoint": self.csi_endpoint, "reason": request.error},
            )
        return pluginregistration_pb2.RegistrationStatusResponse()


class KubeletRegistration:
    """Serves the Registration service on <registration_dir>/<driver>-reg.sock between start() and stop()."""

    def __init__(self, registration_dir: str, driver_name: str, csi_endpoint: str, socket_mode: int = 0o600) -> None:
        self.socket_path = registration_socket_path(registration_dir, driver_name)
        self.service = RegistrationService(driver_name, csi_endpoint)
        self.socket_mode = socket_mode
        self._server: grpc.Server | None = None

    def start(self) -> None:
        # kubelet makes two calls, one after the other.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="registration"))
        pluginregistration_pb2_grpc.add_RegistrationServicer_to_server(self.service, server)
        serve_on_unix_socket(server, self.socket_path, self.socket_mode)
        self._server = server
        log.info(
            "registration socket listening",
            extra={"socket": self.socket_path, "csi_endpoint": self.service.csi_endpoint},
        )

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop(0).wait()
        self._server = None
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        log.info("registration socket removed", extra={"socket": self.socket_path})
