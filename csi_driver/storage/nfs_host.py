"""Kernel NFS exports of per-volume filesystems, run ON the storage host (one request per process, or `--serve`).

The controller sends this file's source as `python3 -c <source>` and ONE operation as JSON on stdin; the
program prints one JSON line. It must stay self-contained (stdlib only, no import from csi_driver): only this
file's text reaches the host. Multi-step changes (mkfs + mount + /etc/fstab, exports file + exportfs) happen
here so that one SSH round trip does one whole operation, under host-side flocks.

Layout (see docs/nfs.md): LV /dev/<vg>/<lv>, filesystem mounted at <export_root>/<lv>, one fstab line per
volume, one exports file /etc/exports.d/berth-<lv>.exports per volume.

Request:  {"v": 1, "op": "prepare|publish|unpublish|reconfigure|teardown|grow|freeze|thaw|fence|unfence|inventory", ...}
Response: {"ok": true, "result": {...}}
          {"ok": false, "error": {"kind": "invalid|not_found|conflict|in_use|busy|out_of_range|host_not_ready|failed|
                                          timeout|internal",
                                  "message": "...", ["argv": [...], "rc": n, "stderr": "..."]}}
Every value is validated here again: the host trusts nobody, and commands are argument lists, never shell text.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

PROTOCOL = 1
FILESYSTEMS = ("xfs", "ext4")
# root_squash: root on a node (any pod running as root) is nobody here, so it cannot plant setuid-root files or take
# other users' files; a StorageClass asks for no_root_squash or all_squash,anonuid=... explicitly (docs/nfs.md).
DEFAULT_OPTIONS = "rw,sync,no_subtree_check,root_squash"
# A fresh volume's root: every uid may create its files (a squashed root, KubeVirt's qemu 107, a pod's uid). No sticky
# bit: with root_squash a root pod's new file comes back owned by nobody, and the client kernel's protected_regular
# (on by default) then refuses that pod's own O_CREAT in a sticky world-writable directory (found in the lab cluster).
VOLUME_ROOT_MODE = 0o777
# nofail: a missing LV must not drop the whole storage host into emergency mode at boot.
# x-systemd.before: nfs-server's `exportfs -r` runs after the volume is mounted (nofail alone drops that order).
FSTAB_OPTIONS = "defaults,nofail,x-systemd.before=nfs-server.service"
EXPORTS_PREFIX = "berth-"
EXPORTS_SUFFIX = ".exports"
LOCK_WAIT_SECONDS = 60.0
# nfsd lets go of a volume's files a little after its last client unmounted (the client's CLOSE and DELEGRETURN
# calls follow its umount); a DeleteVolume right after the unpublish waits this long for that.
RELEASE_WAIT_SECONDS = 20.0
FLUSH_INTERVAL = 5.0
CMD_TIMEOUT = 60.0
# A group snapshot's fence (docs/group-snapshots.md): the member volumes' clients' NFS traffic dropped, in a chain of
# its own, which a systemd timer removes after at most thaw_after seconds if the controller never comes back.
NFS_PORT = "2049"
MAX_FENCED_VOLUMES = 256
# The command that lifts a fence: the script is constant, the chain is its argument.
UNFENCE_SCRIPT = (
    'for t in iptables ip6tables; do $t -w -D INPUT -j "$1"; $t -w -F "$1"; $t -w -X "$1"; done 2>/dev/null; true'
)
MKFS_TIMEOUT = 600.0
FSCK_TIMEOUT = 1800.0
# xfs_growfs queues the headers of every new allocation group in memory before it writes any: growing a small xfs
# (AGs of 256 MiB) to petabytes took the host's whole memory. Grown this many AGs at a time, the memory one step
# needs is bounded (~32 KiB per AG) whatever the target size.
XFS_GROW_STEP_AGS = 512
MAX_BYTES_LIMIT = 2**63 - 1

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_.-]{0,126}")
_ROOT_RE = re.compile(r"(/[A-Za-z0-9_.+-]+)+")
# Export options: a conservative charset. No whitespace, '(', ')', '#', quotes (they would break the exports
# file) and no '/' (no refer=/replicas=/mountpoint= paths).
_OPTIONS_RE = re.compile(r"[A-Za-z0-9_=:.,-]{1,512}")  # "-" alone: no options besides rw/ro
_NODE_ID_RE = re.compile(r"[A-Za-z0-9.:|,_@+-]{1,256}")
_TOKEN_RE = re.compile(r"[0-9a-f]{8,32}")
# Paths an export root must never be under (or be): system trees.
_FORBIDDEN_TOP = frozenset(
    {"proc", "sys", "dev", "etc", "boot", "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "run"}
)
# Options Berth sets itself (per client) or that must be unique per export.
_RESERVED_OPTIONS = ("rw", "ro", "mp", "mountpoint", "fsid")


class RequestError(Exception):
    kind = "invalid"


class NotFoundError(RequestError):
    kind = "not_found"


class ConflictError(RequestError):
    kind = "conflict"


class InUseError(RequestError):
    kind = "in_use"


class BusyError(RequestError):
    kind = "busy"


class OutOfRangeError(RequestError):
    kind = "out_of_range"


class HostNotReadyError(RequestError):
    """A program the NFS backend runs is not installed on the host: an operator must install it."""

    kind = "host_not_ready"


class CommandError(RequestError):
    """A host command failed; carries what the controller needs to build a CommandFailed."""

    kind = "failed"

    def __init__(self, argv: list[str], rc: int, stderr: str, message: str = ""):
        self.argv = argv
        self.rc = rc
        self.stderr = stderr
        super().__init__(message or f"{' '.join(argv[:6])} exited {rc}: {stderr.strip()[-500:]}")


class CommandTimeoutError(CommandError):
    kind = "timeout"

    def __init__(self, argv: list[str], timeout: float):
        self.timeout = timeout
        super().__init__(argv, -1, "", f"{argv[0]} timed out after {timeout:g}s")


# --- validation (pure) ---


def check_name(value: Any, what: str = "LV") -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or value.startswith("snapshot"):
        raise RequestError(f"invalid {what} name {value!r}")
    return value


def check_export_root(value: Any) -> str:
    """Absolute, normalised, conservative charset, not a system tree (the root itself is never '/')."""
    if not isinstance(value, str) or len(value) > 256 or not _ROOT_RE.fullmatch(value):
        raise RequestError(f"invalid export root {value!r}")
    parts = value.split("/")[1:]
    if any(p in (".", "..") for p in parts) or os.path.normpath(value) != value:
        raise RequestError(f"export root {value!r} must be a normalised absolute path")
    if parts[0] in _FORBIDDEN_TOP:
        raise RequestError(f"export root {value!r} is inside a system directory")
    return value


def mountpoint_for(export_root: str, lv: str) -> str:
    return f"{check_export_root(export_root)}/{check_name(lv)}"


def device_for(vg: str, lv: str) -> str:
    return f"/dev/{check_name(vg, 'VG')}/{check_name(lv)}"


def check_confined(path: str, export_root: str) -> str:
    """`path` must resolve to a direct child of the resolved export root: no symlink may lead elsewhere."""
    real_root = os.path.realpath(export_root)
    real = os.path.realpath(path)
    if os.path.dirname(real) != real_root or os.path.basename(real) != os.path.basename(path):
        raise RequestError(f"{path} escapes the export root {export_root} (resolves to {real})")
    if os.path.islink(path):
        raise RequestError(f"{path} is a symbolic link")
    return path


def check_address(value: Any) -> str:
    """One client IP address, normalised (IPv6 compressed); no networks, wildcards or host names."""
    if not isinstance(value, str):
        raise RequestError(f"invalid client address {value!r}")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError as e:
        raise RequestError(f"invalid client address {value!r}") from e
    if addr.is_unspecified or addr.is_multicast:
        raise RequestError(f"client address {value!r} is not a host address")
    return str(addr)


def check_addresses(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > 16:
        raise RequestError("addresses must be a list of 1..16 IP addresses")
    return sorted({check_address(a) for a in value})


def check_options(value: Any) -> str:
    """Export options without rw/ro (set per client); reserved ones refused. Returns the normalised list."""
    if value is None:
        value = DEFAULT_OPTIONS
    if not isinstance(value, str) or not _OPTIONS_RE.fullmatch(value):
        raise RequestError(f"invalid export options {value!r} (allowed characters: A-Z a-z 0-9 _ = : . , -)")
    tokens = [t for t in value.split(",") if t]
    if not tokens:
        raise RequestError("export options are empty")
    if tokens == ["-"]:
        return ""  # how the exports file writes "nothing besides rw/ro"
    kept: list[str] = []
    for token in tokens:
        name = token.split("=", 1)[0]
        if name in ("rw", "ro"):
            continue  # per client, from the publication's read-only flag
        if name in _RESERVED_OPTIONS:
            raise RequestError(f"export option {token!r} is set by Berth itself or must be unique per export")
        if token not in kept:
            kept.append(token)
    return ",".join(kept)


def check_node_id(value: Any) -> str:
    if not isinstance(value, str) or not _NODE_ID_RE.fullmatch(value):
        raise RequestError(f"invalid node ID {value!r}")
    return value


def _check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{what} must be true or false")
    return value


def _check_int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{what} must be an integer in {low}..{high}")
    return value


_FIELDS: dict[str, tuple[str, ...]] = {
    "prepare": ("vg", "lv", "export_root", "filesystem", "fresh", "max_bytes"),
    "publish": ("vg", "lv", "export_root", "node_id", "addresses", "readonly", "options"),
    "unpublish": ("lv", "export_root", "node_id", "addresses"),
    "reconfigure": ("lv", "export_root", "options"),
    "teardown": ("vg", "lv", "export_root"),
    "grow": ("vg", "lv", "export_root", "max_bytes"),
    "freeze": ("vg", "lv", "export_root", "token", "thaw_after"),
    "thaw": ("lv", "export_root", "token"),
    "inventory": ("export_root",),
    "fence": ("lvs", "export_root", "token", "thaw_after"),
    "unfence": ("export_root", "token"),
}


def validate_request(req: Any) -> dict[str, Any]:
    """A normalised copy of the request, or RequestError."""
    if not isinstance(req, dict):
        raise RequestError("request must be a JSON object")
    if req.get("v") != PROTOCOL:
        raise RequestError(f"protocol version {req.get('v')!r} unsupported (want {PROTOCOL})")
    op = req.get("op")
    if op not in _FIELDS:
        raise RequestError(f"unknown op {op!r}")
    allowed = _FIELDS[op]
    unknown = set(req) - set(allowed) - {"v", "op"}
    if unknown:
        raise RequestError(f"unknown fields for {op}: {sorted(unknown)}")
    out: dict[str, Any] = {"op": op}
    for name in allowed:
        value = req.get(name)
        if name == "vg":
            out[name] = check_name(value, "VG")
        elif name == "lv":
            out[name] = check_name(value)
        elif name == "lvs":
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_FENCED_VOLUMES:
                raise RequestError(f"lvs must be a list of 1..{MAX_FENCED_VOLUMES} volume names")
            out[name] = sorted({check_name(lv) for lv in value})
        elif name == "export_root":
            out[name] = check_export_root(value)
        elif name == "filesystem":
            if value not in FILESYSTEMS:
                raise RequestError(f"filesystem must be one of {', '.join(FILESYSTEMS)}, not {value!r}")
            out[name] = value
        elif name in ("fresh", "readonly"):
            out[name] = _check_bool(value, name)
        elif name == "node_id":
            out[name] = check_node_id(value)
        elif name == "addresses":
            out[name] = check_addresses(value)
        elif name == "options":
            out[name] = check_options(value)
        elif name == "token":
            if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
                raise RequestError(f"invalid token {value!r}")
            out[name] = value
        elif name == "thaw_after":
            out[name] = _check_int(value, "thaw_after", 5, 600)
        elif name == "max_bytes":
            out[name] = _check_int(value, "max_bytes", 1, MAX_BYTES_LIMIT)
    return out


# --- pure helpers: mountinfo, fstab, exports, etab ---


def _unescape_octal(text: str) -> str:
    # mountinfo/fstab escape space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


@dataclass(frozen=True)
class Mount:
    devno: int
    mountpoint: str
    fstype: str
    source: str


def parse_mountinfo(text: str) -> list[Mount]:
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = (int(x) for x in fields[2].split(":"))
            source = _unescape_octal(fields[sep + 2])
            mounts.append(Mount(os.makedev(major, minor), _unescape_octal(fields[4]), fields[sep + 1], source))
        except (ValueError, IndexError):
            continue  # a line we do not understand is not one of ours
    return mounts


def mount_at(mounts: list[Mount], path: str) -> Mount | None:
    """The mount visible at `path` (the last one: mounts stack)."""
    found = [m for m in mounts if m.mountpoint == path]
    return found[-1] if found else None


def _fstab_mountpoint(line: str) -> str | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    fields = text.split()
    return _unescape_octal(fields[1]) if len(fields) >= 2 else None


def fstab_line(device: str, mountpoint: str, fstype: str) -> str:
    return f"{device} {mountpoint} {fstype} {FSTAB_OPTIONS} 0 0"


def fstab_with(text: str, device: str, mountpoint: str, fstype: str) -> str:
    """fstab text with exactly one line for `mountpoint`; every other line kept byte for byte."""
    want = fstab_line(device, mountpoint, fstype)
    lines = text.splitlines()
    ours = [line for line in lines if _fstab_mountpoint(line) == mountpoint]
    if ours == [want]:
        return text
    kept = [line for line in lines if _fstab_mountpoint(line) != mountpoint]
    return "\n".join([*kept, want]) + "\n"


def fstab_without(text: str, mountpoint: str) -> str:
    lines = text.splitlines()
    kept = [line for line in lines if _fstab_mountpoint(line) != mountpoint]
    if len(kept) == len(lines):
        return text
    return "\n".join(kept) + "\n" if kept else ""


@dataclass
class ExportsRecord:
    """What /etc/exports.d/berth-<lv>.exports holds: the publications (node → mode, addresses) and options."""

    options: str = field(default_factory=lambda: check_options(None))  # normalised: no rw/ro
    nodes: dict[str, tuple[bool, list[str]]] = field(default_factory=dict)  # node ID → (readonly, addresses)

    def clients(self) -> dict[str, bool]:
        """address → readonly. An address shared by several nodes is read-write if any of them is."""
        out: dict[str, bool] = {}
        for readonly, addresses in self.nodes.values():
            for addr in addresses:
                out[addr] = out.get(addr, True) and readonly
        return out


def client_options(options: str, readonly: bool) -> str:
    # mp: mountd refuses the export while nothing is mounted there, so a failed mount after a reboot never
    # exports the empty directory of the root filesystem.
    return ",".join(["ro" if readonly else "rw", *[o for o in options.split(",") if o], "mp"])


def render_exports(lv: str, path: str, record: ExportsRecord) -> str | None:
    """The exports file, or None when no node is published (a line without clients would export to all)."""
    clients = record.clients()
    if not clients:
        return None
    lines = [
        f"# Berth NFS export of {lv}: written by berth nfs_host under a lock; manual edits are overwritten.",
        f"# options {record.options or '-'}",
    ]
    for node_id in sorted(record.nodes):
        readonly, addresses = record.nodes[node_id]
        lines.append(f"# node {node_id} {'ro' if readonly else 'rw'} {' '.join(addresses)}")
    entries = [f"{addr}({client_options(record.options, ro)})" for addr, ro in sorted(clients.items())]
    lines.append(f"{path} {' '.join(entries)}")
    return "\n".join(lines) + "\n"


def parse_exports(text: str) -> ExportsRecord:
    """Read back the records render_exports wrote (the export line itself is derived, not parsed)."""
    record = ExportsRecord()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[:2] == ["#", "options"]:
            with contextlib.suppress(RequestError):
                record.options = check_options(parts[2])
        elif len(parts) >= 5 and parts[:2] == ["#", "node"] and parts[3] in ("ro", "rw"):
            try:
                record.nodes[check_node_id(parts[2])] = (parts[3] == "ro", check_addresses(parts[4:]))
            except RequestError:
                continue  # a damaged line: that node is simply not exported any more
    return record


def _normalise_client(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return text


def live_clients(etab_text: str, path: str) -> set[str]:
    """Clients the kernel export table (/var/lib/nfs/etab: `path<TAB>client(options)`) has for `path`."""
    out: set[str] = set()
    for line in etab_text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and _unescape_octal(parts[0]) == path:
            out.add(_normalise_client(parts[1].partition("(")[0]))
    return out


def exported_path(exports_text: str) -> str | None:
    """The path an exports file written by render_exports exports (its one line that is not a comment)."""
    for line in exports_text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return _unescape_octal(line.split()[0])
    return None


def exports_path(exports_dir: str, lv: str) -> str:
    return os.path.join(exports_dir, f"{EXPORTS_PREFIX}{check_name(lv)}{EXPORTS_SUFFIX}")


def atomic_write(path: str, text: str, mode: int = 0o644) -> None:
    """Replace `path` in one rename (readers never see half a file), keeping an existing file's mode/owner."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.berth-tmp")
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, st.st_mode & 0o7777 if st else mode)
    if st is not None:
        with contextlib.suppress(PermissionError):
            os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


