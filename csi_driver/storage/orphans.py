"""Leftovers on a storage host that no CSI object owns, found and (on request) removed: `berth orphans`.

What counts (docs/orphans.md): a volume LV still tagged `state=creating` after a time limit (its CreateVolume kept
failing and nobody retries it), and an iSCSI target, a block backstore or an NFS export (exports file, clients,
fstab line, mount, directory) whose LV exists in no volume group of the host. A volume in state `ready` is never
an orphan by itself, nor is anything whose LV exists; names must be Berth's (`vol-`/`snap-` + 20 hex).

One audit per storage host covers every configured backend on it: one LIO call, one NFS call per export root, then
one `lvs` for the whole host. The exports are read before the LVs: CreateVolume makes the LV before any export, so
an export seen first and an LV missing after is really without its LV. Removal re-reads the LVs once and goes
through the code paths DeleteVolume uses (LvmBackend.delete_volume, the exporter's teardown), never anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import tags as meta_keys
from .backend import KEY_BACKEND, KIND_VOLUME, LvmBackend
from .errors import StorageError
from .ids import is_berth_lv
from .iscsi import IscsiExporter
from .lvm import LvInfo, host_lvs
from .nfs import NfsExporter

CREATING_VOLUME = "creating_volume"
ISCSI_TARGET = "iscsi_target"
ISCSI_BACKSTORE = "iscsi_backstore"
NFS_EXPORT = "nfs_export"

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Orphan:
    kind: str  # one of the constants above
    backend: str  # the backend whose code removes it
    lv: str
    reason: str  # one sentence for people
    detail: Mapping[str, Any] = field(default_factory=dict)


class HostAudit:
    """Every configured backend on one storage host (they share its runner)."""

    def __init__(self, backends: Iterable[LvmBackend], older_than_seconds: float, now: Clock = utc_now) -> None:
        self.backends = list(backends)
        self.runner = self.backends[0].pool.runner
        self.older_than = older_than_seconds
        self.now = now
        self.iscsi = [(b, b.exporter) for b in self.backends if isinstance(b.exporter, IscsiExporter)]
        self.nfs = [(b, b.exporter) for b in self.backends if isinstance(b.exporter, NfsExporter)]

    @property
    def host(self) -> str:
        return str(getattr(self.runner, "host", "local"))

    def find(self) -> list[Orphan]:
        exports = self._lio_orphans_by_lv()
        nfs = self._nfs_parts_by_lv()
        lvs = host_lvs(self.runner)  # after the exports: see the module's docstring
        existing = {info.name for info in lvs}
        found = [o for info in lvs if (o := self._creating(info)) is not None]
        found += [o for lv, o in sorted(exports.items()) if lv not in existing]
        for lv, (backend, root, parts) in sorted(nfs.items()):
            if lv not in existing:
                reason = f"{', '.join(parts)} under {root} for LV {lv}, which does not exist"
                found.append(Orphan(NFS_EXPORT, backend.name, lv, reason, {"export_root": root, "parts": list(parts)}))
        return found

    def remove(self, orphans: Iterable[Orphan]) -> list[tuple[Orphan, str | None]]:
        """Remove each orphan that still is one; (orphan, None) when removed, else (orphan, why not)."""
        current = {info.name: info for info in host_lvs(self.runner)}
        by_name = {b.name: b for b in self.backends}
        outcomes: list[tuple[Orphan, str | None]] = []
        for orphan in orphans:
            backend = by_name[orphan.backend]
            info = current.get(orphan.lv)
            try:
                if orphan.kind == CREATING_VOLUME:
                    if info is None or self._creating(info) is None:
                        raise StillOwned(f"{orphan.lv} is no longer an unfinished volume past the time limit")
                    backend.delete_volume(orphan.lv)  # DeleteVolume's path: teardown, then lvremove
                else:
                    if info is not None:
                        raise StillOwned(f"LV {info.vg}/{orphan.lv} exists now")
                    backend.exporter.teardown(_absent_lv(orphan.lv, backend))  # DeleteVolume's teardown
                outcomes.append((orphan, None))
            except (StillOwned, StorageError) as err:
                outcomes.append((orphan, str(err)))
        return outcomes

    # --- what is there ---

    def _creating(self, info: LvInfo) -> Orphan | None:
        """A volume of one of our backends, unfinished, older than the limit."""
        meta = info.meta
        backend = next((b for b in self.backends if meta.get(KEY_BACKEND) == b.name), None)
        if (
            backend is None
            or not info.managed
            or meta.get(meta_keys.KEY_KIND) != KIND_VOLUME
            or meta.get(meta_keys.KEY_STATE) != meta_keys.STATE_CREATING
            or (info.vg, info.pool) != (backend.pool.vg, backend.pool.pool)
            or info.created is None
        ):
            return None
        created = info.created if info.created.tzinfo else info.created.replace(tzinfo=UTC)
        age = (self.now() - created).total_seconds()
        if age < self.older_than:
            return None
        name = meta.get(meta_keys.KEY_NAME, "")
        reason = f"tagged {meta_keys.STATE_CREATING} for {_duration(age)} (CSI name {name!r})"
        detail = {"vg": info.vg, "csi_name": name, "age_seconds": int(age)}
        return Orphan(CREATING_VOLUME, backend.name, info.name, reason, detail)

    def _lio_orphans_by_lv(self) -> dict[str, Orphan]:
        """Every Berth target and backstore on the host by LV name, as the orphan each would be without its LV."""
        if not self.iscsi:
            return {}
        # LIO keeps IQNs in lower case.
        prefixes = {exporter.targets.iqn_prefix.lower(): backend for backend, exporter in self.iscsi}
        exports, backstores = self.iscsi[0][1].targets.inventory(prefixes)
        found: dict[str, Orphan] = {}
        for export in exports:
            backend = prefixes[export.target_iqn.rpartition(":")[0]]
            if is_berth_lv(export.volume):
                nodes = [i.initiator for i in export.initiators]
                reason = f"target {export.target_iqn} (ACLs: {', '.join(nodes) or 'none'}) has no LV {export.volume}"
                detail: dict[str, Any] = {"target": export.target_iqn, "device": export.device, "initiators": nodes}
                found[export.volume] = Orphan(ISCSI_TARGET, backend.name, export.volume, reason, detail)
        by_device = {f"/dev/{backend.pool.vg}/": backend for backend, _ in self.iscsi}
        for backstore in backstores:
            device_dir, _, name = backstore.device.rpartition("/")
            owner = by_device.get(device_dir + "/")
            if owner is None or name != backstore.name or not is_berth_lv(name) or name in found:
                continue  # not one Berth made, or its target's removal removes it too
            reason = f"block backstore {name} on {backstore.device} ({backstore.luns} LUNs) has no LV"
            detail = {"device": backstore.device, "luns": backstore.luns}
            found[name] = Orphan(ISCSI_BACKSTORE, owner.name, name, reason, detail)
        return found

    def _nfs_parts_by_lv(self) -> dict[str, tuple[LvmBackend, str, tuple[str, ...]]]:
        """What each export root holds per Berth LV name, and the backend that serves that root."""
        roots = {exporter.export_root: (backend, exporter) for backend, exporter in reversed(self.nfs)}
        found: dict[str, tuple[LvmBackend, str, tuple[str, ...]]] = {}
        for root, (backend, exporter) in sorted(roots.items()):
            for lv, parts in exporter.inventory().items():
                if is_berth_lv(lv):
                    found[lv] = (backend, root, parts)
        return found


class StillOwned(Exception):
    """Between the report and the removal, the thing got its LV back, or its volume was finished or removed."""


def _absent_lv(name: str, backend: LvmBackend) -> LvInfo:
    """An LV that is gone, as the exporters' teardown takes it (they use its name and volume group only)."""
    return LvInfo(
        name=name, vg=backend.pool.vg, uuid="", size_bytes=0, attr="", tags=(), meta={}, origin="",
        pool=backend.pool.pool, created=None, data_percent=None, metadata_percent=None,
    )  # fmt: skip


def host_audits(backends: Mapping[str, LvmBackend], older_than_seconds: float, now: Clock = utc_now) -> list[HostAudit]:
    """One audit per storage host: backends on one host share one runner (csi_driver.assembly)."""
    groups: dict[int, list[LvmBackend]] = {}
    for name in sorted(backends):
        groups.setdefault(id(backends[name].pool.runner), []).append(backends[name])
    return [HostAudit(group, older_than_seconds, now) for group in groups.values()]


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"
