"""The composition root: turns a validated Config into runners, backends and CSI services.

The only module that knows every layer; the layers themselves stay ignorant of each other.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from csi_driver.config import BackendConfig, Config, HostConfig
from csi_driver.storage.backend import Exporter, LvmBackend
from csi_driver.storage.errors import StorageError
from csi_driver.storage.lvm import ThinPool
from csi_driver.storage.runner import CommandRunner, LocalRunner, SshRunner

log = logging.getLogger("berth")


def build_runner(host: HostConfig) -> CommandRunner:
    if host.address == "local":
        return LocalRunner()
    return SshRunner(
        host.address,
        port=host.ssh_port,
        user=host.ssh_user,
        identity_file=host.ssh_identity_file,
        known_hosts=host.ssh_known_hosts_file,
        strict_host_key_checking=host.ssh_strict_host_key_checking,
        connect_timeout=host.ssh_connect_timeout_seconds,
    )


def build_exporter(backend: BackendConfig, runner: CommandRunner) -> Exporter:
    if backend.protocol == "iscsi":
        from csi_driver.storage.iscsi import IscsiExporter
        from csi_driver.storage.lio import LioTargets

        assert backend.iscsi is not None  # guaranteed by config validation
        return IscsiExporter(LioTargets(runner, backend.iscsi.iqn_prefix), backend.iscsi.portals)
    from csi_driver.storage.nfs import NfsExporter

    assert backend.nfs is not None
    nfs = backend.nfs
    return NfsExporter(runner, nfs.server, nfs.export_root, nfs.filesystem, nfs.export_options)


def build_backends(config: Config) -> dict[str, LvmBackend]:
    # Backends on the same host share one runner, hence one SSH connection.
    runners: dict[HostConfig, CommandRunner] = {}
    backends = {}
    for name, backend in config.backends.items():
        runner = runners.setdefault(backend.host, build_runner(backend.host))
        pool = ThinPool(runner, backend.lvm.volume_group, backend.lvm.thin_pool)
        lvm = backend.lvm
        exporter = build_exporter(backend, runner)
        backends[name] = LvmBackend(name, pool, exporter, lvm.over_provisioning_ratio, lvm.full_threshold_percent)
    return backends


# How often Probe may start a look at the storage hosts (Probe itself never waits for one).
BACKEND_CHECK_INTERVAL_SECONDS = 30.0


class BackendWatch:
    """Probe's view of the storage backends: it never fails Probe and never waits for a storage host.

    A restart cannot bring a storage host back, and one dead host must not restart the controller for all the
    others: their calls keep working, calls to the dead one answer UNAVAILABLE fast (SshRunner) and it is used again
    as soon as it answers. Probe only starts a background look at every backend (at most one at a time, at most every
    `interval` seconds), which logs each backend whose state changed: unreachable, misconfigured, back.
    """

    def __init__(self, backends: dict[str, LvmBackend], interval: float = BACKEND_CHECK_INTERVAL_SECONDS) -> None:
        self.backends = backends
        self.interval = interval
        self.problems: dict[str, str | None] = {}  # backend → its last problem, None when it answered
        self._lock = threading.Lock()
        self._looking = False
        self._last_look = -math.inf

    def __call__(self) -> None:
        with self._lock:
            if self._looking or time.monotonic() - self._last_look < self.interval:
                return None
            self._looking = True
        threading.Thread(target=self.look, daemon=True, name="backend-watch").start()
        return None

    def look(self) -> None:
        try:
            for name, backend in self.backends.items():
                try:
                    backend.pool.capacity()
                    problem = None
                except StorageError as err:
                    problem = str(err)
                if name in self.problems and problem == self.problems[name]:
                    continue
                if problem:
                    log.warning("backend not usable", extra={"backend": name, "reason": problem})
                elif name in self.problems:
                    log.info("backend usable again", extra={"backend": name})
                self.problems[name] = problem
        finally:
            with self._lock:
                self._looking = False
                self._last_look = time.monotonic()


def backend_readiness_check(backends: dict[str, LvmBackend]) -> Callable[[], str | None]:
    """The controller's readiness check: a BackendWatch, which logs and never fails (see there why)."""
    return BackendWatch(backends)
