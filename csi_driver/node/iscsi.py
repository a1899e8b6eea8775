"""iSCSI volumes on the node: os-brick's ISCSIConnector, run in-process as root, plus filesystem staging.

os-brick does login, SCSI scan, multipath assembly, and on disconnect flush + device removal + logout of
sessions left without devices + node record deletion. It works from connection properties alone (sessions
and node records are looked up by portal/IQN), which is why NodeUnstage still logs out after a restart
with the device gone. What we add on top:
- `node.startup=manual` after login (os-brick sets `automatic`): a rebooted node must not log back in to
  LUNs the CO no longer attaches to it (hpe-storage/csi-driver#69).
- mutual CHAP: os-brick only sets the initiator's credentials, so we create the node record first and
  write `node.session.auth.username_in/password_in` into it; os-brick then finds the record and logs in.
- multipath with more than one portal is enforced: two bare /dev/sdX paths of one LUN must never be used.
- the WWN check: the device that appeared must be the LUN volume_context names.
- with several portals only the multipath map is ever used: os-brick returns a single /dev/sdX when the map
  is slow to appear, so we wait for the map ourselves (by WWN) and fail the stage without it.
- every step of a stage registers its undo (rollback.py), and os-brick's per-portal lock files are removed
  once nothing can hold them.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from csi_driver.faults import fault_point

from .commands import Runner
from .errors import (
    AttachFailed,
    DetachFailed,
    DeviceNotFound,
    InvalidVolume,
    LoginRefused,
    NodeError,
    StillInUse,
    WwnMismatch,
)
from .filesystems import Filesystems, fs_type_or_default
from .mounts import Mounter, device_number
from .paths import make_directory
from .protocol import BLOCK, MOUNT, SaveRecord, StageRequest
from .rollback import Rollback
from .stage_record import StageRecord

log = logging.getLogger("berth.node.iscsi")

# NodeStage secrets use iscsiadm's names (docs/design.md).
SECRET_USER = "node.session.auth.username"
SECRET_PASSWORD = "node.session.auth.password"
SECRET_USER_IN = "node.session.auth.username_in"
SECRET_PASSWORD_IN = "node.session.auth.password_in"
DEFAULT_PORT = "3260"
DEVICE_SCAN_ATTEMPTS = 5
# csi VolumeCapability.AccessMode: MULTI_NODE_SINGLE_WRITER, MULTI_NODE_MULTI_WRITER.
MULTI_NODE_WRITER_MODES = (4, 5)
ISCSI_ERR_LOGIN_AUTH_FAILED = 24  # iscsiadm's exit status (open-iscsi include/iscsi_err.h)
# How long a stage or publish waits for multipathd to assemble the map after the paths are there.
MULTIPATH_MAP_WAIT = 15.0
MULTIPATH_POLL_INTERVAL = 0.25
# os-brick rescans only when every path reads (a `dd` of each); right after a stage under load, udev may not have
# made a path's by-path link yet. A rescan is harmless to repeat, so an expand tries again for this long.
EXPAND_RETRY_WINDOW = 30.0
EXPAND_RETRY_INTERVAL = 1.0
# A map is "in use" for a moment after its last user left (udev still probing it after multipathd's last reload);
# os-brick's own flush then retries after 20 and 40 s. Berth flushes first, retrying this often for this long.
MAP_FLUSH_WINDOW = 15.0
MAP_FLUSH_INTERVAL = 1.0
# os-brick takes one file lock per portal and target (`connect_to_iscsi_portal-<portal>-<iqn>`), and Berth
# exports one target per volume, so these files pile up; see sweep_portal_locks.
PORTAL_LOCK_PATTERN = "os-brick-connect_to_iscsi_portal-*"


class Connector(Protocol):
    """The part of os_brick's ISCSIConnector we use (a fake in unit tests)."""

    def connect_volume(self, connection_properties: dict[str, Any]) -> dict[str, Any] | None:
        """Log in and find the device. Raises no domain error: os-brick's own exceptions, of many types (the caller
        turns them into AttachFailed)."""
        ...

    def disconnect_volume(
        self,
        connection_properties: dict[str, Any],
        device_info: dict[str, Any],
        force: bool = False,
        ignore_errors: bool = False,
    ) -> None:
        """Flush, remove the devices, log out. Raises no domain error: os-brick's own exceptions, of many types (the
        caller turns them into DetachFailed)."""
        ...

    def extend_volume(self, connection_properties: dict[str, Any]) -> int | None:
        """Rescan the paths and resize the map. Raises no domain error: os-brick's own exceptions, of many types (the
        caller retries, then turns them into AttachFailed)."""
        ...


