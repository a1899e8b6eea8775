"""The gRPC server: bounded worker pool, unix or TCP endpoint, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from csi_driver.server.endpoint import Endpoint, prepare_unix_socket
from csi_driver.server.interceptor import LoggingInterceptor
from csi_driver.server.lanes import Lanes

log = logging.getLogger("berth.server")

# Registers one servicer on a server, e.g. csi_pb2_grpc.add_IdentityServicer_to_server bound to a servicer.
Registration = Callable[[grpc.Server], None]


class Companion(Protocol):
    """Something that runs alongside the CSI server: kubelet registration, the HTTP health endpoint.

    stop() must be safe to call when start() never ran or failed.
    """

    def start(self) -> None: ...

    def stop(self) -> None: ...


# A unix socket path longer than this does not fit in sockaddr_un.
MAX_UNIX_PATH = 107


def serve_on_unix_socket(server: grpc.Server, path: str, mode: int) -> int:
    """Start server on a unix socket with the given permission bits, replacing a stale socket.

    The socket appears at `path` only once the server accepts. gRPC binds at add_insecure_port but serves only after
    start(); a client that connects in between has its connection reset, and the CSI sidecars (csi-lib-utils) exit
    with "Lost connection to CSI driver" when their first connection drops. So the server binds a hidden sibling
    (kubelet's plugin watcher ignores names starting with '.'), starts, and the socket is renamed into place.
    """
    prepare_unix_socket(path)
    directory, name = os.path.split(path)
    hidden = os.path.join(directory, f".{name}.new")
    bind_path = hidden if len(hidden) <= MAX_UNIX_PATH else path
    if bind_path != path:
        prepare_unix_socket(bind_path)  # left by a run that died between bind and rename
    # Create the socket with the final mode: no window in which others could connect.
    previous_umask = os.umask(0o777 & ~mode)
    try:
        port = server.add_insecure_port(f"unix:{bind_path}")
    finally:
        os.umask(previous_umask)
    os.chmod(bind_path, mode)
    server.start()
    if bind_path != path:
        os.rename(bind_path, path)
    return port


@dataclass(frozen=True)
class ServerOptions:
    # Threads of the Controller lane and of the Node lane each; Identity has a lane of its own (lanes.py).
    workers: int = 16
    # A backstop against memory, not a scheduler: RPCs beyond this many in flight or queued, in all lanes together,
    # are refused with RESOURCE_EXHAUSTED (Probe included, so it is far above what COs send at once).
    max_pending_rpcs: int = 512
    socket_mode: int = 0o600
    grace_seconds: float = 20.0


class CsiServer:
    def __init__(
        self,
        endpoint: Endpoint,
        registrations: list[Registration],
        options: ServerOptions,
        companions: Sequence[Companion] = (),
    ) -> None:
        self.endpoint = endpoint
        self.options = options
        # Started once the CSI socket listens (kubelet dials it as soon as it sees the registration socket).
        self.companions = list(companions)
        self._lanes = Lanes(options.workers)
        self._server = grpc.server(
            self._lanes.quick,  # every method runs in its lane; this pool only serves what no lane claims
            interceptors=[self._lanes.interceptor(), LoggingInterceptor()],
            maximum_concurrent_rpcs=options.max_pending_rpcs,
        )
        for register in registrations:
            register(self._server)
        self.port = 0

    def start(self) -> None:
        if self.endpoint.scheme == "unix":
            self.port = serve_on_unix_socket(self._server, self.endpoint.address, self.options.socket_mode)
        else:
            self.port = self._server.add_insecure_port(self.endpoint.grpc_address)
            self._server.start()
        log.info("listening", extra={"endpoint": str(self.endpoint), "workers": self.options.workers})
        try:
            for companion in self.companions:
                companion.start()
        except BaseException:
            self.stop(0)  # a companion's stop() is a no-op when it never started
            raise

    def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, give in-flight ones `grace` seconds, then cancel them."""
        grace = self.options.grace_seconds if grace is None else grace
        # Companions first: kubelet sees the registration socket go before the CSI socket does.
        for companion in reversed(self.companions):
            companion.stop()
        self._server.stop(grace).wait()
        self._lanes.shutdown()
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
