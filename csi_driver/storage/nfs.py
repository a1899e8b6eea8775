"""NFS file volumes: one thin LV + one filesystem per volume, exported by the storage host's kernel NFS server.

Each volume's filesystem (xfs by default, ext4 possible) is mounted at `<export_root>/<lv>` on the storage host
and exported to exactly the nodes it is published to (their IP addresses). Capacity is the LV size. Every
multi-step change runs as ONE short python3 process on the host (nfs_host.py's source via `python3 -c`, the
request as JSON on stdin), so one SSH round trip does one whole operation under host-side locks.
See docs/nfs.md.
"""

from __future__ import annotations

import logging
import secrets as secrets_module
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

from . import nfs_host
from . import tags as meta_keys
from .backend import EXPORT_OPTIONS_PARAMETER, NodeRef, filesystem_minimum_bytes
from .errors import (
    Busy,
    CommandFailed,
    CommandTimeout,
    HostNotReady,
    InUse,
    InvalidRequest,
    NotFound,
    OutOfRange,
    StorageError,
)
from .ids import check_lv_name
from .lvm import LvInfo
from .runner import CommandRunner, call_host_program, host_program_source

log = logging.getLogger("berth.storage.nfs")

DEFAULT_EXPORT_OPTIONS = nfs_host.DEFAULT_OPTIONS
NFS_TIMEOUT = 90.0
# mkfs / e2fsck of a big clone can take minutes; the host bounds each command itself too.
PREPARE_TIMEOUT = 2400.0
THAW_AFTER_SECONDS = 30

SnapshotFreeze = Literal["lvm", "fsfreeze"]

# Mutable parameters: each replaces its group of export options, live, for the nodes the volume is published to.
SYNC_PARAMETER = "nfsSync"  # "true": sync, "false": async (the server answers writes before they are stable)
SQUASH_PARAMETER = "nfsSquash"
SYNC_OPTIONS = {"true": "sync", "false": "async"}
SQUASH_OPTIONS = ("root_squash", "no_root_squash", "all_squash")

_KIND_TO_ERROR: dict[str, type[StorageError]] = {
    "invalid": InvalidRequest,
    "not_found": NotFound,
    "conflict": InUse,
    "in_use": InUse,
    "busy": Busy,
    "out_of_range": OutOfRange,
    "host_not_ready": HostNotReady,
}


def host_program() -> str:
    return host_program_source("nfs_host.py")


