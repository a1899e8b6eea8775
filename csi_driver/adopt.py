"""`berth adopt`: bring an existing LV of a configured pool under Berth's management and print the PersistentVolume
that makes it a Kubernetes volume (static provisioning, docs/adoption.md).

    berth adopt --config FILE --backend NAME --lv LV --name PV_NAME [--parameter KEY=VALUE]...
                [--volume-mode Block|Filesystem] [--access-mode MODE] [--fs-type ext4|xfs] [--storage-class NAME]

The LV is tagged and renamed to the volume's LV (the name is Berth's only record of it: LVs are named after their
CSI name), and prepared as any volume is (NFS: mounted on the host and ready for export). An LV that is open, that is
not a thin LV of the backend's pool, or that Berth already manages is refused. Exit status: 0 adopted (the manifest
is on stdout), 1 refused or failed (why, on stderr), 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from csi_driver.config import ConfigError, load_config
from csi_driver.ids import join_volume_id

ACCESS_MODES = ("ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany", "ReadOnlyMany")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="berth adopt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", metavar="FILE", required=True, help="Berth's YAML config file")
    parser.add_argument("--backend", metavar="NAME", required=True, help="the backend whose pool holds the LV")
    parser.add_argument("--lv", metavar="LV", required=True, help="the LV's name in the backend's volume group")
    parser.add_argument("--name", metavar="PV_NAME", required=True, help="the PersistentVolume's name")
    parser.add_argument("--parameter", metavar="KEY=VALUE", action="append", default=[],
                        help="a StorageClass parameter for the volume (repeatable), e.g. nfsExportOptions")  # fmt: skip
    parser.add_argument("--volume-mode", choices=("Block", "Filesystem"),
                        help="default: Block on iSCSI, Filesystem on NFS")  # fmt: skip
    parser.add_argument("--access-mode", choices=ACCESS_MODES,
                        help="default: ReadWriteMany, or ReadWriteOnce for an iSCSI filesystem")  # fmt: skip
    parser.add_argument("--fs-type", default="ext4", help="an iSCSI Filesystem volume's filesystem (default: ext4)")
    parser.add_argument("--storage-class", default="", help="storageClassName of the PV (default: none)")
    return parser


def persistent_volume(args: argparse.Namespace, driver: str, protocol: str, volume_id: str, size: int,
                      context: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """The PV for the adopted volume. Retain: the data was there before Berth, deleting the PV must not destroy it."""
    mode = args.volume_mode or ("Block" if protocol == "iscsi" else "Filesystem")
    access = args.access_mode or ("ReadWriteOnce" if (protocol, mode) == ("iscsi", "Filesystem") else "ReadWriteMany")
    csi: dict[str, Any] = {"driver": driver, "volumeHandle": volume_id, "volumeAttributes": context}
    if mode == "Filesystem":
        csi["fsType"] = "nfs" if protocol == "nfs" else args.fs_type
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": args.name, "labels": {"berth.csi.io/adopted": "true"}},
        "spec": {"capacity": {"storage": str(size)}, "accessModes": [access], "volumeMode": mode,
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": args.storage_class, "csi": csi},
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from csi_driver.assembly import build_backends
    from csi_driver.config import Config
    from csi_driver.storage.errors import StorageError

    args = build_parser().parse_args(argv)
    parameters = dict(p.partition("=")[::2] for p in args.parameter)
    if any(not key for key in parameters) or any("=" not in p for p in args.parameter):
        return _fail("--parameter takes KEY=VALUE", 2)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        return _fail(str(err), 2)
    if args.backend not in config.backends:
        return _fail(f"no backend {args.backend!r} in the config (known: {', '.join(sorted(config.backends))})", 2)
    backend = build_backends(Config(config.driver_name, {args.backend: config.backends[args.backend]}))[args.backend]
    try:
        volume = backend.adopt_volume(args.lv, args.name, parameters)
    except StorageError as err:
        return _fail(str(err), 1)
    finally:
        backend.pool.runner.close()
    pv = persistent_volume(args, config.driver_name, backend.protocol, join_volume_id(args.backend, volume.lv),
                           volume.size_bytes, volume.context)  # fmt: skip
    sys.stdout.write(yaml.safe_dump(pv, sort_keys=False))
    return 0


def _fail(message: str, status: int) -> int:
    print(f"berth adopt: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
