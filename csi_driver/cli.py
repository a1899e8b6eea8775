"""`berth`: run the CSI controller, node, or both in one process."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable

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
        epilog="berth orphans --help: report (and remove) leftovers that no CSI object owns (docs/orphans.md).",
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
        help="gRPC worker threads for Controller calls, and as many for Node calls; Identity has its own "
        "(default: %(default)s)",
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
    if controller:
        from csi_driver.services.controller import ControllerService

        backends = build_backends(config)
        controller_service = ControllerService(backends, config.default_backend, config.node.max_volumes_per_node)
        registrations.append(lambda server: csi_pb2_grpc.add_ControllerServicer_to_server(controller_service, server))
        checks.append(backend_readiness_check(backends))
    if node:
        from csi_driver.node.identity import default_node_id
        from csi_driver.services.node import make_node_service

        args.node_id = args.node_id or default_node_id(socket.gethostname(), config.node.storage_networks)
        node_service = make_node_service(
            args.node_id, config.node.state_dir, config.node.max_volumes_per_node, config.node.protocols
        )
        registrations.append(lambda server: csi_pb2_grpc.add_NodeServicer_to_server(node_service, server))
        checks.append(node_readiness_check(config.node.protocols, config.node.state_dir))
    identity = IdentityService(driver_name, controller=controller, checks=checks)
    registrations.append(lambda server: csi_pb2_grpc.add_IdentityServicer_to_server(identity, server))
    options = ServerOptions(workers=args.workers, socket_mode=args.socket_mode, grace_seconds=args.grace_period)
    companions = build_companions(args, driver_name, identity.not_ready_reason)
    return CsiServer(parse_endpoint(args.endpoint), registrations, options, companions)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["orphans"]:  # a command of its own: none of the server's options apply to it
        from csi_driver.orphans import main as orphans_main

        return orphans_main(argv[1:])
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
        return server.serve_until_signalled()
    except (EndpointError, RuntimeError, OSError) as err:
        return _fail(f"cannot serve on {args.endpoint}: {err}")


def _fail(message: str) -> int:
    print(f"berth: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