ConnectorFactory = Callable[[bool], Connector]
LockSweeper = Callable[[], None]


def normalize_wwn(value: str) -> str:
    """Compare WWNs in one spelling: LIO/controller `6001405…`, udev `wwn-0x6001405…`, sysfs
    `naa.6001405…`, scsi_id/os-brick `36001405…` (page 0x83 with the NAA designator type prefix 3)."""
    text = value.strip().lower()
    for prefix in ("wwn-0x", "0x", "naa."):
        text = text.removeprefix(prefix)
    if len(text) in (17, 33) and text.startswith("3"):
        text = text[1:]
    return text


_brick_lock = threading.Lock()
_brick_ready = False


def brick_connector_factory(lock_dir: str) -> ConnectorFactory:
    """os-brick set up for a process that already runs as root (see docs/node.md)."""

    def make(multipath: bool) -> Connector:
        _setup_os_brick(lock_dir)
        from os_brick.initiator.connectors.iscsi import ISCSIConnector

        # root_helper=None: privileged calls run in-process (client mode off), no sudo, no privsep daemon.
        connector: Connector = ISCSIConnector(
            root_helper=None, use_multipath=multipath, device_scan_attempts=DEVICE_SCAN_ATTEMPTS
        )
        return connector

    return make


def brick_lock_sweeper(lock_dir: str) -> LockSweeper:
    """Removes os-brick's per-portal lock files. os-brick takes a portal lock only inside connect_volume, which
    holds its host-wide `connect_volume` lock; holding that lock here means no process can hold or wait for a
    portal lock, so deleting the files cannot split one lock into two."""

    def sweep() -> None:
        _setup_os_brick(lock_dir)
        from os_brick.initiator.connectors import base

        base.synchronized("connect_volume", external=True, lock_path=lock_dir)(sweep_portal_locks)(lock_dir)

    return sweep


def sweep_portal_locks(lock_dir: str) -> int:
    """Delete the per-portal lock files in `lock_dir` (the caller holds os-brick's connect_volume lock)."""
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(lock_dir), PORTAL_LOCK_PATTERN)):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _setup_os_brick(lock_dir: str) -> None:
    global _brick_ready
    with _brick_lock:
        if _brick_ready:
            return
        # Imported here: ~870 modules, only a node needs them. Nothing below monkey-patches (no eventlet
        # hub), which matters because grpcio's threads must stay real threads.
        import os_brick
        import os_brick.privileged
        from oslo_concurrency import lockutils  # noqa: F401  (registers the [oslo_concurrency] options)
        from oslo_config import cfg

        os_brick.privileged.default.set_client_mode(False)
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        # External (file) locks serialise connect/disconnect across processes; they must live on the host.
        cfg.CONF.set_override("lock_path", lock_dir, group="oslo_concurrency")
        os_brick.setup(cfg.CONF)
        cfg.CONF.set_override("lock_path", lock_dir, group="os_brick")
        _brick_ready = True


@dataclass(frozen=True)
class Target:
    portal: str
    iqn: str
    lun: int


def targets_from_publish_context(publish_context: Mapping[str, str]) -> list[Target]:
    portals = [p.strip() for p in publish_context.get("targetPortals", "").split(",") if p.strip()]
    iqn = publish_context.get("targetIqn", "")
    if not portals or not iqn:
        raise InvalidVolume("publish_context needs targetPortals and targetIqn for an iSCSI volume")
    try:
        lun = int(publish_context.get("targetLun", "0"))
    except ValueError:
        raise InvalidVolume(f"publish_context targetLun {publish_context.get('targetLun')!r} is not a number") from None
    return [Target(p if _has_port(p) else f"{p}:{DEFAULT_PORT}", iqn, lun) for p in portals]


