"""LIO iSCSI export manager that runs ON the storage host (one request per process, or `--serve`).

The controller sends this file's source as `python3 -c <source>` and the request as JSON on stdin
(secrets such as CHAP passwords must not appear in the host's process list). It prints one JSON
line. It must stay self-contained: stdlib + rtslib_fb (Debian python3-rtslib-fb) only, no import
from csi_driver, since only this file's text reaches the host.

Why not targetcli: every targetcli call is a new process that reloads the whole configfs tree
(1.2-2.2 s each); one rtslib process does a whole batch of operations in 0.7-1.1 s (TCG lab), and
saves only the targets it touched, so that time stays flat as exports grow (bench/lio_many_volumes.py).

Request:  {"v": 1, "ops": [{"op": "export", ...}, ...], "save": true, "budget_seconds": 60}
Response: {"ok": true, "results": [...]}
          {"ok": false, "error": {"kind": "invalid|not_found|conflict|busy|host_not_ready|internal",
                                  "message": "...", "op_index": n}, "results": [...]}

budget_seconds: how long after this program starts it may still change anything. The controller sets it well below
its own timeout, so a request it gave up on (it kills only its local ssh) can neither wait for the host lock nor act
after a newer request: a publish that outlived its caller must not grant a node access again after the unpublish.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

try:  # absent on the controller and in unit tests; the validators below do not need it
    import rtslib_fb as rtslib
except ImportError:  # pragma: no cover - depends on the host
    rtslib = None

PROTOCOL = 1
LOCK_PATH = os.environ.get("BERTH_LIO_LOCK", "/run/lock/berth-lio.lock")
TPG_TAG = 1
LUN_INDEX = 0
MAX_OPS = 256
DEFAULT_BUDGET_SECONDS = 60.0
MAX_BUDGET_SECONDS = 3600.0
LOCK_POLL_SECONDS = 0.1

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_.-]{0,126}")
# Verbatim copies of csi_driver.ids' initiator-name rule (this file runs alone on the host; a test keeps them equal).
_IQN_RE = re.compile(r"iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.-]*(?::[A-Za-z0-9.:_-]+)?")
_EUI_RE = re.compile(r"eui\.[0-9A-Fa-f]{16}")
_NAA_RE = re.compile(r"naa\.[0-9A-Fa-f]{16}(?:[0-9A-Fa-f]{16})?")
MAX_INITIATOR_NAME_BYTES = 223
_SERIAL_RE = re.compile(r"[0-9A-Fa-f-]{8,64}")
_DEVICE_RE = re.compile(r"/dev/[A-Za-z0-9+_.-]+(/[A-Za-z0-9+_.-]+)*")
_CHAP_RE = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces (configfs trims them)
# Writes are refused below these paths; saveconfig is JSON the target service reads at boot.
_SAVE_DIRS = ("/etc/", "/var/lib/", "/run/", "/tmp/")

MUTATING = frozenset({"export", "configure", "unexport", "add_initiator", "remove_initiator"})
# Fences (a group snapshot's common instant, docs/group-snapshots.md): one record per fence, and a systemd timer that
# lifts it after at most MAX_FENCE_SECONDS even if the controller never comes back to do it.
FENCE_DIR = os.environ.get("BERTH_FENCE_DIR", "/run/berth/fences")
CONFIGFS_ISCSI = "/sys/kernel/config/target/iscsi"
MAX_FENCE_SECONDS = 600
_TOKEN_RE = re.compile(r"[0-9a-f]{16,64}")
# The timer's command: the script is constant, the files are its arguments.
ENABLE_SCRIPT = 'for f; do echo 1 > "$f"; done'
# SCSI UNMAP and WRITE SAME(unmap) emulation of a backstore: both on or both off.
UNMAP_ATTRIBUTES = ("emulate_tpu", "emulate_tpws")


class RequestError(Exception):
    kind = "invalid"


class NotFoundError(RequestError):
    kind = "not_found"


class ConflictError(RequestError):
    kind = "conflict"


class BusyError(RequestError):
    """The host lock stayed taken, or the request's budget ran out: nothing (more) was changed; retry."""

    kind = "busy"


