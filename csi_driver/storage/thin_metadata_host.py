"""Allocated and changed blocks of thin LVs, read from dm-thin's own metadata; runs ON the storage host.

The controller sends this file's source as `python3 -c <source>` and one request as JSON on stdin; the program
prints one JSON line. It must stay self-contained (python3's standard library only, no import from csi_driver): only
this file's text reaches the host. Tools: dmsetup (lvm2) and thin_delta / thin_dump (thin-provisioning-tools).

The metadata of a live pool can only be read through a metadata snapshot, and a pool holds at most one. So, under a
host lock per pool that is waited for within the request's budget:

    dmsetup message <vg>-<pool>-tpool 0 reserve_metadata_snap
    thin_delta -m --snap1 <base> --snap2 <target> /dev/mapper/<vg>-<pool>_tmeta     (op "delta")
    thin_dump -m --dev-id <thin id> /dev/mapper/<vg>-<pool>_tmeta                    (op "allocated")
    dmsetup message <vg>-<pool>-tpool 0 release_metadata_snap                        (always: in a finally)

The tool's XML is parsed as it arrives (the formats are pinned in docs/snapshot-metadata.md) into ranges of pool
chunks, adjacent ones merged, from start_byte's chunk on; at most max_ranges of them per answer, so an answer stays a
few megabytes whatever the volume's size. next_chunk says where the next page starts (null: there is none).

Request:  {"v": 1, "op": "allocated"|"delta", "vg": "berth", "pool": "pool", "thin_ids": [7] | [base, target],
           "start_byte": 0, "max_ranges": 200000, "budget_seconds": 270}
Response: {"ok": true, "result": {"chunk_bytes": 65536, "ranges": [begin, length, ...], "next_chunk": null,
                                  "warnings": []}}
          {"ok": false, "error": {"kind": "invalid|not_found|busy|host_not_ready|failed|timeout|internal",
                                  "message": "...", ["argv": [...], "rc": n, "stderr": "...", "timeout": s]}}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import xml.parsers.expat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

PROTOCOL = 1
OPS = {"allocated": ("thin_dump", 1), "delta": ("thin_delta", 2)}  # op -> (tool, number of thin ids)
# Locks and the marker of a held metadata snapshot. Not under /run: a metadata snapshot survives a reboot, so must
# the marker that tells the next request it was Berth's.
STATE_DIR = os.environ.get("BERTH_THIN_METADATA_DIR", "/var/lib/berth/thin-metadata")
MAPPER_DIR = "/dev/mapper"
MAX_THIN_ID = (1 << 24) - 1  # dm-thin device ids have 24 bits
MAX_RANGES = 1_000_000
MAX_BUDGET_SECONDS = 3600.0
MAX_START_BYTE = (1 << 63) - 1
LOCK_POLL_SECONDS = 0.1
# dmsetup messages are quick; the release runs whatever is left of the budget (it must never be skipped).
DMSETUP_TIMEOUT = 30.0
READ_BYTES = 1 << 16
SECTOR_BYTES = 512
CHANGED = frozenset({"different", "left_only", "right_only"})  # thin_delta's kinds of a changed range ("same" is not)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_.-]{0,126}")  # LVM's VG/LV characters, as the controller checks them


class RequestError(Exception):
    kind = "invalid"


class NotFoundError(RequestError):
    kind = "not_found"


class BusyError(RequestError):
    kind = "busy"


class HostNotReadyError(RequestError):
    kind = "host_not_ready"


class OutputError(RequestError):
    """A tool printed something this program does not understand."""

    kind = "internal"


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
        super().__init__(argv, -1, "", f"{argv[0]} did not finish within the request's {timeout:g} s")


# --- validation (pure) ---


def _check_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{what} must be an integer in [{low}, {high}], not {value!r}")
    return value


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise RequestError(f"invalid {what} name {value!r}")
    return value


def validate_request(req: Any) -> dict[str, Any]:
    """The request with every field checked, or RequestError."""
    if not isinstance(req, dict) or req.get("v") != PROTOCOL:
        raise RequestError(f"unsupported request (this program speaks version {PROTOCOL})")
    unknown = set(req) - {"v", "op", "vg", "pool", "thin_ids", "start_byte", "max_ranges", "budget_seconds"}
    if unknown:
        raise RequestError(f"unknown request fields {sorted(unknown)}")
    if req.get("op") not in OPS:
        raise RequestError(f"op must be one of {sorted(OPS)}, not {req.get('op')!r}")
    thin_ids = req.get("thin_ids")
    wanted = OPS[req["op"]][1]
    if not isinstance(thin_ids, list) or len(thin_ids) != wanted:
        raise RequestError(f"{req['op']} takes {wanted} thin id(s), not {thin_ids!r}")
    budget = req.get("budget_seconds")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= MAX_BUDGET_SECONDS:
        raise RequestError(f"budget_seconds must be a number in (0, {MAX_BUDGET_SECONDS:g}]")
    return {
        "op": req["op"],
        "vg": check_name(req.get("vg"), "volume group"),
        "pool": check_name(req.get("pool"), "thin pool"),
        "thin_ids": [_check_int(i, "a thin id", 0, MAX_THIN_ID) for i in thin_ids],
        "start_byte": _check_int(req.get("start_byte"), "start_byte", 0, MAX_START_BYTE),
        "max_ranges": _check_int(req.get("max_ranges"), "max_ranges", 1, MAX_RANGES),
        "budget_seconds": float(budget),
    }


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives <vg>/<lv>: each '-' inside a name is doubled, then '-' joins them."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


# --- the tools' XML (pure) ---


class RangeCollector:
    """Chunk ranges in ascending order with adjacent ones merged, from chunk `start` on (a range reaching back
    before it is cut there), at most `limit` of them. Once that many are held, the next range that does not touch
    the last one is where the next page starts: `next_chunk`, and `full` says nothing more is taken."""

    def __init__(self, limit: int):
        self.limit = limit
        self.start = 0
        self.ranges: list[list[int]] = []  # [begin, end) pairs
        self.next_chunk: int | None = None

    @property
    def full(self) -> bool:
        return self.next_chunk is not None

    def add(self, begin: int, length: int) -> None:
        end = begin + length
        if self.full or length <= 0 or end <= self.start:
            return
        begin = max(begin, self.start)
        if self.ranges and begin < self.ranges[-1][1]:
            raise ValueError(f"range at chunk {begin} comes after one ending at chunk {self.ranges[-1][1]}")
        if self.ranges and begin == self.ranges[-1][1]:
            self.ranges[-1][1] = end
        elif len(self.ranges) == self.limit:
            self.next_chunk = begin
        else:
            self.ranges.append([begin, end])

    def flat(self) -> list[int]:
        return [n for begin, end in self.ranges for n in (begin, end - begin)]


class ToolOutput:
    """Feeds thin_delta's or thin_dump's XML, as it arrives, into a RangeCollector (see the module docstring)."""

    def __init__(self, op: str, thin_id: int, start_byte: int, collector: RangeCollector):
        self.op = op
        self.thin_id = thin_id  # thin_dump: the device whose mappings count
        self.start_byte = start_byte
        self.collector = collector
        self.chunk_bytes: int | None = None
        self.device_seen = False
        self._in_device = False
        self._parser = xml.parsers.expat.ParserCreate()
        self._parser.StartElementHandler = self._element
        self._parser.EndElementHandler = self._end

    def feed(self, data: bytes, final: bool = False) -> bool:
        """Parse more output; False once the page is full (the rest need not be read)."""
        try:
            self._parser.Parse(data, final)
        except (xml.parsers.expat.ExpatError, KeyError, ValueError) as e:
            raise ValueError(f"{type(e).__name__}: {e}") from None
        return not self.collector.full

    def _element(self, name: str, attrs: dict[str, str]) -> None:
        if name == "superblock":
            self.chunk_bytes = int(attrs["data_block_size"]) * SECTOR_BYTES
            if self.chunk_bytes <= 0:
                raise ValueError(f"data_block_size {attrs['data_block_size']!r}")
            self.collector.start = self.start_byte // self.chunk_bytes
            return
        if self.op == "delta":
            if name in CHANGED:
                self._add(int(attrs["begin"]), int(attrs["length"]))
        elif name == "device":
            self._in_device = int(attrs["dev_id"]) == self.thin_id
            self.device_seen = self.device_seen or self._in_device
        elif name == "range_mapping" and self._in_device:
            self._add(int(attrs["origin_begin"]), int(attrs["length"]))
        elif name == "single_mapping" and self._in_device:
            self._add(int(attrs["origin_block"]), 1)

    def _end(self, name: str) -> None:
        if name == "device":
            self._in_device = False

    def _add(self, begin: int, length: int) -> None:
        if self.chunk_bytes is None:
            raise ValueError("a range came before the superblock")
        self.collector.add(begin, length)


# --- the host ---


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env.update(LANG="C", LC_ALL="C", PATH=env.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")
    return env


def run_command(argv: list[str], timeout: float) -> Result:
    """Run argv (no shell), C locale, sbin on PATH; killed after `timeout`. (nfs_host.py has its own: each host
    program must stay self-contained.)"""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_env(),
                              timeout=timeout, check=False)  # fmt: skip
    except FileNotFoundError:
        return Result(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        raise CommandTimeoutError(argv, timeout) from None
    return Result(proc.returncode, proc.stdout, proc.stderr)


def stream_command(argv: list[str], deadline: float, clock: Callable[[], float], feed: Callable[[bytes], bool]) -> None:
    """Run argv and hand its output to `feed` as it arrives, until feed returns False (it has read enough: the
    program is killed) or the output ends. CommandError when the program failed, CommandTimeoutError at `deadline`."""
    budget = round(deadline - clock(), 1)
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty stderr cannot block the program
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                              env=_env()) as proc:  # fmt: skip
            assert proc.stdout is not None
            read_all = False
            try:
                while True:
                    remaining = deadline - clock()
                    if remaining <= 0:
                        raise CommandTimeoutError(argv, budget)
                    ready, _, _ = select.select([proc.stdout], [], [], remaining)
                    if not ready:
                        continue
                    data = os.read(proc.stdout.fileno(), READ_BYTES)
                    if not data:
                        read_all = True
                        break
                    if not feed(data):
                        break
            finally:
                if not read_all:  # enough was read, or something failed: the rest is not needed
                    proc.kill()
            rc = proc.wait()
        if read_all and rc != 0:
            stderr.seek(0)
            raise CommandError(argv, rc, stderr.read().decode("utf-8", "replace"))


@dataclass
class Host:
    """Every path and side effect the program uses; tests point it at a tmp dir and put fake tools on PATH."""

    state_dir: str = STATE_DIR
    mapper_dir: str = MAPPER_DIR
    clock: Callable[[], float] = time.monotonic
    run: Callable[[list[str], float], Result] = run_command

    @contextlib.contextmanager
    def pool_lock(self, pool: str, deadline: float) -> Iterator[None]:
        """flock on <state_dir>/<pool>.lock, waited for until `deadline` (then BusyError: retry later)."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        with open(os.path.join(self.state_dir, f"{pool}.lock"), "a") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self.clock() >= deadline:
                        raise BusyError(
                            "another snapshot metadata read of this thin pool held it for this request's whole time "
                            "budget (a pool has one metadata snapshot at a time); retry later"
                        ) from None
                    time.sleep(LOCK_POLL_SECONDS)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def message(self, tpool: str, text: str) -> Result:
        return self.run(["dmsetup", "message", tpool, "0", text], DMSETUP_TIMEOUT)

    @contextlib.contextmanager
    def metadata_snapshot(self, tpool: str, pool_label: str) -> Iterator[list[str]]:
        """Reserve the pool's metadata snapshot, and release it whatever happens; yields the warnings to report.

        Held under the pool lock. A marker file is written before the reserve and removed after the release, so a
        snapshot left by a request that died in between (killed, power cut) is known to be Berth's and released by
        the next request; one without a marker belongs to someone else and is left alone."""
        held = os.path.join(self.state_dir, f"{tpool}.held")
        warnings: list[str] = []
        if os.path.exists(held):
            released = self.message(tpool, "release_metadata_snap")
            if released.rc != 0 and "invalid argument" not in released.stderr.lower():  # EINVAL: none was held
                raise CommandError(["dmsetup", "message", tpool, "0", "release_metadata_snap"], released.rc,
                                   released.stderr)  # fmt: skip
            warnings.append(f"released the metadata snapshot of thin pool {pool_label} that an interrupted request "
                            "had left")  # fmt: skip
            os.unlink(held)
        with open(held, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        reserved = self.message(tpool, "reserve_metadata_snap")
        if reserved.rc != 0:
            os.unlink(held)
            stderr = reserved.stderr.lower()
            if "no such device" in stderr or "not found" in stderr:
                raise HostNotReadyError(
                    f"thin pool {pool_label} is not active on the storage host (no device-mapper device {tpool}): "
                    f"activate it, e.g. lvchange --activate y {pool_label}"
                )
            if "busy" in stderr:  # EBUSY: a metadata snapshot exists, and it is not ours
                raise HostNotReadyError(
                    f"thin pool {pool_label} already holds a metadata snapshot that Berth did not take (another tool "
                    f"uses it, or it survived a reboot); if nothing uses it, release it: dmsetup message {tpool} 0 "
                    "release_metadata_snap"
                )
            raise CommandError(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"], reserved.rc,
                               reserved.stderr)  # fmt: skip
        try:
            yield warnings
        finally:
            released = self.message(tpool, "release_metadata_snap")
            if released.rc == 0:
                os.unlink(held)
            else:
                warnings.append(f"the metadata snapshot of thin pool {pool_label} could not be released "
                                f"({released.stderr.strip()[-300:]}); the next request releases it")  # fmt: skip


def tool_argv(op: str, thin_ids: list[int], tmeta: str) -> list[str]:
    if op == "delta":
        return ["thin_delta", "-m", "--snap1", str(thin_ids[0]), "--snap2", str(thin_ids[1]), tmeta]
    return ["thin_dump", "-m", "--dev-id", str(thin_ids[0]), tmeta]


def read_ranges(host: Host, req: dict[str, Any], deadline: float) -> dict[str, Any]:
    """One page of the request's ranges (see the module docstring)."""
    vg, pool, op = req["vg"], req["pool"], req["op"]
    label = f"{vg}/{pool}"
    tpool = dm_name(vg, pool) + "-tpool"
    tmeta = os.path.join(host.mapper_dir, dm_name(vg, f"{pool}_tmeta"))
    argv = tool_argv(op, req["thin_ids"], tmeta)
    for program in ("dmsetup", argv[0]):
        if shutil.which(program, path=_env()["PATH"]) is None:
            package = "dmsetup" if program == "dmsetup" else "thin-provisioning-tools"
            raise HostNotReadyError(f"{program} is not installed on the storage host (apt-get install {package})")
    collector = RangeCollector(req["max_ranges"])
    output = ToolOutput(op, req["thin_ids"][0], req["start_byte"], collector)
    with host.pool_lock(dm_name(vg, pool), deadline):
        if host.clock() >= deadline:
            raise BusyError("the request's time budget ran out waiting for the thin pool; retry later")
        with host.metadata_snapshot(tpool, label) as warnings:
            try:
                stream_command(argv, deadline, host.clock, output.feed)
                if not collector.full:
                    output.feed(b"", final=True)
            except ValueError as e:
                raise OutputError(f"cannot read the output of {' '.join(argv)}: {e}") from None
            except CommandError as e:
                if "unable to find mapping tree" in e.stderr.lower():
                    missing = e.stderr.strip().splitlines()[0]
                    raise NotFoundError(f"{missing}: a thin device is not in pool {label}'s metadata (was a snapshot "
                                        "deleted meanwhile?)") from None  # fmt: skip
                raise
    if op == "allocated" and not output.device_seen:
        raise NotFoundError(f"thin device {req['thin_ids'][0]} is not in pool {label}'s metadata (was its snapshot "
                            "deleted meanwhile?)")  # fmt: skip
    return {"chunk_bytes": output.chunk_bytes, "ranges": collector.flat(), "next_chunk": collector.next_chunk,
            "warnings": warnings}  # fmt: skip


def execute(host: Host, req: Any, started: float) -> dict[str, Any]:
    """Validate and run one request; always returns a response object (never raises). Its budget counts from
    `started`."""
    try:
        checked = validate_request(req)
        return {"ok": True, "result": read_ranges(host, checked, started + checked["budget_seconds"])}
    except CommandError as e:
        error: dict[str, Any] = {"kind": e.kind, "message": str(e), "argv": e.argv, "rc": e.rc, "stderr": e.stderr}
        if isinstance(e, CommandTimeoutError):
            error["timeout"] = e.timeout
        return {"ok": False, "error": error}
    except RequestError as e:
        return {"ok": False, "error": {"kind": e.kind, "message": str(e)}}
    except Exception as e:  # OS errors: report them, the controller maps them to INTERNAL
        return {"ok": False, "error": {"kind": "internal", "message": f"{type(e).__name__}: {e}"}}


def main(stdin: Any = None, stdout: Any = None, host: Host | None = None) -> int:
    """One request: the whole of stdin; its budget counts from the program's start."""
    host = host or Host()
    started = host.clock()
    stdout = stdout or sys.stdout
    text = (stdin or sys.stdin).read()
    try:
        req = json.loads(text)
    except ValueError as e:
        response: dict[str, Any] = {"ok": False, "error": {"kind": "invalid", "message": f"bad JSON: {e}"}}
    else:
        response = execute(host, req, started)
    stdout.write(json.dumps(response, sort_keys=True) + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
