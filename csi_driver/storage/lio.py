"""LIO iSCSI exports of thin LVs, driven from the controller.

Each call is ONE request to the lio_host program on the storage host (its source via `python3 -c`, kept
running between requests, see resident.py; the request as JSON on stdin) instead of several targetcli
processes: targetcli reloads the whole configfs tree per call (1.2-2.2 s each), one rtslib process does a
batch in 0.7-1.1 s (TCG lab), flat from 10 to 100 exported targets.

Layout per volume: target `<iqn_prefix>:<lv>`, TPG 1, the given portals, block backstore `<lv>` on
/dev/<vg>/<lv> with a serial derived from the LV name, LUN 0. No demo mode: a node sees the LUN only
once add_initiator() created its ACL and mapped LUN 0 into it (read-only = write-protected mapping).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import lio_host
from .errors import Busy, HostNotReady, InUse, InvalidRequest, NotFound, StorageError
from .ids import check_initiator, check_lv_name, naa_wwn, target_iqn, volume_serial
from .runner import HOST_START_MARGIN, CommandRunner, call_host_program, host_program_source

LIO_TIMEOUT = 90.0

_KIND_TO_ERROR: dict[str, type[StorageError]] = {
    "invalid": InvalidRequest,
    "not_found": NotFound,
    # The host holds something else where this volume's object should be (a backstore on another device, a LUN
    # mapping another backstore, a backstore another target still uses): FAILED_PRECONDITION, as on NFS.
    # ALREADY_EXISTS is the spec's answer for a name taken with other parameters, which the backend decides.
    "conflict": InUse,
    "busy": Busy,
    "host_not_ready": HostNotReady,
}


def host_program() -> str:
    return host_program_source("lio_host.py")


@dataclass(frozen=True)
class Chap:
    user: str
    password: str = field(repr=False)
    mutual_user: str | None = None
    mutual_password: str | None = field(default=None, repr=False)

    def to_request(self) -> dict[str, str]:
        out = {"user": self.user, "password": self.password}
        if self.mutual_user is not None or self.mutual_password is not None:
            out["mutual_user"] = self.mutual_user or ""
            out["mutual_password"] = self.mutual_password or ""
        return out


@dataclass(frozen=True)
class InitiatorInfo:
    initiator: str
    mapped: bool
    readonly: bool | None
    chap_user: str | None
    mutual_chap: bool
    logged_in: bool

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InitiatorInfo:
        return cls(
            initiator=d["initiator"],
            mapped=bool(d.get("mapped")),
            readonly=d.get("readonly"),
            chap_user=d.get("chap_user"),
            mutual_chap=bool(d.get("mutual_chap")),
            logged_in=bool(d.get("logged_in")),
        )


@dataclass(frozen=True)
class ExportInfo:
    volume: str
    target_iqn: str
    lun: int
    serial: str | None
    device: str | None
    portals: tuple[str, ...]
    initiators: tuple[InitiatorInfo, ...] = ()
    enabled: bool = True

    @property
    def wwn(self) -> str | None:
        """NAA WWN the node sees (/dev/disk/by-id/wwn-0x<wwn>)."""
        return naa_wwn(self.serial) if self.serial else None

    def publish_context(self, readonly: bool) -> dict[str, str]:
        """publish_context keys of docs/design.md."""
        return {
            "targetPortals": ",".join(self.portals),
            "targetIqn": self.target_iqn,
            "targetLun": str(self.lun),
            "readonly": "true" if readonly else "false",
        }


@dataclass(frozen=True)
class Backstore:
    """A block backstore: its name (Berth names it after the LV), device, and how many LUNs use it."""

    name: str
    device: str
    luns: int


def _exports(res: dict[str, Any]) -> list[ExportInfo]:
    return [
        ExportInfo(
            volume=e["volume"],
            target_iqn=e["target"],
            lun=lio_host.LUN_INDEX,
            serial=e.get("serial"),
            device=e.get("device"),
            portals=tuple(e.get("portals", [])),
            initiators=tuple(InitiatorInfo.from_json(i) for i in e.get("initiators", [])),
            enabled=bool(e.get("enabled")),
        )
        for e in res.get("exports", [])
    ]


class LioTargets:
    """One iSCSI target per volume on one storage host."""

    def __init__(
        self,
        runner: CommandRunner,
        iqn_prefix: str,
        python: str = "python3",
        persist: bool = True,
        timeout: float = LIO_TIMEOUT,
    ):
        self.runner = runner
        self.iqn_prefix = iqn_prefix.rstrip(":")
        self.python = python
        # Save the config after every change, so a storage-host reboot restores exactly what the
        # controller believes is exported (target.service reads the saved file at boot).
        self.persist = persist
        if timeout <= HOST_START_MARGIN:
            raise InvalidRequest(f"LIO timeout must be above {HOST_START_MARGIN:g} s")
        self.timeout = timeout
        target_iqn(self.iqn_prefix, "vol-check")  # validates the prefix early

    def target_for(self, volume: str) -> str:
        return target_iqn(self.iqn_prefix, volume)

    # --- transport ---

    def run_ops(self, ops: Sequence[dict[str, Any]], save: bool = False) -> list[dict[str, Any]]:
        """Run a batch of host operations in one process; results in order, or a domain error."""
        # The host may act during timeout - HOST_START_MARGIN seconds after it starts: never after we gave up.
        request = {
            "v": lio_host.PROTOCOL,
            "ops": list(ops),
            "save": save,
            "budget_seconds": self.timeout - HOST_START_MARGIN,
        }
        # Fail fast on the controller for bad input; the host validates again (it trusts nobody).
        try:
            lio_host.validate_request(request)
        except lio_host.RequestError as e:
            raise InvalidRequest(str(e)) from e
        response = call_host_program(self.runner, self.python, host_program(), "lio_host", request, self.timeout)
        if not response.get("ok"):
            err = response.get("error") or {}
            cls = _KIND_TO_ERROR.get(err.get("kind", ""), StorageError)
            raise cls(f"LIO: {err.get('message', 'unknown error')}")
        return list(response.get("results", []))

    # --- operations ---

    def export(self, volume: str, device_path: str, portals: Iterable[str], unmap: bool = True) -> ExportInfo:
        """Create (or confirm) target, TPG, portals, backstore and LUN 0 for volume. Idempotent."""
        (res,) = self.run_ops([self._export_op(volume, device_path, portals, unmap)], save=self.persist)
        return self._export_info(volume, res)

    def ensure_published(
        self,
        volume: str,
        device_path: str,
        portals: Iterable[str],
        initiator: str,
        readonly: bool = False,
        chap: Chap | None = None,
        unmap: bool = True,
    ) -> ExportInfo:
        """export() + add_initiator() + save in one host process: a ControllerPublish (0.7-1.2 s in the TCG lab)."""
        ops = [self._export_op(volume, device_path, portals, unmap), self._add_op(volume, initiator, readonly, chap)]
        res, _ = self.run_ops(ops, save=self.persist)
        return self._export_info(volume, res)

    def configure(self, volume: str, unmap: bool) -> bool:
        """Switch UNMAP emulation of the volume's backstore, live, and save; nothing when it has no backstore yet
        (export() applies it). True if changed. StorageError when the kernel refuses."""
        op = {"op": "configure", "volume": check_lv_name(volume), "target": self.target_for(volume), "unmap": unmap}
        (res,) = self.run_ops([op], save=self.persist)
        return bool(res.get("changed"))

    def unexport(self, volume: str) -> bool:
        """Remove target (sessions, ACLs, LUN, portals) and backstore. Idempotent; True if removed."""
        op = {"op": "unexport", "volume": check_lv_name(volume), "target": self.target_for(volume)}
        (res,) = self.run_ops([op], save=self.persist)
        return bool(res.get("changed"))

    def add_initiator(self, volume: str, initiator_iqn: str, readonly: bool = False, chap: Chap | None = None) -> bool:
        """ACL for initiator with LUN 0 mapped (write-protected if readonly). True if changed."""
        (res,) = self.run_ops([self._add_op(volume, initiator_iqn, readonly, chap)], save=self.persist)
        return bool(res.get("changed"))

    def remove_initiator(self, volume: str, initiator_iqn: str) -> bool:
        """Drop the initiator's ACL (its session on this target ends). Idempotent."""
        op = {
            "op": "remove_initiator",
            "target": self.target_for(volume),
            "initiator": check_initiator(initiator_iqn),
        }
        (res,) = self.run_ops([op], save=self.persist)
        return bool(res.get("changed"))

    def list_initiators(self, volume: str) -> list[InitiatorInfo]:
        (res,) = self.run_ops([{"op": "list_initiators", "target": self.target_for(volume)}])
        return [InitiatorInfo.from_json(d) for d in res.get("initiators", [])]

    def list_exports(self) -> list[ExportInfo]:
        """Every Berth target under iqn_prefix, in one host call."""
        (res,) = self.run_ops([{"op": "list_exports", "iqn_prefix": self.iqn_prefix}])
        return _exports(res)

    def inventory(self, iqn_prefixes: Iterable[str]) -> tuple[list[ExportInfo], list[Backstore]]:
        """The targets under each prefix and every block backstore, in one host call (read-only)."""
        ops: list[dict[str, Any]] = [{"op": "list_exports", "iqn_prefix": p} for p in sorted(set(iqn_prefixes))]
        *listed, backstores = self.run_ops([*ops, {"op": "list_backstores"}])
        exports = [export for res in listed for export in _exports(res)]
        found = backstores.get("backstores", [])
        return exports, [Backstore(b["name"], b.get("device") or "", int(b.get("luns", 0))) for b in found]

    def fence(self, volumes: Iterable[str], token: str, seconds: int) -> list[str]:
        """Disable the targets of these volumes (those that exist) for at most `seconds`; returns their names."""
        op = {"op": "fence", "targets": [self.target_for(v) for v in volumes], "token": token, "seconds": seconds}
        return list(self.run_ops([op])[0]["fenced"])

    def unfence(self, token: str) -> None:
        self.run_ops([{"op": "unfence", "token": token}])

    def save(self) -> None:
        """Persist the live LIO config (Debian: /etc/rtslib-fb-target/saveconfig.json)."""
        self.run_ops([{"op": "save"}])

    # --- op builders ---

    def _export_op(self, volume: str, device_path: str, portals: Iterable[str], unmap: bool) -> dict[str, Any]:
        portal_list = list(portals)
        if isinstance(portals, str) or not portal_list:
            raise InvalidRequest("portals must be a non-empty list of 'ip[:port]'")
        return {
            "op": "export",
            "volume": check_lv_name(volume),
            "target": self.target_for(volume),
            "device": device_path,
            "serial": volume_serial(volume),
            "portals": portal_list,
            "unmap": unmap,
        }

    def _add_op(self, volume: str, initiator: str, readonly: bool, chap: Chap | None) -> dict[str, Any]:
        return {
            "op": "add_initiator",
            "target": self.target_for(volume),
            "initiator": check_initiator(initiator),
            "readonly": bool(readonly),
            "chap": chap.to_request() if chap else None,
        }

    def _export_info(self, volume: str, res: dict[str, Any]) -> ExportInfo:
        return ExportInfo(
            volume=volume,
            target_iqn=res["target"],
            lun=int(res.get("lun", lio_host.LUN_INDEX)),
            serial=res.get("serial"),
            device=res.get("device"),
            portals=tuple(res.get("portals", [])),
        )