class HostNotReadyError(RequestError):
    """The host lacks what Berth needs (rtslib): an operator must install it; a retry alone will not help."""

    kind = "host_not_ready"


# --- validation (pure: unit-tested without rtslib) ---


def check_name(value: Any, what: str = "volume") -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise RequestError(f"invalid {what} name {value!r}")
    return value


def check_target_iqn(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_INITIATOR_NAME_BYTES or not _IQN_RE.fullmatch(value):
        raise RequestError(f"invalid target IQN {value!r}")
    return value


def check_initiator(value: Any) -> str:
    if (
        not isinstance(value, str)
        or len(value) > MAX_INITIATOR_NAME_BYTES
        or not (_IQN_RE.fullmatch(value) or _EUI_RE.fullmatch(value) or _NAA_RE.fullmatch(value))
    ):
        raise RequestError(f"invalid initiator name {value!r}")
    return value


def check_device(value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE_RE.fullmatch(value) or "/../" in value + "/":
        raise RequestError(f"invalid device path {value!r}")
    return value


def check_serial(value: Any) -> str:
    if not isinstance(value, str) or not _SERIAL_RE.fullmatch(value):
        raise RequestError(f"invalid unit serial {value!r}")
    return value


def parse_portal(value: Any) -> tuple[str, int]:
    """'ip', 'ip:port', '[v6]' or '[v6]:port' → (ip in LIO form, port). LIO wants v6 in brackets."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"invalid portal {value!r}")
    port = 3260
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise RequestError(f"invalid portal {value!r}")
        if rest:
            port = _port(rest[1:], value)
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise RequestError(f"invalid portal address {value!r}") from e
        return f"[{host}]", port
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host = value
    elif ":" in host:
        raise RequestError(f"IPv6 portal must be bracketed: {value!r}")
    else:
        port = _port(port_text, value)
    try:
        ipaddress.IPv4Address(host)
    except ValueError as e:
        raise RequestError(f"invalid portal address {value!r}") from e
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RequestError(f"invalid portal port in {whole!r}")
    return int(text)


def check_chap(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("chap must be an object")
    allowed = {"user", "password", "mutual_user", "mutual_password"}
    extra = set(value) - allowed
    if extra:
        raise RequestError(f"unknown chap fields {sorted(extra)}")
    for key in ("user", "password"):
        if key not in value:
            raise RequestError(f"chap.{key} is required")
    if ("mutual_user" in value) != ("mutual_password" in value):
        raise RequestError("chap.mutual_user and chap.mutual_password go together")
    for key, v in value.items():
        if not isinstance(v, str) or not _CHAP_RE.fullmatch(v) or v == "NULL":
            # Never echo the value: it may be a password.
            raise RequestError(f"invalid chap.{key} (1-255 printable ASCII characters, no spaces)")
    return dict(value)


def _check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{what} must be true or false")
    return value


def validate_op(op: Any) -> dict[str, Any]:
    """Return a normalised copy of one operation or raise RequestError."""
    if not isinstance(op, dict) or not isinstance(op.get("op"), str):
        raise RequestError("each op must be an object with an 'op' string")
    name = op["op"]
    fields: dict[str, Any] = {"op": name}
    if name == "export":
        fields["volume"] = check_name(op.get("volume"))
        fields["target"] = check_target_iqn(op.get("target"))
        fields["device"] = check_device(op.get("device"))
        fields["serial"] = check_serial(op.get("serial"))
        portals = op.get("portals")
        if not isinstance(portals, list) or not portals:
            raise RequestError("portals must be a non-empty list")
        fields["portals"] = sorted({parse_portal(p) for p in portals})
        fields["unmap"] = _check_bool(op.get("unmap", True), "unmap")
    elif name == "configure":
        fields["volume"] = check_name(op.get("volume"))
        fields["target"] = check_target_iqn(op.get("target"))
        fields["unmap"] = _check_bool(op.get("unmap"), "unmap")
    elif name == "unexport":
        fields["volume"] = check_name(op.get("volume"))
        fields["target"] = check_target_iqn(op.get("target"))
    elif name == "add_initiator":
        fields["target"] = check_target_iqn(op.get("target"))
        fields["initiator"] = check_initiator(op.get("initiator"))
        fields["readonly"] = _check_bool(op.get("readonly", False), "readonly")
        fields["chap"] = check_chap(op.get("chap"))
    elif name in ("remove_initiator",):
        fields["target"] = check_target_iqn(op.get("target"))
        fields["initiator"] = check_initiator(op.get("initiator"))
    elif name == "list_initiators":
        fields["target"] = check_target_iqn(op.get("target"))
    elif name == "fence":
        targets = op.get("targets")
        if not isinstance(targets, list) or not targets or len(targets) > MAX_OPS:
            raise RequestError(f"targets must be a list of 1..{MAX_OPS} target names")
        fields["targets"] = sorted({check_target_iqn(t) for t in targets})
        fields["token"] = check_token(op.get("token"))
        seconds = op.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= MAX_FENCE_SECONDS:
            raise RequestError(f"seconds must be an integer from 1 to {MAX_FENCE_SECONDS}")
        fields["seconds"] = seconds
    elif name == "unfence":
        fields["token"] = check_token(op.get("token"))
    elif name == "list_exports":
        prefix = op.get("iqn_prefix")
        if not isinstance(prefix, str) or not _IQN_RE.fullmatch(prefix.rstrip(":")):
            raise RequestError(f"invalid iqn_prefix {prefix!r}")
        fields["iqn_prefix"] = prefix.rstrip(":")
    elif name == "list_backstores":
        pass
    elif name == "save":
        fields["path"] = _check_save_path(op.get("path"))
    else:
        raise RequestError(f"unknown op {name!r}")
    unknown = set(op) - set(fields) - {"op"}
    if unknown:
        raise RequestError(f"unknown fields for {name}: {sorted(unknown)}")
    return fields


def check_token(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise RequestError("token must be 16 to 64 lowercase hex digits")
    return value


def _check_save_path(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(_SAVE_DIRS) or "/../" in value or not value.endswith(".json"):
        raise RequestError(f"invalid save path {value!r}")
    return value


def check_budget(value: Any) -> float:
    if value is None:
        return DEFAULT_BUDGET_SECONDS
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= MAX_BUDGET_SECONDS:
        raise RequestError(f"budget_seconds must be a number in (0, {MAX_BUDGET_SECONDS:g}]")
    return float(value)


def validate_request(req: Any) -> tuple[list[dict[str, Any]], bool, str | None, float]:
    """(ops, save, save_path, budget_seconds) from a request, or RequestError."""
    if not isinstance(req, dict):
        raise RequestError("request must be a JSON object")
    if req.get("v") != PROTOCOL:
        raise RequestError(f"protocol version {req.get('v')!r} unsupported (want {PROTOCOL})")
    unknown = set(req) - {"v", "ops", "save", "save_path", "budget_seconds"}
    if unknown:
        raise RequestError(f"unknown request fields {sorted(unknown)}")
    ops = req.get("ops")
    if not isinstance(ops, list) or not ops or len(ops) > MAX_OPS:
        raise RequestError(f"ops must be a list of 1..{MAX_OPS} operations")
    save = _check_bool(req.get("save", False), "save")
    budget = check_budget(req.get("budget_seconds"))
    return [validate_op(o) for o in ops], save, _check_save_path(req.get("save_path")), budget


# --- rtslib operations (run on the host) ---


def _fabric() -> Any:
    return rtslib.FabricModule("iscsi")


def _lookup_target(iqn: str) -> Any | None:
    try:
        return rtslib.Target(_fabric(), iqn, mode="lookup")
    except rtslib.RTSLibError:
        return None


def _tpg(target: Any) -> Any:
    try:
        return rtslib.TPG(target, TPG_TAG, mode="lookup")
    except rtslib.RTSLibError as e:
        raise ConflictError(f"target {target.wwn} has no TPG {TPG_TAG}") from e


def _require_tpg(iqn: str) -> Any:
    target = _lookup_target(iqn)
    if target is None:
        raise NotFoundError(f"target {iqn} is not exported")
    return _tpg(target)


def _lun0(tpg: Any) -> Any | None:
    for lun in tpg.luns:
        if lun.lun == LUN_INDEX:
            return lun
    return None


def _lookup_so(name: str) -> Any | None:
    try:
        return rtslib.BlockStorageObject(name)
    except rtslib.RTSLibError:
        return None


def _best_effort_attr(obj: Any, name: str, value: str) -> bool:
    try:
        obj.set_attribute(name, value)
        return True
    except rtslib.RTSLibError:
        return False


def op_export(op: dict[str, Any]) -> dict[str, Any]:
    created = False
    so = _lookup_so(op["volume"])
    if so is not None:
        if os.path.realpath(so.udev_path) != os.path.realpath(op["device"]):
            raise ConflictError(f"backstore {op['volume']} exists on {so.udev_path}, not {op['device']}")
        if so.wwn != op["serial"]:
            raise ConflictError(f"backstore {op['volume']} has serial {so.wwn}, not {op['serial']}")
    else:
        so = rtslib.BlockStorageObject(op["volume"], dev=op["device"], wwn=op["serial"])
        created = True
    # Thin LVs: pass SCSI UNMAP / WRITE SAME(unmap) down so discards free pool space (the volume's iscsiUnmap).
    # Best effort: a device without discard refuses it, and must still be exported.
    with contextlib.suppress(rtslib.RTSLibError):
        created = _set_unmap(so, op["unmap"]) or created

    target = rtslib.Target(_fabric(), op["target"], mode="any")
    try:
        tpg = rtslib.TPG(target, TPG_TAG, mode="lookup")
    except rtslib.RTSLibError:
        tpg = rtslib.TPG(target, TPG_TAG, mode="create")
        # CHAP is enforced per ACL (see _set_acl_auth); the TPG itself must allow AuthMethod=None.
        # Only at creation: an old-kernel fallback may have switched it on deliberately.
        tpg.set_attribute("authentication", "0")
    # Explicit ACLs only: an initiator without an ACL cannot log in, and one with an ACL sees only
    # the LUNs mapped into it (LUN masking per published node).
    tpg.set_attribute("generate_node_acls", "0")
    tpg.set_attribute("demo_mode_write_protect", "0")
    tpg.set_attribute("cache_dynamic_acls", "0")

    lun = _lun0(tpg)
    if lun is None:
        lun = rtslib.LUN(tpg, LUN_INDEX, so)
        created = True
    elif lun.storage_object.name != so.name or lun.storage_object.plugin != so.plugin:
        raise ConflictError(f"{op['target']} LUN {LUN_INDEX} maps {lun.storage_object.name}")

    want = set(op["portals"])
    have = {(np.ip_address, np.port): np for np in tpg.network_portals}
    for key in sorted(want - set(have)):
        rtslib.NetworkPortal(tpg, key[0], key[1], mode="any")
        created = True
    for key in sorted(set(have) - want):
        have[key].delete()
    tpg.enable = True
    return {
        "target": op["target"],
        "lun": LUN_INDEX,
        "serial": so.wwn,
        "device": so.udev_path,
        "portals": [_portal_str(ip, port) for ip, port in sorted(want)],
        "changed": created,
    }


def _set_unmap(so: Any, unmap: bool) -> bool:
    """UNMAP emulation on or off; True when an attribute changed. RTSLibError when the kernel refuses."""
    want = "1" if unmap else "0"
    changed = False
    for name in UNMAP_ATTRIBUTES:
        if str(so.get_attribute(name)) != want:
            so.set_attribute(name, want)
            changed = True
    return changed


def op_configure(op: dict[str, Any]) -> dict[str, Any]:
    """Change a live backstore (no detach: nodes see it after a rescan); a volume never exported has none yet."""
    so = _lookup_so(op["volume"])
    if so is None:
        return {"target": op["target"], "changed": False}
    return {"target": op["target"], "changed": _set_unmap(so, op["unmap"])}


def _portal_str(ip: str, port: int) -> str:
    return f"{ip}:{port}"


def op_unexport(op: dict[str, Any]) -> dict[str, Any]:
    removed = False
    target = _lookup_target(op["target"])
    if target is not None:
        target.delete()  # disables the TPG, drops sessions, ACLs, LUNs and portals
        removed = True
    so = _lookup_so(op["volume"])
    if so is not None:
        if any(True for _ in so.attached_luns):
            raise ConflictError(f"backstore {op['volume']} is still used by another target")
        so.delete()
        removed = True
    return {"target": op["target"], "changed": removed}


def _set_acl_auth(tpg: Any, acl: Any, chap: dict[str, str] | None) -> str:
    """Apply CHAP to one ACL. Returns where authentication is enforced: 'acl', 'tpg' or 'none'.

    Kernels >= 5.19 (Debian 12: 6.1) have a per-ACL 'authentication' attribute, so nodes with and
    without CHAP can share a target. Older kernels only have the TPG-wide switch.
    """
    acl.chap_userid = chap["user"] if chap else ""
    acl.chap_password = chap["password"] if chap else ""
    acl.chap_mutual_userid = (chap or {}).get("mutual_user", "")
    acl.chap_mutual_password = (chap or {}).get("mutual_password", "")
    if _best_effort_attr(acl, "authentication", "1" if chap else "0"):
        return "acl" if chap else "none"
    if chap:
        tpg.set_attribute("authentication", "1")
        return "tpg"
    return "none"


def op_add_initiator(op: dict[str, Any]) -> dict[str, Any]:
    tpg = _require_tpg(op["target"])
    lun = _lun0(tpg)
    if lun is None:
        raise ConflictError(f"{op['target']} has no LUN {LUN_INDEX}")
    changed = False
    try:
        acl = rtslib.NodeACL(tpg, op["initiator"], mode="lookup")
    except rtslib.RTSLibError:
        acl = rtslib.NodeACL(tpg, op["initiator"], mode="create")
        changed = True
    auth = _set_acl_auth(tpg, acl, op["chap"])
    mapped = {m.mapped_lun: m for m in acl.mapped_luns}
    mlun = mapped.get(LUN_INDEX)
    if mlun is not None and mlun.tpg_lun.lun != LUN_INDEX:
        mlun.delete()
        mlun = None
    if mlun is None:
        rtslib.MappedLUN(acl, LUN_INDEX, tpg_lun=lun, write_protect=op["readonly"])
        changed = True
    elif mlun.write_protect != op["readonly"]:
        mlun.write_protect = op["readonly"]
        changed = True
    return {
        "target": op["target"],
        "initiator": acl.node_wwn,
        "readonly": op["readonly"],
        "auth": auth,
        "changed": changed,
    }


def op_remove_initiator(op: dict[str, Any]) -> dict[str, Any]:
    target = _lookup_target(op["target"])
    if target is None:
        return {"target": op["target"], "initiator": op["initiator"], "changed": False}
    tpg = _tpg(target)
    try:
        acl = rtslib.NodeACL(tpg, op["initiator"], mode="lookup")
    except rtslib.RTSLibError:
        return {"target": op["target"], "initiator": op["initiator"], "changed": False}
    acl.delete()  # also ends that initiator's session on this target
    return {"target": op["target"], "initiator": op["initiator"], "changed": True}


def _describe_acl(acl: Any) -> dict[str, Any]:
    mapped = {m.mapped_lun: m for m in acl.mapped_luns}
    mlun = mapped.get(LUN_INDEX)
    return {
        "initiator": acl.node_wwn,
        "mapped": mlun is not None,
        "readonly": bool(mlun.write_protect) if mlun is not None else None,
        "chap_user": acl.chap_userid or None,  # never passwords
        "mutual_chap": bool(acl.chap_mutual_userid),
        "logged_in": acl.session is not None,
    }


def op_list_initiators(op: dict[str, Any]) -> dict[str, Any]:
    tpg = _require_tpg(op["target"])
    return {"target": op["target"], "initiators": [_describe_acl(a) for a in tpg.node_acls]}


def _describe_target(target: Any, prefix: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "target": target.wwn,
        "volume": target.wwn[len(prefix) + 1 :],
        "device": None,
        "serial": None,
        "backstore": None,
        "portals": [],
        "initiators": [],
        "enabled": False,
    }
    try:
        tpg = rtslib.TPG(target, TPG_TAG, mode="lookup")
    except rtslib.RTSLibError:
        return info
    lun = _lun0(tpg)
    if lun is not None:
        so = lun.storage_object
        info.update(backstore=so.name, device=so.udev_path, serial=so.wwn)
    info["portals"] = sorted(_portal_str(np.ip_address, np.port) for np in tpg.network_portals)
    info["initiators"] = [_describe_acl(a) for a in tpg.node_acls]
    info["enabled"] = bool(tpg.enable)
    return info


def op_list_exports(op: dict[str, Any]) -> dict[str, Any]:
    fabric = _fabric()
    prefix = op["iqn_prefix"]
    if not fabric.exists:
        return {"exports": []}
    exports = [_describe_target(t, prefix) for t in fabric.targets if t.wwn.startswith(prefix + ":")]
    return {"exports": sorted(exports, key=lambda e: e["target"])}


def op_list_backstores(op: dict[str, Any]) -> dict[str, Any]:
    """Every block backstore with its device and how many LUNs use it (read-only): the orphan audit looks for
    backstores whose LV is gone."""
    backstores = [
        {"name": so.name, "device": so.udev_path, "luns": sum(1 for _ in so.attached_luns)}
        for so in rtslib.RTSRoot().storage_objects
        if so.plugin == "block"
    ]
    return {"backstores": sorted(backstores, key=lambda b: b["name"])}


def op_save(op: dict[str, Any]) -> dict[str, Any]:
    return _save(op.get("path"))


# Where target.service restores from at boot: rtslib's own (distribution's) default, Debian's when rtslib does not
# say; the environment variable overrides both (tests).
DEBIAN_SAVE_FILE = "/etc/rtslib-fb-target/saveconfig.json"
SAVE_FILE_OVERRIDE = os.environ.get("BERTH_LIO_SAVE_FILE")


def _save(path: str | None, touched: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """Persist the live configuration for the boot-time restore (target.service reads it).

    With `touched` ({"targets": iqns, "volumes": backstore names}) only those entries of the existing file are
    rewritten: rtslib's full dump walks every target in configfs, which grows with the export count (3 s at 50
    targets in the TCG lab, bench/lio_many_volumes.py), while one target's dump does not."""
    distribution_default = getattr(getattr(rtslib, "root", None), "default_save_file", DEBIAN_SAVE_FILE)
    save_file = path or SAVE_FILE_OVERRIDE or distribution_default
    saveconf = None
    if touched is not None:
        saveconf = merged_saveconf(_read_saveconf(save_file), touched, _dump_target, _dump_so)
    incremental = saveconf is not None
    if saveconf is None:
        saveconf = rtslib.RTSRoot().dump()
    _write_private(save_file, saveconf)
    return {"saved": path or "default", "incremental": incremental}


def _read_saveconf(save_file: str) -> dict[str, Any] | None:
    try:
        with open(save_file, encoding="utf-8") as f:
            saveconf: dict[str, Any] = json.load(f)
            return saveconf
    except (OSError, ValueError):
        return None


def merged_saveconf(
    current: Any, touched: dict[str, set[str]], dump_target: Any, dump_so: Any
) -> dict[str, Any] | None:
    """`current` with the touched iSCSI targets and block backstores replaced by their live dumps (dropped
    when gone); None when `current` is not a saveconfig we understand (then the caller dumps everything)."""
    if not isinstance(current, dict) or not all(
        isinstance(current.get(k), list) for k in ("targets", "storage_objects")
    ):
        return None
    iqns, volumes = touched["targets"], touched["volumes"]
    targets = [t for t in current["targets"] if not (t.get("fabric") == "iscsi" and t.get("wwn") in iqns)]
    objects = [o for o in current["storage_objects"] if not (o.get("plugin") == "block" and o.get("name") in volumes)]
    targets += [d for d in map(dump_target, sorted(iqns)) if d is not None]
    objects += [d for d in map(dump_so, sorted(volumes)) if d is not None]
    return {**current, "targets": targets, "storage_objects": objects}


def _dump_target(iqn: str) -> dict[str, Any] | None:
    target = _lookup_target(iqn)
    return None if target is None else target.dump()


def _dump_so(name: str) -> dict[str, Any] | None:
    so = _lookup_so(name)
    return None if so is None else so.dump()


def _write_private(save_file: str, saveconf: dict[str, Any]) -> None:
    """Write atomically with mode 0600 (the file holds CHAP secrets), as rtslib's own save does."""
    tmp = save_file + ".berth-tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    os.makedirs(os.path.dirname(save_file), exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(saveconf, sort_keys=True, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, save_file)


def _fence_unit(token: str) -> str:
    return f"berth-unfence-{token}"


def run_command(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def op_fence(op: dict[str, Any]) -> dict[str, Any]:
    """Disable the TPGs of these targets: their sessions end once their commands completed, and the initiators
    queue new I/O (multipath without a path, or iSCSI session recovery) until op_unfence or the timer enables
    them again. Nothing is saved: a reboot brings the targets back enabled."""
    tpgs = []
    for iqn in op["targets"]:
        target = _lookup_target(iqn)
        if target is not None:  # else not published anywhere: nobody writes to it
            tpgs += [(iqn, tpg) for tpg in target.tpgs if tpg.enable]
    os.makedirs(FENCE_DIR, mode=0o700, exist_ok=True)
    with open(_fence_record(op["token"]), "w") as f:  # first: op_unfence must know every TPG this op may disable
        json.dump({"tpgs": [[iqn, tpg.tag] for iqn, tpg in tpgs]}, f)
    files = [f"{CONFIGFS_ISCSI}/{iqn}/tpgt_{tpg.tag}/enable" for iqn, tpg in tpgs]
    timer = [
        "systemd-run", "--quiet", "--collect", f"--unit={_fence_unit(op['token'])}", f"--on-active={op['seconds']}s",
        "--timer-property=AccuracySec=1s", "sh", "-c", ENABLE_SCRIPT, "sh", *files,
    ]  # fmt: skip
    armed = run_command(timer)
    if armed.returncode != 0:
        raise RuntimeError(f"cannot arm the fence's timer: {armed.stderr.strip()}")  # the host's fault: internal
    for _, tpg in tpgs:
        tpg.enable = False
    return {"fenced": [iqn for iqn, _ in tpgs]}


def op_unfence(op: dict[str, Any]) -> dict[str, Any]:
    """Enable again what op_fence disabled (idempotent: a second call, or one after the timer, finds nothing)."""
    try:
        with open(_fence_record(op["token"])) as f:
            tpgs = json.load(f)["tpgs"]
    except FileNotFoundError:
        return {"unfenced": []}
    for iqn, tag in tpgs:
        target = _lookup_target(iqn)
        if target is not None:  # else removed meanwhile
            rtslib.TPG(target, tag, mode="lookup").enable = True
    run_command(["systemctl", "stop", f"{_fence_unit(op['token'])}.timer"])
    os.unlink(_fence_record(op["token"]))
    return {"unfenced": [iqn for iqn, _ in tpgs]}


def _fence_record(token: str) -> str:
    return os.path.join(FENCE_DIR, f"{token}.json")


OPS = {
    "export": op_export,
    "configure": op_configure,
    "unexport": op_unexport,
    "add_initiator": op_add_initiator,
    "remove_initiator": op_remove_initiator,
    "list_initiators": op_list_initiators,
    "list_exports": op_list_exports,
    "list_backstores": op_list_backstores,
    "save": op_save,
    "fence": op_fence,
    "unfence": op_unfence,
}


Clock = Callable[[], float]


@contextlib.contextmanager
def host_lock(deadline: float, path: str | None = None, clock: Clock = time.monotonic) -> Iterator[None]:
    """Serialise berth LIO programs on this host (configfs edits and saveconfig are not atomic), waiting until
    `deadline` at most: a request whose caller gave up must not queue here and run after a newer one."""
    path = path or LOCK_PATH
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if clock() >= deadline:
                    raise BusyError(
                        "another berth LIO operation held the host lock for this request's whole time budget; "
                        "nothing was changed, retry later"
                    ) from None
                time.sleep(LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def execute(
    ops: list[dict[str, Any]],
    save: bool,
    save_path: str | None,
    deadline: float = float("inf"),
    clock: Clock = time.monotonic,
) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    touched: dict[str, set[str]] = {"targets": set(), "volumes": set()}
    mutated = False
    error: dict[str, Any] | None = None
    for index, op in enumerate(ops):
        try:
            if op["op"] in MUTATING | {"fence"} and clock() >= deadline:
                raise BusyError(f"the request's time budget ran out before {op['op']}; nothing more was changed")
            if op["op"] in MUTATING:  # before the op: a half-done op must be saved too
                touched["targets"].add(op["target"])
                touched["volumes"].update([op["volume"]] if "volume" in op else [])
            results.append(OPS[op["op"]](op))
            mutated = mutated or (op["op"] in MUTATING and results[-1].get("changed", True))
        except RequestError as e:
            error = {"kind": e.kind, "message": str(e), "op_index": index}
            break
        except Exception as e:  # rtslib/OS errors: report, keep what was done consistent
            error = {"kind": "internal", "message": f"{type(e).__name__}: {e}", "op_index": index}
            break
    # Save whatever reached the kernel, even after a failure, so a reboot restores the live state.
    if save and mutated:
        try:
            _save(save_path, touched)
        except Exception as e:
            error = error or {"kind": "internal", "message": f"save failed: {e}", "op_index": len(ops)}
    if error:
        return {"ok": False, "error": error, "results": results}
    return {"ok": True, "results": results}


def forget_other_writers() -> None:
    """rtslib keeps a per-process map of backstore indexes (rtslib_fb.tcm.bs_cache), read from configfs once. A
    resident process outlives the other writers (one-shot requests, `targetctl restore` at boot), and a stale map
    makes it create a backstore at an index that is taken ("This _Backstore already exists in configFS"). Emptied
    under the host lock before each request, the map is read again from configfs."""
    rtslib.tcm.bs_cache.clear()


def answer(text: str, started: float, clock: Clock = time.monotonic) -> dict[str, Any]:
    """The response to one request's JSON text; its budget counts from `started`."""
    try:
        req = json.loads(text)
        ops, save, save_path, budget = validate_request(req)
        if rtslib is None:
            raise HostNotReadyError(
                "python3-rtslib-fb is not installed on the storage host (apt-get install python3-rtslib-fb)"
            )
        deadline = started + budget
        with host_lock(deadline, clock=clock):
            forget_other_writers()
            return execute(ops, save, save_path, deadline, clock)
    except json.JSONDecodeError as e:
        return {"ok": False, "error": {"kind": "invalid", "message": f"bad JSON: {e}"}, "results": []}
    except RequestError as e:
        return {"ok": False, "error": {"kind": e.kind, "message": str(e)}, "results": []}


def main(stdin: Any = None, stdout: Any = None, clock: Clock = time.monotonic) -> int:
    """One request: the whole of stdin; its budget counts from the program's start."""
    started = clock()
    stdout = stdout or sys.stdout
    stdout.write(json.dumps(answer((stdin or sys.stdin).read(), started, clock), sort_keys=True) + "\n")
    stdout.flush()
    return 0


def serve(stdin: Any = None, stdout: Any = None, clock: Clock = time.monotonic) -> int:
    """Resident mode (`--serve`, csi_driver/storage/resident.py): one request per line until stdin ends, each
    answered like main() does (budget from when its line arrived, the host lock taken and released per request).
    The same loop as nfs_host.serve: each host program must stay self-contained."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    for line in iter(stdin.readline, ""):
        if line.strip():
            stdout.write(json.dumps(answer(line, clock(), clock), sort_keys=True) + "\n")
            stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
