"""`berth`: run the CSI controller, node, or both in one process."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

from csi_driver import __version__
from csi_driver.config import Config, ConfigError, load_config
from csi_driver.server.endpoint import EndpointError, parse_endpoint
from csi_driver.server.grpc_server import Companion, CsiServer, ServerOptions
from csi_driver.server.logs import configure_logging

log = logging.getLogger("berth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="berth",
        description="Berth CSI driver: iSCSI block and NFS file volumes from Linux storage hosts.",
        epilog="berth orphans --help: report (and remove) leftovers that no CSI object owns (docs/orphans.md). "
        "berth host-command: the storage host's forced command for restricted SSH access (docs/storage-host.md). "
        "berth adopt --help: bring an existing LV under Berth's management (docs/adoption.md).",
    )
    parser.add_argument("--version", action="version", version=f"berth {__version__}")
    parser.add_argument(
        "--mode",
        choices=("controller", "node", "all"),
        default="all",
        help="which CSI services to serve besides Identity (default: all)",
    )
    parser.add_argument(
        "--endpoint",
        default="unix:///csi/csi.sock",
        help="unix:///path/to.sock or tcp://host:port (default: %(default)s)",
    )
    parser.add_argument(
        "--node-id",
        help="this node's ID (default: '<initiator IQN>|<global addresses>', else the host name); node mode only",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config file describing storage backends")
    parser.add_argument("--driver-name", help="CSI driver name (default: from config, else berth.csi.io)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="debug also logs request and response bodies, with csi_secret fields stripped",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=16,
        help="gRPC worker threads for Controller calls, and as many for Node calls and for SnapshotMetadata "
        "streams; Identity has its own (default: %(default)s)",
    )
    parser.add_argument(
        "--socket-mode",
        type=lambda text: int(text, 8),
        default=0o600,
        help="octal permission bits of a unix socket (default: 0600)",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=20.0,
        help="seconds in-flight RPCs get to finish on SIGTERM (default: %(default)s)",
    )
    parser.add_argument(
        "--kubelet-registration-dir",
        metavar="DIR",
        help="register with kubelet through <DIR>/<driver name>-reg.sock (the host's "
        "/var/lib/kubelet/plugins_registry); node or all mode only",
    )
    parser.add_argument(
        "--kubelet-csi-endpoint",
        metavar="PATH",
        help="the CSI socket path kubelet dials, told to kubelet at registration (default: the path of --endpoint)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=0,
        help="serve GET /healthz (200 ok, or 503 with the reason) on this TCP port; 0 = off (default)",
    )
    parser.add_argument("--health-address", default="0.0.0.0", help="address for --health-port (default: %(default)s)")
    return parser


def build_companions(
    args: argparse.Namespace, driver_name: str, not_ready_reason: Callable[[], str | None]
) -> list[Companion]:
    """What runs beside the CSI server: kubelet registration (node side) and the HTTP health endpoint."""
    companions: list[Companion] = []
    if args.kubelet_registration_dir:
        if args.mode == "controller":
            raise EndpointError("--kubelet-registration-dir needs --mode node or all")
        from csi_driver.server.registration import KubeletRegistration

        csi_endpoint = args.kubelet_csi_endpoint
        if not csi_endpoint:
            endpoint = parse_endpoint(args.endpoint)
            if endpoint.scheme != "unix":
                raise EndpointError("--kubelet-registration-dir with a tcp --endpoint needs --kubelet-csi-endpoint")
            csi_endpoint = endpoint.address
        companions.append(KubeletRegistration(args.kubelet_registration_dir, driver_name, csi_endpoint))
    if args.health_port:
        from csi_driver.server.health import HealthEndpoint

        companions.append(HealthEndpoint(args.health_address, args.health_port, not_ready_reason))
    return companions


def build_server(args: argparse.Namespace, config: Config) -> CsiServer:
    from csi_driver.assembly import backend_readiness_check, build_backends
    from csi_driver.csi import csi_pb2_grpc
    from csi_driver.node.prerequisites import node_readiness_check
    from csi_driver.services.identity import IdentityService

    driver_name = args.driver_name or config.driver_name
    controller = args.mode in ("controller", "all")
    node = args.mode in ("node", "all")
    checks = []
    registrations = []
    snapshot_metadata = False
    if controller:
        from csi_driver.services.controller import ControllerService
        from csi_driver.services.group_controller import GroupControllerService
        from csi_driver.services.snapshot_metadata import SnapshotMetadataService
        from csi_driver.storage.thin_metadata import BLOCK_PROTOCOLS

        backends = build_backends(config)
        controller_service = ControllerService(backends, config.default_backend, config.node.max_volumes_per_node)
        registrations.append(lambda server: csi_pb2_grpc.add_ControllerServicer_to_server(controller_service, server))
        group_service = GroupControllerService(controller_service)
        registrations.append(lambda server: csi_pb2_grpc.add_GroupControllerServicer_to_server(group_service, server))
        checks.append(backend_readiness_check(backends))
        # Changed-block tracking means something for block volumes only: offered when a backend serves them.
        snapshot_metadata = any(backend.protocol in BLOCK_PROTOCOLS for backend in backends.values())
        if snapshot_metadata:
            metadata_service = SnapshotMetadataService(backends)
            registrations.append(
                lambda server: csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(metadata_service, server)
            )
    if node:
        from csi_driver.node.identity import default_node_id
        from csi_driver.services.node import make_node_service

        args.node_id = args.node_id or default_node_id(socket.gethostname(), config.node.storage_networks)
        node_service = make_node_service(
            args.node_id, config.node.state_dir, config.node.max_volumes_per_node, config.node.protocols
        )
        registrations.append(lambda server: csi_pb2_grpc.add_NodeServicer_to_server(node_service, server))
        checks.append(node_readiness_check(config.node.protocols, config.node.state_dir))
    identity = IdentityService(driver_name, controller=controller, checks=checks, snapshot_metadata=snapshot_metadata)
    registrations.append(lambda server: csi_pb2_grpc.add_IdentityServicer_to_server(identity, server))
    options = ServerOptions(workers=args.workers, socket_mode=args.socket_mode, grace_seconds=args.grace_period)
    companions = build_companions(args, driver_name, identity.not_ready_reason)
    return CsiServer(parse_endpoint(args.endpoint), registrations, options, companions)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["orphans"]:  # a command of its own: none of the server's options apply to it
        from csi_driver.orphans import main as orphans_main

        return orphans_main(argv[1:])
    if argv[:1] == ["adopt"]:  # static provisioning of an existing LV
        from csi_driver.adopt import main as adopt_main

        return adopt_main(argv[1:])
    if argv[:1] == ["host-command"]:  # the storage host's forced command for restricted SSH access
        from csi_driver.storage.host_access import berth_host_script

        if argv[1:]:
            return _fail("usage: berth host-command > /usr/local/sbin/berth-host (docs/storage-host.md)")
        sys.stdout.write(berth_host_script())
        return 0
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    if args.workers < 1:
        return _fail("--workers must be at least 1")
    if not 0 <= args.health_port < 65536:
        return _fail("--health-port must be 0 (off) or a TCP port")
    try:
        config = load_config(args.config)
        server = build_server(args, config)
    except (ConfigError, EndpointError) as err:
        return _fail(str(err))
    node_id = args.node_id or "-"
    driver_name = args.driver_name or config.driver_name
    log.info(
        "starting berth",
        extra={"version": __version__, "mode": args.mode, "driver": driver_name, "node_id": node_id},
    )
    try:
        code = server.serve_until_signalled()
    except (EndpointError, RuntimeError, OSError) as err:
        return _fail(f"cannot serve on {args.endpoint}: {err}")
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """Leave once the server stopped gracefully. Berth's state is durable by design (LV tags, atomic stage records),
    and a library's leftover thread must not hold the interpreter's exit: in the lab one did, after a module's worth
    of calls, until systemd's SIGKILL 90 s later; a restarted pod would wait out its grace period the same way."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fail(message: str) -> int:
    print(f"berth: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
