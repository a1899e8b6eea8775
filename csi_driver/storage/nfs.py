"""NFS file volumes: one thin LV + one filesystem per volume, exported by the storage host's kernel NFS server.

Each volume's filesystem (xfs by default, ext4 possible) is mounted at `<export_root>/<lv>` on the storage host
and exported to exactly the nodes it is published to (their IP addresses). Capacity is the LV size. Every
multi-step change runs as ONE short python3 process on the host (nfs_host.py's source via `python3 -c`, the
request as JSON on stdin), so one SSH round trip does one whole operation under host-side locks.
See docs/nfs.md.
"""

from __future__ import annotations

import json
import logging
import secrets as secrets_module
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from importlib import resources
from typing import Any, Literal

from . import nfs_host
from . import tags as meta_keys
from .backend import EXPORT_OPTIONS_PARAMETER, NodeRef, filesystem_minimum_bytes
from .errors import (
    Busy,
    CommandFailed,
    CommandTimeout,
    InUse,
    InvalidRequest,
    NotFound,
    OutOfRange,
    StorageError,
)
from .ids import check_lv_name
from .lvm import LvInfo
from .runner import CommandRunner, last_json_object

log = logging.getLogger("berth.storage.nfs")

DEFAULT_EXPORT_OPTIONS = nfs_host.DEFAULT_OPTIONS
NFS_TIMEOUT = 90.0
# mkfs / e2fsck of a big clone can take minutes; the host bounds each command itself too.
PREPARE_TIMEOUT = 2400.0
THAW_AFTER_SECONDS = 30

SnapshotFreeze = Literal["lvm", "fsfreeze"]

_KIND_TO_ERROR: dict[str, type[StorageError]] = {
    "invalid": InvalidRequest,
    "not_found": NotFound,
    "conflict": InUse,
    "in_use": InUse,
    "busy": Busy,
    "out_of_range": OutOfRange,
}


@cache
def host_program() -> str:
    """Source of nfs_host.py, as shipped in the package (sent verbatim to the host)."""
    return resources.files("csi_driver.storage").joinpath("nfs_host.py").read_text(encoding="utf-8")


class NfsExporter:
    """The `Exporter` of NFS backends (see backend.py)."""

    protocol = "nfs"

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
        volume's StorageClass parameter nfsExportOptions, else the configured ones; rw/ro in them are ignored, the
        publication decides."""
        if not node.addresses:
            raise InvalidRequest(f"node {node.node_id} has no IP address to export to")
        if options is None:
            options = meta_keys.meta_to_params(lv.meta).get(EXPORT_OPTIONS_PARAMETER)
        fields = {
            "vg": lv.vg,
            "node_id": node.node_id,
            "addresses": list(node.addresses),
            "readonly": bool(readonly),
            "options": check_export_options(options) if options is not None else self.export_options,
        }
        self._call("publish", lv, fields)
        return {**self.volume_context(lv.name), "readonly": "true" if readonly else "false"}

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
        argv = [self.python, "-c", host_program()]
        result = self.runner.run(argv, input=json.dumps(request).encode(), timeout=timeout or self.timeout, check=False)
        response = last_json_object(result.text)
        if response is None:
            # No JSON: the program never ran properly (python3 missing, syntax error, killed).
            raise CommandFailed([self.python, "-c", "<nfs_host>"], result.rc, result.stderr, result.stdout)
        if not response.get("ok"):
            raise _error(op, response.get("error") or {})
        return dict(response.get("result") or {})


def check_export_options(options: str) -> str:
    """Validate export options (e.g. a StorageClass parameter) the way the storage host will; normalised."""
    return _check(nfs_host.check_options, options)


def _check(fn: Any, value: Any) -> Any:
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