# --- commands ---


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str


def run_command(argv: list[str], timeout: float) -> Result:
    """Run argv (no shell), C locale, sbin on PATH. Bounded: on timeout kill, wait 5 s at most, give up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env.update(LANG="C", LC_ALL="C", PATH=env.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
        )
    except FileNotFoundError:
        raise HostNotReadyError(
            f"{argv[0]} is not installed on the storage host (docs/storage-host.md lists what the NFS backend needs)"
        ) from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        # A process in uninterruptible sleep (a hung umount) cannot be reaped: do not wait for it forever.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        raise CommandTimeoutError(argv, timeout) from None
    return Result(proc.returncode, out, err)


def _stat_devno(path: str) -> int | None:
    try:
        return os.stat(path).st_rdev
    except FileNotFoundError:
        return None


@dataclass
class Host:
    """Every path and side effect the operations use; tests point it at a tmp dir and fake commands."""

    fstab: str = "/etc/fstab"
    exports_dir: str = "/etc/exports.d"
    etab: str = "/var/lib/nfs/etab"
    mountinfo: str = "/proc/self/mountinfo"
    lock_dir: str = field(default_factory=lambda: os.environ.get("BERTH_NFS_LOCK_DIR", "/run/lock/berth-nfs"))
    lock_wait: float = LOCK_WAIT_SECONDS
    release_wait: float = RELEASE_WAIT_SECONDS
    proc_dir: str = "/proc"
    nfsd_clients_dir: str = "/proc/fs/nfsd/clients"
    run: Callable[[list[str], float], Result] = run_command
    devno: Callable[[str], int | None] = _stat_devno

    def check(self, argv: list[str], timeout: float = CMD_TIMEOUT, ok: tuple[int, ...] = (0,)) -> Result:
        result = self.run(argv, timeout)
        if result.rc not in ok:
            raise CommandError(argv, result.rc, result.stderr)
        return result

    def mounts(self) -> list[Mount]:
        return parse_mountinfo(_read(self.mountinfo))

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """flock on <lock_dir>/<name>.lock, waiting at most lock_wait seconds (then Busy: retry later)."""
        os.makedirs(self.lock_dir, exist_ok=True)
        with open(os.path.join(self.lock_dir, f"{name}.lock"), "a") as fh:
            deadline = time.monotonic() + self.lock_wait
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                        raise BusyError(f"another berth operation holds the {name} lock; retry later") from e
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


# --- operations ---


def _paths(host: Host, req: dict[str, Any]) -> tuple[str, str]:
    root = req["export_root"]
    mp = mountpoint_for(root, req["lv"])
    if os.path.lexists(mp):
        check_confined(mp, root)
    return root, mp


def _our_mount(host: Host, mp: str, device: str) -> Mount | None:
    """The mount at mp if it is our device; ConflictError if something else is mounted there."""
    mounted = mount_at(host.mounts(), mp)
    if mounted is None:
        return None
    if mounted.devno != host.devno(device):
        raise ConflictError(f"{mp} has {mounted.source} mounted, not {device}")
    return mounted


def probe_filesystem(host: Host, device: str) -> str | None:
    """Filesystem type on device, None when blank (blkid -p exits 2 when it finds no signature)."""
    result = host.check(["blkid", "-p", "-o", "export", device], ok=(0, 2))
    if result.rc == 2:
        return None
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    kind = values.get("TYPE") or values.get("PTTYPE")
    if not kind:
        raise ConflictError(f"{device} carries an unrecognised signature; refusing to touch it")
    return kind


def _mkfs(host: Host, device: str, fstype: str) -> None:
    if fstype == "xfs":
        # -K: no discard; a new thin LV holds no blocks, discarding would only walk its whole range.
        host.check(["mkfs.xfs", "-q", "-K", device], timeout=MKFS_TIMEOUT)
    else:
        # -m 0: a data volume needs no root reserve; metadata_csum_seed makes a clone's later UUID change
        # (tune2fs -U) instant instead of rewriting every checksum.
        argv = ["mkfs.ext4", "-q", "-m", "0", "-E", "nodiscard", "-O", "metadata_csum_seed", device]
        host.check(argv, timeout=MKFS_TIMEOUT)


def _replay_dir(root: str, lv: str) -> str:
    return f"{root}/.replay-{lv}"


def _new_uuid(host: Host, device: str, fstype: str, root: str, lv: str) -> None:
    """Give a clone (a block copy of another filesystem) its own UUID, so it mounts and exports next to its origin.

    xfs refuses to mount a second filesystem with a UUID already mounted, and nfsd derives export fsids and file
    handles from it. Redoing this after a crash is harmless: it only picks another random UUID.
    """
    if fstype == "xfs":
        # xfs_admin refuses a dirty log: replay it with one mount (nouuid: the origin may be mounted) first.
        tmp = _replay_dir(root, lv)
        os.makedirs(tmp, mode=0o700, exist_ok=True)
        host.check(["mount", "-t", "xfs", "-o", "nouuid", device, tmp])
        host.check(["umount", tmp])
        os.rmdir(tmp)
        host.check(["xfs_admin", "-U", "generate", device])
    else:
        # e2fsck replays the journal; tune2fs -U wants a freshly checked filesystem. rc 1 = errors fixed.
        host.check(["e2fsck", "-f", "-y", device], timeout=FSCK_TIMEOUT, ok=(0, 1))
        host.check(["tune2fs", "-U", "random", device])


def _persist_mount(host: Host, device: str, mp: str, fstype: str) -> bool:
    with host.lock("fstab"):  # one fstab for every volume: edits must not interleave
        text = _read(host.fstab)
        new = fstab_with(text, device, mp, fstype)
        if new != text:
            atomic_write(host.fstab, new)
            return True
    return False


def _ensure_mounted(host: Host, req: dict[str, Any], fresh: bool | None) -> tuple[str, list[str]]:
    """Mount (and, for prepare, create or re-UUID) the volume's filesystem; returns (fstype, steps done).

    fresh=None: only mount an existing filesystem (publish/grow after a storage-host reboot that lost the mount).
    """
    root, mp = _paths(host, req)
    device = device_for(req["vg"], req["lv"])
    if host.devno(device) is None:
        raise NotFoundError(f"{device} does not exist (is the LV active?)")
    done: list[str] = []
    mounted = _our_mount(host, mp, device)
    if mounted is not None:
        fstype = mounted.fstype
    else:
        leftover = _our_mount(host, _replay_dir(root, req["lv"]), device)
        if leftover is not None:  # a crash between the replay mount and its umount
            host.check(["umount", _replay_dir(root, req["lv"])])
        fstype_found = probe_filesystem(host, device)
        if fstype_found is not None and fstype_found not in FILESYSTEMS:
            raise ConflictError(f"{device} holds {fstype_found}, not one of {', '.join(FILESYSTEMS)}")
        if fresh:
            if fstype_found is None:
                _mkfs(host, device, req["filesystem"])
                done.append("mkfs")
            # Else an earlier attempt made it (a fresh thin LV reads as zeroes): never mkfs twice.
            fstype = fstype_found or req["filesystem"]
        elif fstype_found is None:
            raise ConflictError(f"{device} has no filesystem")
        else:
            fstype = fstype_found
            if fresh is False:
                _new_uuid(host, device, fstype, root, req["lv"])
                done.append("uuid")
        os.makedirs(root, mode=0o755, exist_ok=True)
        if not os.path.isdir(mp):
            os.mkdir(mp, 0o755)
        check_confined(mp, root)
        host.check(["mount", "-t", fstype, device, mp])
        done.append("mount")
    if _persist_mount(host, device, mp, fstype):
        done.append("fstab")
    return fstype, done


def op_prepare(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    with host.lock(req["lv"]):
        fstype, done = _ensure_mounted(host, req, req["fresh"])
        mp = mountpoint_for(req["export_root"], req["lv"])
        if req["fresh"]:
            # Writers are not root (squashed root, qemu 107, a pod's uid): see VOLUME_ROOT_MODE.
            os.chmod(mp, VOLUME_ROOT_MODE)
        else:
            # A clone or restore larger than its source: nobody sends an expand call for it.
            done += _grow_filesystem(host, fstype, mp, device_for(req["vg"], req["lv"]), req["max_bytes"])
    return {"mountpoint": mp, "filesystem": fstype, "done": done}


def _unexport(host: Host, addr: str, path: str) -> None:
    result = host.run(["exportfs", "-u", f"{addr}:{path}"], CMD_TIMEOUT)
    if result.rc != 0 and "could not find" not in result.stderr.lower():
        raise CommandError(["exportfs", "-u", f"{addr}:{path}"], result.rc, result.stderr)


def _apply_exports(host: Host, lv: str, mp: str, record: ExportsRecord, extra: set[str]) -> dict[str, Any]:
    """Write the exports file (or remove it), then make the kernel table match: export wanted, unexport rest.

    File first: a crash after it leaves a state that nfsd's next `exportfs -r` and a retry both converge on.
    """
    path = exports_path(host.exports_dir, lv)
    text = render_exports(lv, mp, record)
    if text is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    elif _read(path) != text:
        atomic_write(path, text)
    wanted = record.clients()
    for addr, readonly in sorted(wanted.items()):
        # exportfs -o on an existing client:path replaces its options (rw <-> ro), so this is idempotent.
        host.check(["exportfs", "-o", client_options(record.options, readonly), f"{addr}:{mp}"])
    stale = (live_clients(_read(host.etab), mp) | extra) - set(wanted)
    for addr in sorted(stale):
        _unexport(host, addr, mp)
    return {"clients": {a: ("ro" if ro else "rw") for a, ro in sorted(wanted.items())}, "unexported": sorted(stale)}


def op_publish(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    with host.lock(req["lv"]):
        _, mp = _paths(host, req)
        # Never export a directory that is not our filesystem (e.g. after a reboot whose mount failed).
        _ensure_mounted(host, req, None)
        record = parse_exports(_read(exports_path(host.exports_dir, req["lv"])))
        record.options = req["options"]
        record.nodes[req["node_id"]] = (req["readonly"], req["addresses"])
        return _apply_exports(host, req["lv"], mp, record, set())


def op_reconfigure(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    """New export options for the nodes already published (exportfs -o replaces a live client's options); a volume
    published nowhere has no exports file, and its next publish brings the options."""
    with host.lock(req["lv"]):
        _, mp = _paths(host, req)
        record = parse_exports(_read(exports_path(host.exports_dir, req["lv"])))
        if not record.nodes:
            return {"clients": {}, "unexported": []}
        record.options = req["options"]
        return _apply_exports(host, req["lv"], mp, record, set())


def op_unpublish(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    with host.lock(req["lv"]):
        _, mp = _paths(host, req)
        record = parse_exports(_read(exports_path(host.exports_dir, req["lv"])))
        record.nodes.pop(req["node_id"], None)
        # The node's addresses go even if its record was lost, unless another published node shares one.
        return _apply_exports(host, req["lv"], mp, record, set(req["addresses"]))


def op_teardown(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    with host.lock(req["lv"]):
        root, mp = _paths(host, req)
        device = device_for(req["vg"], req["lv"])
        # 1. No client may reach it any more (before the umount: nfsd holds files open while exported).
        record = parse_exports(_read(exports_path(host.exports_dir, req["lv"])))
        extra = set(record.clients())
        result = _apply_exports(host, req["lv"], mp, ExportsRecord(options=record.options), extra)
        # 2. Unmount, bounded. A still-frozen filesystem (a crashed snapshot) would block the umount: thaw it.
        done: list[str] = []
        for path in (mp, _replay_dir(root, req["lv"])):
            if _our_mount(host, path, device) is None:
                continue
            host.run(["fsfreeze", "--unfreeze", path], CMD_TIMEOUT)  # fails when not frozen: fine
            umount = _umount_once_released(host, path)
            if umount.rc != 0:
                if "busy" in umount.stderr.lower():
                    holders = "; ".join(_holders(host, path, device)) or "no process or NFS client found"
                    raise InUseError(f"{path} is still in use on the storage host ({holders}): {umount.stderr.strip()}")
                raise CommandError(["umount", path], umount.rc, umount.stderr)
            done.append(f"umount {path}")
        # 3. Forget the mount, then the directory (rmdir only: files there would be data, never deleted).
        with host.lock("fstab"):
            text = _read(host.fstab)
            new = fstab_without(text, mp)
            if new != text:
                atomic_write(host.fstab, new)
                done.append("fstab")
        warnings: list[str] = []
        for path in (mp, _replay_dir(root, req["lv"])):
            if os.path.isdir(path) and not os.path.islink(path):
                try:
                    os.rmdir(path)
                    done.append(f"rmdir {path}")
                except OSError as e:
                    warnings.append(f"left {path} in place: {e.strerror}")
    return {**result, "done": done, "warnings": warnings}


def _umount_once_released(host: Host, path: str) -> Result:
    """umount, tried again while it is busy for up to host.release_wait seconds (see RELEASE_WAIT_SECONDS).

    While busy, nfsd's export caches are flushed (`exportfs -f`) every FLUSH_INTERVAL seconds: a cache entry for the
    path holds the mount until a flush and the kernel's cache cleaner remove it (docs/nfs.md). Never more often: a
    flush within a second of the last one moves the kernel's flush time a second into the future, and flushing in a
    tight loop pushed it minutes ahead, which also postpones the cleaning."""
    deadline = time.monotonic() + host.release_wait
    flushed = float("-inf")
    while True:
        umount = host.run(["umount", path], CMD_TIMEOUT)
        if umount.rc == 0 or "busy" not in umount.stderr.lower() or time.monotonic() >= deadline:
            return umount
        if time.monotonic() - flushed >= FLUSH_INTERVAL:
            host.run(["exportfs", "-f"], CMD_TIMEOUT)
            flushed = time.monotonic()
        time.sleep(0.5)


def _holders(host: Host, path: str, device: str) -> list[str]:
    """Who keeps `path` busy, for the error message: local processes with a file, cwd, root or mapping in it,
    mounts below it, nfsd's export caches, and NFS clients with open, lock or delegation state on the volume's
    filesystem (nfsd's clients/*/states)."""
    found: list[str] = []
    below = path.rstrip("/") + "/"
    for pid in sorted((p for p in _listdir(host.proc_dir) if p.isdigit()), key=int):
        base = os.path.join(host.proc_dir, pid)
        links = [os.path.join(base, "cwd"), os.path.join(base, "root")]
        links += [os.path.join(base, "fd", fd) for fd in _listdir(os.path.join(base, "fd"))]
        mapped = [line.split(maxsplit=5)[-1] for line in _read(os.path.join(base, "maps")).splitlines()]
        if any(t == path or t.startswith(below) for t in [*map(_readlink, links), *mapped]):
            found.append(f"process {pid} ({_read(os.path.join(base, 'comm')).strip()})")
    found += [f"a mount at {m.mountpoint}" for m in host.mounts() if m.mountpoint.startswith(below)]
    for cache in ("nfsd.export", "nfsd.fh"):  # entries hold the path until they expire or a flush
        if any(path in line.split() for line in _cache_lines(host, cache)):
            found.append(f"nfsd's {cache} cache")
    devno = host.devno(device)
    if devno is None:
        return found
    superblock = f'superblock: "{os.major(devno):02x}:{os.minor(devno):02x}:'
    for client in sorted(_listdir(host.nfsd_clients_dir)):
        base = os.path.join(host.nfsd_clients_dir, client)
        states = [line for line in _read(os.path.join(base, "states")).splitlines() if superblock in line]
        if states:
            address = re.search(r'^address: "([^"]*)"', _read(os.path.join(base, "info")), re.M)
            kinds = sorted(set(re.findall(r"type: (\w+)", "\n".join(states))))
            found.append(f"NFS client {address.group(1) if address else client}: {len(states)} {'/'.join(kinds)}")
    return found


def _cache_lines(host: Host, cache: str) -> list[str]:
    """The entries of one of nfsd's caches; "# " marks one that is expired or not valid, which still holds its path
    while it stays in the cache (seen for minutes after the flush of an unexport)."""
    text = _read(os.path.join(host.proc_dir, "net", "rpc", cache, "content"))
    return [line.removeprefix("# ") for line in text.splitlines()]


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def op_grow(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    with host.lock(req["lv"]):
        fstype, _ = _ensure_mounted(host, req, None)
        mp = mountpoint_for(req["export_root"], req["lv"])
        done = _grow_filesystem(host, fstype, mp, device_for(req["vg"], req["lv"]), req["max_bytes"])
    return {"filesystem": fstype, "done": done}


@dataclass(frozen=True)
class XfsGeometry:
    block_size: int
    data_blocks: int
    ag_blocks: int


def parse_xfs_info(text: str) -> XfsGeometry:
    """Block size, data blocks and AG size from `xfs_info` (`data = bsize=4096 blocks=262144, ...`)."""
    ag = re.search(r"\bagsize=(\d+)", text)
    data = re.search(r"^data\s+=.*?\bbsize=(\d+)\s+blocks=(\d+)", text, re.MULTILINE)
    if ag is None or data is None:
        raise CommandError(["xfs_info"], 0, text[-500:], "cannot read the xfs geometry from xfs_info")
    return XfsGeometry(int(data.group(1)), int(data.group(2)), int(ag.group(1)))


def _grow_filesystem(host: Host, fstype: str, mp: str, device: str, max_bytes: int) -> list[str]:
    """Grow the filesystem to its device when it is smaller; online, NFS clients see it on their next statfs.

    Never past max_bytes (the controller's size limit): an LV that is larger anyway (made before the limit, or by
    hand) is refused, because a filesystem's memory needs grow with its size. xfs grows in bounded steps."""
    device_bytes = int(host.check(["blockdev", "--getsize64", device]).stdout.strip() or 0)
    if device_bytes > max_bytes:
        raise OutOfRangeError(
            f"{device} is {device_bytes} bytes, above this backend's limit of {max_bytes} bytes; its filesystem is "
            "not grown (shrink or remove the LV by hand)"
        )
    if fstype != "xfs":
        # resize2fs does nothing when the filesystem already fills the device; the kernel adds block groups one
        # flex group at a time.
        host.check(["resize2fs", device], timeout=MKFS_TIMEOUT)
        return ["resize2fs"]
    done: list[str] = []
    geometry = parse_xfs_info(host.check(["xfs_info", mp]).stdout)
    target = device_bytes // geometry.block_size
    while geometry.data_blocks < target:
        step = min(target, geometry.data_blocks + XFS_GROW_STEP_AGS * geometry.ag_blocks)
        host.check(["xfs_growfs", "-D", str(step), mp], timeout=MKFS_TIMEOUT)
        grown = parse_xfs_info(host.check(["xfs_info", mp]).stdout)
        if grown.data_blocks <= geometry.data_blocks:
            break  # the rest of the device is too small for an allocation group
        done.append(f"xfs_growfs {grown.data_blocks} blocks")
        geometry = grown
    return done


def safety_timer(unit: str, seconds: int, command: list[str]) -> list[str]:
    """systemd-run argv that runs `command` after `seconds` unless `<unit>.timer` is stopped first: it undoes a freeze
    or a fence that the controller may never come back to undo."""
    return [
        "systemd-run", "--quiet", "--collect", f"--unit={unit}", f"--on-active={seconds}s",
        "--timer-property=AccuracySec=1s",  # the default accuracy (1 min) would delay the undo
        *command,
    ]  # fmt: skip


def thaw_unit(lv: str, token: str) -> str:
    return f"berth-thaw-{check_name(lv)}-{token}"


def op_freeze(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    """Arm a host-side thaw timer, then freeze. The timer thaws even if the controller never comes back."""
    _, mp = _paths(host, req)
    if _our_mount(host, mp, device_for(req["vg"], req["lv"])) is None:
        raise NotFoundError(f"{mp} is not mounted")
    unit = thaw_unit(req["lv"], req["token"])
    fsfreeze = shutil.which("fsfreeze", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/usr/sbin/fsfreeze"
    host.check(safety_timer(unit, req["thaw_after"], [fsfreeze, "--unfreeze", mp]))
    result = host.run(["fsfreeze", "--freeze", mp], CMD_TIMEOUT)
    if result.rc != 0:
        if "busy" in result.stderr.lower():
            # Already frozen: a concurrent snapshot, or a crashed one whose timer is pending. Keep OUR timer
            # armed, so the filesystem is thawed whatever happened to the other freezer.
            raise BusyError(f"{mp} is already frozen (another snapshot in progress?); retry later")
        host.run(["systemctl", "stop", f"{unit}.timer"], CMD_TIMEOUT)
        raise CommandError(["fsfreeze", "--freeze", mp], result.rc, result.stderr)
    return {"unit": unit}


def op_thaw(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    _, mp = _paths(host, req)
    unit = thaw_unit(req["lv"], req["token"])
    result = host.run(["fsfreeze", "--unfreeze", mp], CMD_TIMEOUT)
    thawed = result.rc == 0
    if not thawed and "invalid argument" not in result.stderr.lower():
        # Not thawed for an unknown reason: leave the timer armed, it is the only thing left that will thaw.
        raise CommandError(["fsfreeze", "--unfreeze", mp], result.rc, result.stderr)
    host.run(["systemctl", "stop", f"{unit}.timer"], CMD_TIMEOUT)
    # thawed False: it was not frozen any more (the safety timer fired first).
    return {"thawed": thawed}


def fence_chain(token: str) -> str:
    return f"berth-fence-{token[:16]}"  # iptables chain names: at most 28 characters


def op_fence(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    """Drop NFS requests from every client of these volumes until op_unfence or the timer: requests nfsd already
    has complete, new ones wait in the clients (TCP retransmits, hard mounts). It pauses those nodes' other NFS
    volumes of this host too: a client is an address, not a volume."""
    addresses: set[str] = set()
    for lv in req["lvs"]:
        addresses |= set(parse_exports(_read(exports_path(host.exports_dir, lv))).clients())
    chain = fence_chain(req["token"])
    # First: whatever happens next, the timer lifts the fence.
    host.check(safety_timer(chain, req["thaw_after"], ["sh", "-c", UNFENCE_SCRIPT, "sh", chain]))
    for tool, version in (("iptables", 4), ("ip6tables", 6)):
        family = sorted(a for a in addresses if ipaddress.ip_network(a, strict=False).version == version)
        if family:
            host.check([tool, "-w", "-N", chain])
            for address in family:
                host.check([tool, "-w", "-A", chain, "-s", address, "-p", "tcp", "--dport", NFS_PORT, "-j", "DROP"])
            host.check([tool, "-w", "-I", "INPUT", "1", "-j", chain])
    return {"fenced": sorted(addresses)}


def op_unfence(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    """Lift the fence (idempotent: after the timer, or a second time, there is nothing left to remove)."""
    chain = fence_chain(req["token"])
    host.check(["sh", "-c", UNFENCE_SCRIPT, "sh", chain])
    host.run(["systemctl", "stop", f"{chain}.timer"], CMD_TIMEOUT)
    return {"unfenced": chain}


def op_inventory(host: Host, req: dict[str, Any]) -> dict[str, Any]:
    """What the export root holds per volume name, read-only and without locks (a snapshot for the orphan audit,
    which compares it with the LVs that exist): a directory (or a clone's replay directory), a mount, an fstab line,
    an exports file, clients in the kernel's export table."""
    root = req["export_root"]
    found: dict[str, set[str]] = {}

    def note(path: str, part: str) -> None:
        name = os.path.basename(path).removeprefix(".replay-")
        if os.path.dirname(path) == root and _NAME_RE.fullmatch(name):
            found.setdefault(name, set()).add(part)

    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False):
                note(entry.path, "directory")
    for mount in host.mounts():
        note(mount.mountpoint, "mount")
    for line in _read(host.fstab).splitlines():
        mountpoint = _fstab_mountpoint(line)
        if mountpoint:
            note(mountpoint, "fstab")
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(host.exports_dir)):
            if name.startswith(EXPORTS_PREFIX) and name.endswith(EXPORTS_SUFFIX):
                path = exported_path(_read(os.path.join(host.exports_dir, name)))
                if path and os.path.basename(path) == name[len(EXPORTS_PREFIX) : -len(EXPORTS_SUFFIX)]:
                    note(path, "exports_file")
    for line in _read(host.etab).splitlines():
        parts = line.split()
        if parts:
            note(_unescape_octal(parts[0]), "clients")
    return {"volumes": [{"lv": lv, "parts": sorted(parts)} for lv, parts in sorted(found.items())]}


OPS: dict[str, Callable[[Host, dict[str, Any]], dict[str, Any]]] = {
    "fence": op_fence,
    "unfence": op_unfence,
    "prepare": op_prepare,
    "publish": op_publish,
    "unpublish": op_unpublish,
    "reconfigure": op_reconfigure,
    "teardown": op_teardown,
    "grow": op_grow,
    "freeze": op_freeze,
    "thaw": op_thaw,
    "inventory": op_inventory,
}


def execute(host: Host, req: Any) -> dict[str, Any]:
    """Validate and run one request; always returns a response object (never raises)."""
    try:
        op = validate_request(req)
        return {"ok": True, "result": OPS[op["op"]](host, op)}
    except CommandError as e:
        error: dict[str, Any] = {"kind": e.kind, "message": str(e), "argv": e.argv, "rc": e.rc, "stderr": e.stderr}
        if isinstance(e, CommandTimeoutError):
            error["timeout"] = e.timeout
        return {"ok": False, "error": error}
    except RequestError as e:
        return {"ok": False, "error": {"kind": e.kind, "message": str(e)}}
    except Exception as e:  # OS errors: report them, the controller maps them to INTERNAL
        return {"ok": False, "error": {"kind": "internal", "message": f"{type(e).__name__}: {e}"}}


def answer(text: str, host: Host | None = None) -> dict[str, Any]:
    """The response to one request's JSON text."""
    try:
        req = json.loads(text)
    except ValueError as e:
        return {"ok": False, "error": {"kind": "invalid", "message": f"bad JSON: {e}"}}
    return execute(host or Host(), req)


def main(stdin: Any = None, stdout: Any = None, host: Host | None = None) -> int:
    """One request: the whole of stdin."""
    stdout = stdout or sys.stdout
    stdout.write(json.dumps(answer((stdin or sys.stdin).read(), host), sort_keys=True) + "\n")
    stdout.flush()
    return 0


def serve(stdin: Any = None, stdout: Any = None, host: Host | None = None) -> int:
    """Resident mode (`--serve`, csi_driver/storage/resident.py): one request per line until stdin ends, each
    answered like main() does, with the same locks taken per request. (The same loop as lio_host.serve: each
    host program must stay self-contained.)"""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    for line in iter(stdin.readline, ""):
        if line.strip():
            stdout.write(json.dumps(answer(line, host), sort_keys=True) + "\n")
            stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
