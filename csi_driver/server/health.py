"""HTTP health endpoint for kubelet's liveness probe: GET /healthz answers 200 "ok" or 503 with the reason.

It replaces the livenessprobe sidecar. It runs in its own threads, so it answers while every gRPC worker is busy;
the readiness function it calls (IdentityService.not_ready_reason) bounds each check in time.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("berth.health")

HEALTH_PATH = "/healthz"

# Returns None when ready, else a sentence saying what is wrong.
NotReadyReason = Callable[[], str | None]


class _HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], not_ready_reason: NotReadyReason) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.not_ready_reason = not_ready_reason
        super().__init__(address, _HealthHandler)


class _HealthHandler(BaseHTTPRequestHandler):
    server: _HealthServer

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != HEALTH_PATH:
            self._answer(404, "not found")
            return
        try:
            reason = self.server.not_ready_reason()
        except Exception as err:  # a bug in a check: still answer, and keep the traceback in the log
            log.exception("health check failed")
            reason = f"health check failed: {type(err).__name__}: {err}"
        if reason:
            self._answer(503, f"not ready: {reason}")
        else:
            self._answer(200, "ok")

    def _answer(self, status: int, body: str) -> None:
        data = (body + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        # kubelet asks every few seconds: keep it out of the info log.
        log.debug("healthz request", extra={"client": self.client_address[0], "request": format % args})


class HealthEndpoint:
    """Serves /healthz on address:port in a daemon thread between start() and stop()."""

    def __init__(self, address: str, port: int, not_ready_reason: NotReadyReason) -> None:
        self.address = address
        self.port = port
        self._not_ready_reason = not_ready_reason
        self._server: _HealthServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._server = _HealthServer((self.address, self.port), self._not_ready_reason)
        except OSError as err:
            raise RuntimeError(f"health endpoint {self.address}:{self.port}: {err.strerror or err}") from err
        self.port = self._server.server_address[1]  # the real port when 0 asked for any free one
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="healthz")
        self._thread.start()
        log.info("health endpoint listening", extra={"address": self.address, "port": self.port, "path": HEALTH_PATH})

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        log.info("health endpoint stopped", extra={"port": self.port})
