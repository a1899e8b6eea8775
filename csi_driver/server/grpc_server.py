"""The gRPC server: bounded worker pool, unix or TCP endpoint, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc

from csi_driver.server.endpoint import Endpoint, prepare_unix_socket
from csi_driver.server.interceptor import LoggingInterceptor

log = logging.getLogger("berth.server")

# Registers one servicer on a server, e.g. csi_pb2_grpc.add_IdentityServicer_to_server bound to a servicer.
Registration = Callable[[grpc.Server], None]


@dataclass(frozen=True)
class ServerOptions:
    workers: int = 8
    # RPCs beyond this many in flight or queued are refused with RESOURCE_EXHAUSTED instead of piling up.
    max_pending_rpcs: int = 64
    socket_mode: int = 0o600
    grace_seconds: float = 20.0


class CsiServer:
    def __init__(self, endpoint: Endpoint, registrations: list[Registration], options: ServerOptions) -> None:
        self.endpoint = endpoint
        self.options = options
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="rpc"),
            interceptors=[LoggingInterceptor()],
            maximum_concurrent_rpcs=options.max_pending_rpcs,
        )
        for register in registrations:
            register(self._server)
        self.port = 0

    def start(self) -> None:
        if self.endpoint.scheme == "unix":
            prepare_unix_socket(self.endpoint.address)
            # Create the socket with the final mode: no window in which others could connect.
            previous_umask = os.umask(0o777 & ~self.options.socket_mode)
            try:
                self.port = self._server.add_insecure_port(self.endpoint.grpc_address)
            finally:
                os.umask(previous_umask)
        else:
            self.port = self._server.add_insecure_port(self.endpoint.grpc_address)
        self._server.start()
        if self.endpoint.scheme == "unix":
            os.chmod(self.endpoint.address, self.options.socket_mode)
        log.info("listening", extra={"endpoint": str(self.endpoint), "workers": self.options.workers})

    def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, give in-flight ones `grace` seconds, then cancel them."""
        grace = self.options.grace_seconds if grace is None else grace
        self._server.stop(grace).wait()
        if self.endpoint.scheme == "unix":
            try:
                os.unlink(self.endpoint.address)
            except FileNotFoundError:
                pass
        log.info("stopped", extra={"endpoint": str(self.endpoint)})

    def serve_until_signalled(self) -> int:
        """Run until SIGTERM or SIGINT, then shut down gracefully. Returns the process exit code."""
        stop_requested = threading.Event()
        received: list[str] = []

        def on_signal(signum: int, _frame: object) -> None:
            received.append(signal.Signals(signum).name)
            stop_requested.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            stop_requested.wait()
            log.info(
                "shutting down", extra={"signal": received[0], "grace_seconds": self.options.grace_seconds}
            )
            self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0