def _read(path: str) -> str:
    """A sysfs attribute, "" when it is gone."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _has_port(portal: str) -> bool:
    if portal.startswith("["):
        return "]:" in portal
    return portal.count(":") == 1


def connection_properties(targets: list[Target], secrets: Mapping[str, str]) -> dict[str, Any]:
    """os-brick connection properties: plural keys for multipath (several portals), singular otherwise."""
    props: dict[str, Any]
    if len(targets) > 1:
        props = {
            "target_portals": [t.portal for t in targets],
            "target_iqns": [t.iqn for t in targets],
            "target_luns": [t.lun for t in targets],
            # Refuse to attach without multipathd rather than use two /dev/sdX of one LUN.
            "enforce_multipath": True,
        }
    else:
        props = {}
    first = targets[0]
    props.update(target_portal=first.portal, target_iqn=first.iqn, target_lun=first.lun)
    if secrets.get(SECRET_USER):
        props.update(
            auth_method="CHAP", auth_username=secrets[SECRET_USER], auth_password=secrets.get(SECRET_PASSWORD, "")
        )
    return props


def all_targets(props: Mapping[str, Any]) -> list[tuple[str, str]]:
    if "target_portals" in props:
        return list(zip(props["target_portals"], props["target_iqns"], strict=True))
    return [(props["target_portal"], props["target_iqn"])]


class IscsiVolumes:
    name = "iscsi"

    def __init__(
        self,
        runner: Runner,
        mounter: Mounter,
        filesystems: Filesystems,
        connector_factory: ConnectorFactory,
        by_id_dir: str = "/dev/disk/by-id",
        sys_block_dir: str = "/sys/block",
        dev_dir: str = "/dev",
        sweep_locks: LockSweeper | None = None,
        multipath_wait: float = MULTIPATH_MAP_WAIT,
    ) -> None:
        self.runner = runner
        self.mounter = mounter
        self.fs = filesystems
        self.connector_factory = connector_factory
        self.by_id_dir = by_id_dir
        self.sys_block_dir = sys_block_dir
        self.dev_dir = dev_dir
        self.sweep_locks = sweep_locks or (lambda: None)
        self.multipath_wait = multipath_wait

    # --- staging ---

    def new_record(self, request: StageRequest) -> StageRecord:
        if request.access_type == MOUNT and request.access_mode in MULTI_NODE_WRITER_MODES:
            # ext4/xfs mounted on two nodes corrupt each other; shared files are what NFS volumes are for.
            raise InvalidVolume("a filesystem on iSCSI cannot be written from several nodes; use block or NFS")
        targets = targets_from_publish_context(request.publish_context)
        fs_type = fs_type_or_default(request.fs_type) if request.access_type == MOUNT else ""
        return StageRecord(
            volume_id=request.volume_id,
            protocol=self.name,
            staging_path=request.staging_path,
            access_type=request.access_type,
            fs_type=fs_type,
            mount_flags=list(request.mount_flags),
            readonly=request.readonly,
            access_mode=request.access_mode,
            connection_properties=connection_properties(targets, request.secrets),
            wwn=normalize_wwn(request.volume_context.get("wwn", "")),
            multipath=len(targets) > 1,
        )

    def stage(self, record: StageRecord, request: StageRequest, save: SaveRecord, undo: Rollback) -> None:
        # Saved before login: if we crash between login and the end, unstage can still log out.
        save(record)
        props = connection_properties(targets_from_publish_context(request.publish_context), request.secrets)
        # A device that a publish target still uses was attached by an earlier stage: failing this one must not
        # pull it from under the pod. Any other attachment (also a crashed stage's) is this stage's to undo.
        earlier = self.current_device(record)
        in_use = earlier is not None and bool(self._users_besides_staging(record, earlier))
        device = self.attach(props, record.multipath, record.wwn, request.secrets)
        if not in_use:
            undo.push(f"log out of {_describe(props)}", lambda: self._undo_attach(props, record, device.path))
        record.device_path = device.path
        record.wwn = device.wwn
        save(record)
        fault_point("node-stage.attached")
        if record.access_type == MOUNT:
            self._mount_staging(record, device.path, undo)
        elif record.readonly:
            # The kernel ignores a read-only bind for device nodes (it checks files and directories only), so a
            # volume staged read-only is made read-only at the block layer. multipathd's table reloads can clear
            # this on a map; the storage host's write protection is what holds for good.
            self.runner.run(["blockdev", "--setro", device.path], timeout=30)

    def _undo_attach(self, props: dict[str, Any], record: StageRecord, path: str) -> None:
        self._disconnect(self._connector(record.multipath, props, DetachFailed), props, path, force=True)
        self._sweep_locks(props)

    def _mount_staging(self, record: StageRecord, device: str, undo: Rollback) -> None:
        current = self.mounter.table.at(record.staging_path)
        if current is not None:
            if current.major_minor == device_number(device):
                return
            # A mount of an older device (session re-established, new /dev/sdX) must go before we mount
            # the current one on top of it (democratic-csi#559).
            log.warning(
                "staging path holds a stale mount, replacing it",
                extra={"path": record.staging_path, "stale": current.source, "device": device},
            )
            self.mounter.unmount(record.staging_path)
        if make_directory(record.staging_path):  # the CO should have; only if it did not is it ours to remove
            undo.push(f"remove {record.staging_path!r}", lambda: os.rmdir(record.staging_path))
        formatted = self.fs.ensure_filesystem(device, record.fs_type)
        if formatted:
            log.info("formatted", extra={"device": device, "fs_type": record.fs_type, "volume": record.volume_id})
        self.fs.mount(device, record.staging_path, record.fs_type, record.mount_flags, record.readonly)
        undo.push(f"unmount {record.staging_path!r}", lambda: self.mounter.unmount(record.staging_path))
        fault_point("node-stage.mounted")
        if not record.readonly:
            self.fs.grow_to_device(record.fs_type, device, record.staging_path)

    def is_staged(self, record: StageRecord) -> bool:
        device = self.usable_device(record, wait=0)
        if device is None:
            return False
        if record.access_type == BLOCK:
            return True
        entry = self.mounter.table.at(record.staging_path)
        return entry is not None and entry.major_minor == device_number(device)

    # --- attach / detach ---

    def attach(
        self, props: dict[str, Any], multipath: bool, expected_wwn: str, secrets: Mapping[str, str]
    ) -> AttachedDevice:
        # Built before anything changes on the node: a connector that cannot be built leaves nothing to undo.
        connector = self._connector(multipath, props, AttachFailed)
        if secrets.get(SECRET_USER_IN):
            self._prepare_mutual_chap(props, secrets)
        try:
            info = connector.connect_volume(dict(props)) or {}
        except Exception as err:  # os-brick raises many unrelated types; all mean "no device"
            self._explain_login_failure(props, secrets)
            raise AttachFailed(f"iSCSI attach to {_describe(props)} failed: {err}") from err
        path = info.get("path")
        if not path:
            self._explain_login_failure(props, secrets)
            raise AttachFailed(f"iSCSI attach to {_describe(props)} returned no device")
        self._set_manual_startup(props)
        found = normalize_wwn(info.get("scsi_wwn", ""))
        if found != expected_wwn:
            # os-brick's scsi_id answered with the LUN's T10 vendor designator ("1lio-org_iblock:...") under load in
            # the lab, where the kernel's VPD 0x83 reading (sysfs wwid) had the NAA WWN: a mismatch needs both.
            found = self._sysfs_wwn(path) or found
        if expected_wwn and found != expected_wwn:
            log.error("WWN mismatch, detaching", extra={"expected": expected_wwn, "found": found, "path": path})
            self._drop_wrong_attach(
                connector,
                props,
                path,
                WwnMismatch(
                    f"the device {path} behind {_describe(props)} has WWN {found or 'unknown'}, "
                    f"not {expected_wwn}; refusing to use it"
                ),
            )
        wwn = found or expected_wwn
        if multipath and not _is_device_mapper(path):
            # os-brick gives up waiting for the map after ~10 s and returns one path; never use that.
            mapped = self._wait_for_map(wwn, self.multipath_wait)
            if mapped is None:
                self._drop_wrong_attach(
                    connector,
                    props,
                    path,
                    AttachFailed(
                        f"the paths of {_describe(props)} came up ({path}) but multipathd assembled no map for WWN "
                        f"{wwn} within {self.multipath_wait:g} s; check that multipathd runs and that "
                        "find_multipaths is not 'strict' (or the WWID is known)"
                    ),
                )
            path = mapped
        return AttachedDevice(path, wwn, multipath)

    def _drop_wrong_attach(self, connector: Connector, props: dict[str, Any], path: str, reason: NodeError) -> NoReturn:
        """Detach a device that must not be used and raise `reason`; a failed detach is DetachFailed, still naming
        `reason` (why the device was dropped is what the operator needs first)."""
        try:
            self._disconnect(connector, props, path, force=True)
        except DetachFailed as err:
            raise DetachFailed(f"{reason}; detaching it failed too: {err}") from err
        raise reason

    def _connector(self, multipath: bool, props: Mapping[str, Any], failure: type[NodeError]) -> Connector:
        """The os-brick connector; failing to build it fails the step like os-brick's own errors do."""
        try:
            return self.connector_factory(multipath)
        except Exception as err:
            raise failure(f"cannot set up os-brick's iSCSI connector for {_describe(props)}: {err}") from err

    def _sweep_locks(self, props: Mapping[str, Any]) -> None:
        try:
            self.sweep_locks()
        except Exception as err:  # leftover lock files cost disk entries, never correctness: the detach stands
            extra = {"target": _describe(props), "error": str(err)}
            log.warning("cannot remove os-brick's portal lock files", extra=extra)

    def _explain_login_failure(self, props: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        """os-brick hides why no device came ("Volume device not found at .") and deletes the node records of a
        failed login; so log in once more with the same settings and raise on iscsiadm's verdict."""
        for portal, iqn in all_targets(props):
            if self._has_session(portal, iqn):
                return  # logged in, so the login was not the problem
            node = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal]
            try:
                self.runner.run([*node, "--interface", "default", "--op", "new"], timeout=30)
                chap = {
                    "node.session.auth.authmethod": props.get("auth_method", "None"),
                    SECRET_USER: props.get("auth_username", ""),
                    SECRET_PASSWORD: props.get("auth_password", ""),
                    SECRET_USER_IN: secrets.get(SECRET_USER_IN, ""),
                    SECRET_PASSWORD_IN: secrets.get(SECRET_PASSWORD_IN, ""),
                }
                for key, value in chap.items():
                    self.runner.run([*node, "--op", "update", "-n", key, "-v", value], timeout=30)
                login = self.runner.run([*node, "--login"], timeout=30, check=False)
                if login.rc == 0:  # it worked this time; leave no session for a volume that is not staged
                    self.runner.run([*node, "--logout"], timeout=30, check=False)
            except NodeError as err:
                log.warning("diagnostic iSCSI login failed to run", extra={"portal": portal, "error": str(err)})
                continue
            finally:
                self.runner.run([*node, "--op", "delete"], timeout=30, check=False)
            if login.rc == ISCSI_ERR_LOGIN_AUTH_FAILED:
                raise LoginRefused(
                    f"the storage host refused the iSCSI login to {iqn} at {portal}: authorization failed. Check "
                    "the CHAP user and password in the StorageClass's node-stage and controller-publish secrets "
                    "(they must be the same), and that the volume is published to this node"
                )

    def _has_session(self, portal: str, iqn: str) -> bool:
        result = self.runner.run(["iscsiadm", "-m", "session"], timeout=30, check=False)
        # Lines look like "tcp: [3] 198.18.0.1:3260,1 iqn.2026-11.io.berth.storage:vol-x (non-flash)".
        return any(f" {portal}," in line and iqn in line.split() for line in result.stdout.splitlines())

    def _prepare_mutual_chap(self, props: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        for portal, iqn in all_targets(props):
            node = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal]
            self.runner.run([*node, "--interface", "default", "--op", "new"], timeout=30)
            for key in (SECRET_USER_IN, SECRET_PASSWORD_IN):
                self.runner.run([*node, "--op", "update", "-n", key, "-v", secrets.get(key, "")], timeout=30)

    def _set_manual_startup(self, props: Mapping[str, Any]) -> None:
        for portal, iqn in all_targets(props):
            argv = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--op", "update"]
            try:
                self.runner.run([*argv, "-n", "node.startup", "-v", "manual"], timeout=30)
            except NodeError as err:
                # Not fatal for this attach; it only matters at the next reboot, so say it loudly.
                log.error("cannot set node.startup=manual", extra={"portal": portal, "iqn": iqn, "error": str(err)})

    def _sysfs_wwn(self, path: str) -> str:
        name = os.path.basename(os.path.realpath(path))
        slaves = os.path.join(self.sys_block_dir, name, "slaves")
        if os.path.isdir(slaves) and os.listdir(slaves):
            name = sorted(os.listdir(slaves))[0]
        return normalize_wwn(_read(os.path.join(self.sys_block_dir, name, "device", "wwid")))

    def unstage(self, record: StageRecord) -> None:
        device = self.current_device(record)
        if device is not None:
            # Checked before touching the staging mount: a publish target left behind keeps the device open.
            users = self._users_besides_staging(record, device)
            if users:
                raise StillInUse(f"device {device} of volume {record.volume_id} is still mounted at {', '.join(users)}")
        if record.access_type == MOUNT:
            # The staging dir itself belongs to the CO (it created it), so it stays.
            self.mounter.unmount_all(record.staging_path)
            fault_point("node-unstage.unmounted")
        self.detach(record, device)

    def _users_besides_staging(self, record: StageRecord, device: str) -> list[str]:
        staging = os.path.normpath(record.staging_path)
        return [u for u in self.mounter.table.users_of_device(device) if u != staging]

    def detach(self, record: StageRecord, device: str | None) -> None:
        props = dict(record.connection_properties)
        connector = self._connector(record.multipath, props, DetachFailed)
        if device is not None:
            try:
                self.fs.flush(device)
            except NodeError as err:
                log.warning("flush failed", extra={"device": device, "error": str(err)})
        # force when the device vanished, or when its multipath map is gone already (a detach that failed half-way:
        # the map was flushed, only path devices are left, with nothing to flush, and a non-forced retry fails on
        # them forever): os-brick then removes what is left (maps, sessions without devices) and still raises at
        # the end if something failed, so the record stays for a retry.
        map_device = self.usable_device(record, wait=0) if record.multipath else None
        if map_device is not None:
            self._flush_map(map_device)
        map_gone = record.multipath and self.usable_device(record, wait=0) is None
        self._disconnect(connector, props, device or record.device_path, force=device is None or map_gone)
        self._sweep_locks(props)

    def _flush_map(self, map_device: str) -> None:
        """Remove the volume's multipath map (`multipath -f`), waiting out udev's probes of it; os-brick then removes
        the paths and logs out. A map still busy after MAP_FLUSH_WINDOW is left to os-brick's flush and its retries."""
        dm_name = os.path.join(self.sys_block_dir, os.path.basename(map_device), "dm", "name")
        name = _read(dm_name)
        if not name:
            return  # gone already
        deadline = time.monotonic() + MAP_FLUSH_WINDOW
        while True:
            self.runner.run(["udevadm", "settle", "--timeout=10"], timeout=15, check=False)
            flushed = self.runner.run(["multipath", "-f", name], timeout=60, check=False)
            # multipath can exit 1 when multipathd removed the map for it, so the map's absence is what counts.
            if flushed.rc == 0 or _read(dm_name) != name:
                return
            if time.monotonic() >= deadline:
                log.warning("multipath map still in use", extra={"map": name, "error": flushed.stderr.strip()})
                return
            time.sleep(MAP_FLUSH_INTERVAL)

    def _disconnect(self, connector: Connector, props: dict[str, Any], path: str, force: bool) -> None:
        try:
            connector.disconnect_volume(dict(props), {"path": path}, force=force, ignore_errors=False)
        except Exception as err:
            raise DetachFailed(f"iSCSI detach from {_describe(props)} failed: {err}") from err

    # --- the device now ---

    def current_device(self, record: StageRecord) -> str | None:
        """Find the device by WWN (stable across re-logins), falling back to the recorded path."""
        candidates = []
        if record.wwn:
            if record.multipath:
                candidates.append(os.path.join(self.by_id_dir, f"dm-uuid-mpath-3{record.wwn}"))
            candidates.append(os.path.join(self.by_id_dir, f"wwn-0x{record.wwn}"))
        if record.device_path:
            candidates.append(record.device_path)
        for candidate in candidates:
            if os.path.exists(candidate):
                return os.path.realpath(candidate)
        return None

    def usable_device(self, record: StageRecord, wait: float) -> str | None:
        """The device to mount or bind: for a multipath volume only its map (waiting up to `wait` seconds for
        multipathd), never one of its paths; otherwise the current device."""
        if not record.multipath:
            return self.current_device(record)
        return self._wait_for_map(record.wwn, wait)

    def _wait_for_map(self, wwn: str, wait: float) -> str | None:
        uuid = f"mpath-3{wwn}"
        link = os.path.join(self.by_id_dir, f"dm-uuid-{uuid}")
        deadline = time.monotonic() + wait
        while True:
            if os.path.exists(link):
                return os.path.realpath(link)
            if (device := self._map_in_sysfs(uuid)) is not None:
                return device
            if time.monotonic() >= deadline:
                return None
            time.sleep(MULTIPATH_POLL_INTERVAL)

    def _map_in_sysfs(self, uuid: str) -> str | None:
        """The map's device as the kernel lists it, before udev made its by-id link (a loaded node's udev took more
        than 15 s for that in the lab, and a stage gave up on a map that was there)."""
        try:
            names = [n for n in os.listdir(self.sys_block_dir) if n.startswith("dm-")]
        except OSError:
            return None
        for name in names:
            device = os.path.join(self.dev_dir, name)
            if _read(os.path.join(self.sys_block_dir, name, "dm", "uuid")) == uuid and os.path.exists(device):
                return device
        return None

    def block_device(self, record: StageRecord) -> str | None:
        device = self.usable_device(record, wait=self.multipath_wait)
        if device is None:
            what = "multipath map" if record.multipath else "device"
            raise DeviceNotFound(f"the {what} of volume {record.volume_id} (WWN {record.wwn}) is not on this node")
        return device

    def member_paths(self, record: StageRecord) -> set[str]:
        """Kernel names (sdX) of the single paths behind the volume's multipath map: a bind of one of them
        bypasses multipath and must be replaced by the map."""
        device = self.usable_device(record, wait=0) if record.multipath else None
        if device is None:
            return set()
        slaves = os.path.join(self.sys_block_dir, os.path.basename(device), "slaves")
        return set(os.listdir(slaves)) if os.path.isdir(slaves) else set()

    def expand(self, record: StageRecord) -> int:
        connector = self._connector(record.multipath, record.connection_properties, AttachFailed)
        deadline = time.monotonic() + EXPAND_RETRY_WINDOW
        while True:
            try:
                # Rescans every path, then resizes the multipath map (multipathd resize map).
                connector.extend_volume(dict(record.connection_properties))
                break
            except Exception as err:
                if time.monotonic() >= deadline:
                    raise AttachFailed(f"rescan of volume {record.volume_id} failed: {err}") from err
                log.info("rescan failed, trying again", extra={"volume_id": record.volume_id, "error": str(err)})
                time.sleep(EXPAND_RETRY_INTERVAL)
        device = self.block_device(record)
        assert device is not None
        if record.access_type == MOUNT:
            self.fs.grow(record.fs_type, device, record.staging_path)
        return self.fs.block_size(device)

    def condition(self, record: StageRecord) -> str | None:
        device = self.current_device(record)
        if device is None:
            return f"device of volume {record.volume_id} (WWN {record.wwn}) is gone from this node"
        states = self._path_states(device)
        bad = [f"{name}: {state}" for name, state in states.items() if state != "running"]
        if states and len(bad) == len(states):
            return "no usable path: " + ", ".join(bad)
        if bad:
            return "degraded: " + ", ".join(bad)
        return None

    def _path_states(self, device: str) -> dict[str, str]:
        # sysfs only: reading the device itself could block behind queue_if_no_path.
        name = os.path.basename(device)
        slaves_dir = os.path.join(self.sys_block_dir, name, "slaves")
        names = sorted(os.listdir(slaves_dir)) if os.path.isdir(slaves_dir) else [name]
        states = {}
        for path in names:
            try:
                with open(os.path.join(self.sys_block_dir, path, "device", "state")) as f:
                    states[path] = f.read().strip()
            except OSError:
                continue
        return states


@dataclass(frozen=True)
class AttachedDevice:
    path: str
    wwn: str
    multipath: bool


def _is_device_mapper(path: str) -> bool:
    return os.path.basename(os.path.realpath(path)).startswith("dm-")


def _describe(props: Mapping[str, Any]) -> str:
    return ", ".join(f"{iqn} at {portal}" for portal, iqn in all_targets(props))
