"""`berth orphans`: report, and with --remove remove, leftovers that no CSI object owns (docs/orphans.md).

    berth orphans --config FILE [--backend NAME]... [--older-than SECONDS] [--remove] [--json]
    berth orphans --node --config FILE [--older-than SECONDS] [--remove] [--json]

Without --node it audits the storage host of every configured backend (csi_driver/storage/orphans.py); with --node,
this node's stage records (csi_driver/node/orphans.py). The JSON it prints is a pinned format (FORMAT_VERSION).
Exit status: 0 nothing left over, 1 leftovers remain (reported, or a removal failed), 2 the audit could not run or
could not read a host (the report is incomplete).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from csi_driver.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # imported where used: a node has no storage layer to load, a controller no node layer
    from csi_driver.node.volumes import NodeVolumes
    from csi_driver.storage.backend import LvmBackend

FORMAT_VERSION = 1
DEFAULT_OLDER_THAN_SECONDS = 3600


@dataclass
class Entry:
    """One orphan as the JSON report carries it (docs/orphans.md pins the fields)."""

    kind: str
    backend: str | None  # None on a node
    name: str  # LV name, or the volume ID of a stage record
    reason: str
    detail: dict[str, Any]
    removed: bool = False
    error: str | None = None


@dataclass
class Report:
    scope: str  # "storage" | "node"
    older_than_seconds: int
    remove: bool
    orphans: list[Entry] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)  # {"where": ..., "message": ...}

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}

    def exit_status(self) -> int:
        if self.errors:
            return 2
        return 1 if any(not entry.removed for entry in self.orphans) else 0


def audit_storage(
    backends: dict[str, LvmBackend], older_than: int, remove: bool, now: Callable[[], datetime] | None = None
) -> Report:
    """Every storage host of `backends`; a host that fails is an error, the others go on. `now`: the clock."""
    from csi_driver.storage.errors import StorageError
    from csi_driver.storage.orphans import host_audits, utc_now

    report = Report("storage", older_than, remove)
    for audit in host_audits(backends, older_than, now or utc_now):
        where = f"storage host {audit.host} (backends {', '.join(b.name for b in audit.backends)})"
        try:
            found = audit.find()
            outcomes = audit.remove(found) if remove and found else [(orphan, None) for orphan in found]
        except StorageError as err:
            report.errors.append({"where": where, "message": str(err)})
            continue
        for orphan, error in outcomes:
            entry = Entry(orphan.kind, orphan.backend, orphan.lv, orphan.reason, dict(orphan.detail))
            report.orphans.append(_outcome(entry, remove, error))
    return report


def audit_node(volumes: NodeVolumes, older_than: int, remove: bool) -> Report:
    """This node's stage records."""
    from csi_driver.node.orphans import find_stale_stages, remove_stale_stages

    report = Report("node", older_than, remove)
    found = find_stale_stages(volumes, older_than)
    outcomes = remove_stale_stages(volumes, found, older_than) if remove and found else [(s, None) for s in found]
    for stale, error in outcomes:
        detail = {"protocol": stale.protocol, "staging_path": stale.staging_path, "age_seconds": stale.age_seconds}
        entry = Entry("stage_record", None, stale.volume_id, stale.reason, detail)
        report.orphans.append(_outcome(entry, remove, error))
    return report


def _outcome(entry: Entry, removing: bool, error: str | None) -> Entry:
    if removing:
        entry.removed, entry.error = error is None, error
    return entry


def render_text(report: Report) -> str:
    lines = []
    for entry in report.orphans:
        outcome = ""
        if report.remove:
            outcome = " [removed]" if entry.removed else f" [NOT removed: {entry.error}]"
        lines.append(f"{entry.kind:<16} {entry.backend or '-':<12} {entry.name}: {entry.reason}{outcome}")
    lines += [f"error: {e['where']}: {e['message']}" for e in report.errors]
    where = "on the storage hosts" if report.scope == "storage" else "on this node"
    count = len(report.orphans)
    if not count:
        summary = f"no orphans {where}"
    elif report.remove:
        removed = sum(1 for entry in report.orphans if entry.removed)
        summary = f"{count} orphan(s) {where}, {removed} removed"
    else:
        summary = f"{count} orphan(s) {where}; --remove removes them"
    if report.errors:
        summary += " (incomplete: see the errors above)"
    return "\n".join([*lines, summary]) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="berth orphans",
        description="Report (and with --remove, remove) leftovers no CSI object owns: volume LVs still being "
        "created after --older-than, iSCSI targets, backstores and NFS exports without their LV; with --node, "
        "stage records whose device or mount is gone. Exit 0: none; 1: some remain; 2: the audit is incomplete.",
    )
    parser.add_argument("--config", metavar="FILE", required=True, help="Berth's YAML config file")
    parser.add_argument("--node", action="store_true", help="audit this node's stage records instead of storage hosts")
    parser.add_argument(
        "--backend", action="append", metavar="NAME", help="audit only this backend's host (repeatable; default: all)"
    )
    parser.add_argument(
        "--older-than",
        type=int,
        default=DEFAULT_OLDER_THAN_SECONDS,
        metavar="SECONDS",
        help="an unfinished volume, or a stale stage record, must be this old to count (default: %(default)s)",
    )
    parser.add_argument("--remove", action="store_true", help="remove what is found, through DeleteVolume's paths")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (docs/orphans.md)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.older_than < 0:
        return _fail("--older-than must be 0 or more seconds")
    try:
        config = load_config(args.config)
        if args.node:
            report = audit_node(_node_volumes(config), args.older_than, args.remove)
        else:
            backends = _backends(config, args.backend)
            try:
                report = audit_storage(backends, args.older_than, args.remove)
            finally:
                for backend in backends.values():
                    backend.pool.runner.close()  # ends the SSH master connections (closing twice is fine)
    except ConfigError as err:
        return _fail(str(err))
    text = json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n" if args.json else render_text(report)
    sys.stdout.write(text)
    return report.exit_status()


def _backends(config: Config, names: list[str] | None) -> dict[str, LvmBackend]:
    from csi_driver.assembly import build_backends

    unknown = sorted(set(names or ()) - set(config.backends))
    if unknown:
        known = ", ".join(sorted(config.backends))
        raise ConfigError(f"no backend {', '.join(unknown)} in the config (known: {known})")
    chosen = Config(config.driver_name, {n: b for n, b in config.backends.items() if not names or n in names})
    return build_backends(chosen)


def _node_volumes(config: Config) -> NodeVolumes:
    from csi_driver.services.node import make_node_service

    # The node ID only matters to NodeGetInfo, which this never answers.
    return make_node_service("berth-orphans", config.node.state_dir, 0, config.node.protocols).volumes


def _fail(message: str) -> int:
    print(f"berth orphans: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
