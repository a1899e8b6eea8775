"""The composition root: turns a validated Config into runners, backends and CSI services.

The only module that knows every layer; the layers themselves stay ignorant of each other.
"""

from __future__ import annotations

import logging
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
        backends[name] = LvmBackend(
            name, pool, build_exporter(backend, runner), backend.lvm.over_provisioning_ratio
        )
    return backends


def backend_readiness_check(backends: dict[str, LvmBackend]) -> Callable[[], str | None]:
    """Probe: every backend's storage host answers and its thin pool exists."""

    def check() -> str | None:
        problems = []
        for name, backend in backends.items():
            try:
                backend.pool.capacity()
            except StorageError as err:
                problems.append(f"backend {name}: {err}")
        return "; ".join(problems) or None

    return check