class NfsExporter:
    """The `Exporter` of NFS backends (see backend.py)."""

    protocol = "nfs"
    fresh_needs_prepare = True  # the filesystem is made and exported
    mutable_parameters = {SYNC_PARAMETER: tuple(SYNC_OPTIONS), SQUASH_PARAMETER: SQUASH_OPTIONS}

    def __init__(
        self,
        runner: CommandRunner,
        server: str,
        export_root: str = "/srv/berth",
        filesystem: Literal["xfs", "ext4"] = "xfs",
        export_options: str = DEFAULT_EXPORT_OPTIONS,
        *,
        snapshot_freeze: SnapshotFreeze = "lvm",
        thaw_after_seconds: int = THAW_AFTER_SECONDS,
        python: str = "python3",
        timeout: float = NFS_TIMEOUT,
        prepare_timeout: float = PREPARE_TIMEOUT,
    ):
        if not server or any(c.isspace() for c in server) or "," in server:
            raise InvalidRequest(f"invalid NFS server address {server!r}")
        if filesystem not in nfs_host.FILESYSTEMS:
            raise InvalidRequest(f"filesystem must be xfs or ext4, not {filesystem!r}")
        if snapshot_freeze not in ("lvm", "fsfreeze"):
            raise InvalidRequest(f"snapshot_freeze must be 'lvm' or 'fsfreeze', not {snapshot_freeze!r}")
        self.runner = runner
        self.server = server
        self.export_root = _check(nfs_host.check_export_root, export_root)
        self.filesystem = filesystem
        # Validated now, so a bad config stops the start-up instead of the first ControllerPublish.
        self.export_options = check_export_options(export_options)
        self.snapshot_freeze = snapshot_freeze
        self.thaw_after_seconds = _check(lambda v: nfs_host._check_int(v, "thaw_after", 5, 600), thaw_after_seconds)
        self.python = python
        self.timeout = timeout
        self.prepare_timeout = prepare_timeout

    @classmethod
    def from_config(cls, runner: CommandRunner, config: Any, **kwargs: Any) -> NfsExporter:
        """From csi_driver.config.NfsConfig (server, export_root, filesystem, export_options)."""
        return cls(
            runner,
            server=config.server,
            export_root=config.export_root,
            filesystem=config.filesystem,
            export_options=config.export_options,
            **kwargs,
        )

    # --- Exporter ---

    def export_path(self, lv: str) -> str:
        return f"{self.export_root}/{check_lv_name(lv)}"

    def volume_context(self, lv: str) -> dict[str, str]:
        return {"nfsServer": self.server, "nfsExport": self.export_path(lv)}

    def minimum_bytes(self, parameters: Mapping[str, str]) -> int:
        return filesystem_minimum_bytes(self.filesystem)

    def check_parameters(self, parameters: Mapping[str, str]) -> None:
        options = parameters.get(EXPORT_OPTIONS_PARAMETER)
        if options is not None:
            try:
                nfs_host.check_options(options)
            except nfs_host.RequestError as err:
                raise InvalidRequest(f"StorageClass parameter {EXPORT_OPTIONS_PARAMETER}: {err}") from err

    def prepare(self, lv: LvInfo, fresh: bool, max_bytes: int) -> None:
        """fresh: mkfs if blank, mount, root dir 0777. Clone: new filesystem UUID, mount, filesystem grown to the LV
        (a clone larger than its source). Both: fstab line."""
        fields = {"vg": lv.vg, "filesystem": self.filesystem, "fresh": bool(fresh), "max_bytes": max_bytes}
        result = self._call("prepare", lv, fields, self.prepare_timeout)
        log.info("nfs volume %s prepared (%s): %s", lv.name, result.get("filesystem"), result.get("done"))

    def publish(
        self,
        lv: LvInfo,
        node: NodeRef,
        readonly: bool,
        secrets: Mapping[str, str],
        options: str | None = None,
    ) -> dict[str, str]:
        """Export to every address of `node` (rw or ro). `options` overrides the export options, which are the
        volume's (export_options_of); rw/ro in them are ignored, the publication decides."""
        if not node.addresses:
            raise InvalidRequest(f"node {node.node_id} has no IP address to export to")
        fields = {
            "vg": lv.vg,
            "node_id": node.node_id,
            "addresses": list(node.addresses),
            "readonly": bool(readonly),
            "options": check_export_options(options) if options is not None else self.export_options_of(lv),
        }
        self._call("publish", lv, fields)
        return {**self.volume_context(lv.name), "readonly": "true" if readonly else "false"}

    def modify(self, lv: LvInfo) -> None:
        """Re-export to the nodes it is published to with the new options: their mounts stay, and the kernel's
        export table (and the exports file, for a restart) carries the new options at once."""
        self._call("reconfigure", lv, {"options": self.export_options_of(lv)})

    def export_options_of(self, lv: LvInfo) -> str:
        """The volume's StorageClass parameter nfsExportOptions (else the configured options), with its mutable
        parameters replacing their groups of options."""
        chosen = meta_keys.meta_to_params(lv.meta).get(EXPORT_OPTIONS_PARAMETER)
        options = check_export_options(chosen) if chosen is not None else self.export_options
        return with_mutable_options(options, meta_keys.meta_to_params(lv.meta, meta_keys.MUTABLE_PREFIX))

    def unpublish(self, lv: LvInfo, node: NodeRef) -> None:
        if not node.addresses:
            return  # nothing could have been exported to it
        self._call("unpublish", lv, {"node_id": node.node_id, "addresses": list(node.addresses)})

    def teardown(self, lv: LvInfo) -> None:
        result = self._call("teardown", lv, {"vg": lv.vg})
        for warning in result.get("warnings", []):
            log.warning("nfs teardown of %s: %s", lv.name, warning)

    def grown(self, lv: LvInfo, max_bytes: int) -> bool:
        """Grow the filesystem on the host to its LV (nothing when it already fills it); the host refuses an LV
        above max_bytes, so no request can make it allocate memory in proportion to a huge size."""
        self._call("grow", lv, {"vg": lv.vg, "max_bytes": max_bytes}, self.prepare_timeout)
        return False  # NFS clients see the new size by themselves: nothing to do on nodes

    @contextmanager
    def consistent(self, lv: LvInfo) -> Iterator[None]:
        """Hold the filesystem consistent while the snapshot is taken.

        "lvm" (default): flush dirty data (syncfs), then rely on lvcreate itself, which freezes the filesystem
        while it suspends the thin origin (lockfs) for the snapshot. An extra fsfreeze around it makes that
        freeze fail with EBUSY on kernels before 6.6 (Debian 12: 6.1), see docs/nfs.md.
        "fsfreeze": explicit freeze, with a host-side timer that thaws after thaw_after_seconds regardless.
        """
        if self.snapshot_freeze == "lvm":
            self.runner.run(["sync", "-f", self.export_path(lv.name)], timeout=self.timeout)
            yield
            return
        token = secrets_module.token_hex(8)
        self._call("freeze", lv, {"vg": lv.vg, "token": token, "thaw_after": self.thaw_after_seconds})
        try:
            yield
        except BaseException:
            # The snapshot failed: thaw, but report the snapshot's error, not a thaw problem (the timer thaws).
            try:
                self._thaw(lv, token)
            except StorageError as e:
                log.error("thaw of %s failed (its safety timer thaws it): %s", lv.name, e)
            raise
        self._thaw(lv, token)

    def fence(self, lvs: Sequence[LvInfo], token: str, seconds: int) -> None:
        """No NFS request from these volumes' clients reaches the host until unfence (or `seconds`)."""
        self._request("fence", {"lvs": [lv.name for lv in lvs], "token": token, "thaw_after": seconds})

    def unfence(self, token: str) -> None:
        self._request("unfence", {"token": token})

    def _thaw(self, lv: LvInfo, token: str) -> None:
        result = self._call("thaw", lv, {"token": token})
        if not result.get("thawed", True):
            log.warning(
                "%s was no longer frozen at thaw: the safety timer fired first, so the snapshot may only be "
                "crash-consistent",
                lv.name,
            )

    # --- transport ---

    def inventory(self) -> dict[str, tuple[str, ...]]:
        """What the export root holds per volume name (directory, mount, fstab, exports_file, clients), read-only."""
        result = self._request("inventory", {})
        return {entry["lv"]: tuple(entry["parts"]) for entry in result.get("volumes", [])}

    def _call(self, op: str, lv: LvInfo, fields: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        return self._request(op, {"lv": lv.name, **fields}, timeout)

    def _request(self, op: str, fields: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        request = {"v": nfs_host.PROTOCOL, "op": op, "export_root": self.export_root, **fields}
        # Fail fast on the controller for bad input; the host validates again (it trusts nobody).
        _check(nfs_host.validate_request, request)
        response = call_host_program(
            self.runner, self.python, host_program(), "nfs_host", request, timeout or self.timeout
        )
        if not response.get("ok"):
            raise _error(op, response.get("error") or {})
        return dict(response.get("result") or {})


def with_mutable_options(options: str, mutable: Mapping[str, str]) -> str:
    """Normalised export options with nfsSync / nfsSquash (when set) in place of any sync/async and squash options."""
    tokens = [t for t in options.split(",") if t]
    if SYNC_PARAMETER in mutable:
        tokens = [t for t in tokens if t not in SYNC_OPTIONS.values()] + [SYNC_OPTIONS[mutable[SYNC_PARAMETER]]]
    if SQUASH_PARAMETER in mutable:
        tokens = [t for t in tokens if t not in SQUASH_OPTIONS] + [mutable[SQUASH_PARAMETER]]
    return ",".join(tokens)


def check_export_options(options: str) -> str:
    """Validate export options (e.g. a StorageClass parameter) the way the storage host will; normalised."""
    return _check(nfs_host.check_options, options)


Checked = TypeVar("Checked")


def _check(fn: Callable[[Any], Checked], value: Any) -> Checked:
    try:
        return fn(value)
    except nfs_host.RequestError as e:
        raise InvalidRequest(str(e)) from e


def _error(op: str, err: Mapping[str, Any]) -> StorageError:
    kind = err.get("kind", "")
    message = f"NFS {op}: {err.get('message', 'unknown error')}"
    if kind == "timeout":
        return CommandTimeout(list(err.get("argv") or [op]), float(err.get("timeout") or 0))
    if kind == "failed":
        return CommandFailed(list(err.get("argv") or [op]), int(err.get("rc", -1)), str(err.get("stderr", "")))
    return _KIND_TO_ERROR.get(kind, StorageError)(message)
