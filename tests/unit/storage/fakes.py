"""A CommandRunner double (records every argv, answers from canned responses), and fake storage-host tools."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver.storage import berth_host
from csi_driver.storage.berth_host import Refused
from csi_driver.storage.errors import CommandFailed
from csi_driver.storage.host_access import program_digests
from csi_driver.storage.runner import CommandResult, remote_command


def decide(command: str) -> list[str]:
    """berth_host.decide with the digests `berth host-command` writes into the installed copy."""
    saved = berth_host.PROGRAM_DIGESTS
    berth_host.PROGRAM_DIGESTS = frozenset(program_digests())
    try:
        return berth_host.decide(command)
    finally:
        berth_host.PROGRAM_DIGESTS = saved


@dataclass
class Call:
    argv: list[str]
    input: bytes | None
    timeout: float
    check: bool


Responder = Callable[[list[str], bytes | None], tuple[int, str, str]]


@dataclass
class FakeRunner:
    """Rules are (argv prefix, responder); the LAST matching rule answers (later rules override)."""

    rules: list[tuple[tuple[str, ...], Responder]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    def on(self, *prefix: str, stdout: str = "", rc: int = 0, stderr: str = "") -> FakeRunner:
        self.rules.append((prefix, lambda argv, inp: (rc, stdout, stderr)))
        return self

    def on_call(self, *prefix: str, responder: Responder) -> FakeRunner:
        self.rules.append((prefix, responder))
        return self

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60, check: bool = True
    ) -> CommandResult:
        args = list(argv)
        assert all(isinstance(a, str) for a in args), args
        self.check_restricted(args)
        self.calls.append(Call(args, input, timeout, check))
        for prefix, responder in reversed(self.rules):
            if tuple(args[: len(prefix)]) == prefix:
                rc, out, err = responder(args, input)
                break
        else:
            raise AssertionError(f"unexpected command {args}")
        if check and rc != 0:
            raise CommandFailed(args, rc, err, out)
        return CommandResult(rc, out.encode(), err.encode())

    def check_restricted(self, args: list[str]) -> None:
        """Every command the storage layer sends must pass the restricted host's forced command (berth_host.py,
        with this release's digests), as ssh delivers it: a new LVM option must be added there too."""
        try:
            decide(remote_command(args))
        except Refused as err:
            raise AssertionError(f"berth-host would refuse {args[:3]}: {err}") from None

    def close(self) -> None:
        pass

    def argvs(self, program: str | None = None) -> list[list[str]]:
        return [c.argv for c in self.calls if program is None or c.argv[0] == program]


def lv_row(
    name: str,
    size: int = 1073741824,
    tags: Sequence[str] = (),
    attr: str = "Vwi-a-tz--",
    origin: str = "",
    pool: str = "pool",
    vg: str = "berth",
    data_percent: str = "0.00",
    thin_id: str = "",
) -> dict[str, str]:
    """One row as `lvs --reportformat json --units b --nosuffix` prints it (all values strings)."""
    return {
        "lv_name": name,
        "vg_name": vg,
        "lv_uuid": "Xk3c2M-1bQz-Hc5P-Vb6Q-n3Jx-8AqT-2fPZ1e",
        "lv_size": str(size),
        "lv_attr": attr,
        "lv_tags": ",".join(tags),
        "origin": origin,
        "pool_lv": pool,
        "lv_time": "2025-11-26 06:50:01 +0000",
        "data_percent": data_percent,
        "metadata_percent": "",
        "thin_id": thin_id,
    }


def lvs_json(*rows: dict[str, str]) -> str:
    # Same shape (and indentation style) as lvm2 2.03.16's JSON report.
    return json.dumps({"report": [{"lv": list(rows)}]}, indent=6)


def vgs_json(extent: int = 4194304, name: str = "berth") -> str:
    row = {"vg_name": name, "vg_extent_size": str(extent), "vg_size": "21470642176", "vg_free": "0"}
    return json.dumps({"report": [{"vg": [row]}]}, indent=6)


# thin_delta 0.9.0 (simple emitter) for --snap1 7 --snap2 9: runs of one kind merged, "same" runs included.
THIN_DELTA_XML = """<superblock uuid="" time="3" transaction="7" data_block_size="128" nr_data_blocks="3264">
  <diff left="7" right="9">
    <same begin="0" length="1"/>
    <different begin="1" length="1"/>
    <same begin="2" length="8"/>
    <left_only begin="10" length="2"/>
    <right_only begin="12" length="3"/>
    <same begin="15" length="5"/>
    <different begin="30" length="1"/>
    <right_only begin="40" length="2"/>
  </diff>
</superblock>
"""
# thin_dump 0.9.0 for -m --dev-id 9, with a device of another id around it (what --dev-id leaves out; counted never).
THIN_DUMP_XML = """\
<superblock uuid="" time="3" transaction="7" flags="0" version="2" data_block_size="128" nr_data_blocks="3264">
  <device dev_id="7" mapped_blocks="1" transaction="5" creation_time="1" snap_time="3">
    <single_mapping origin_block="5" data_block="90" time="1"/>
  </device>
  <device dev_id="9" mapped_blocks="9" transaction="5" creation_time="1" snap_time="3">
    <range_mapping origin_begin="0" data_begin="10" length="3" time="1"/>
    <single_mapping origin_block="3" data_block="40" time="2"/>
    <range_mapping origin_begin="8" data_begin="20" length="4" time="1"/>
    <single_mapping origin_block="16" data_block="7" time="0"/>
  </device>
</superblock>
"""
# What the host program makes of them, in chunks (begin, length, ...).
DELTA_CHUNKS = [1, 1, 10, 5, 30, 1, 40, 2]  # left_only 10-11 and right_only 12-14 touch: one range
DUMP_CHUNKS = [0, 4, 8, 4, 16, 1]

# The storage host's tools for thin_metadata_host.py, as small shell programs whose state lives in files of
# $FAKE_DIR: `held` is the pool's metadata snapshot; `output.xml` is what thin_delta/thin_dump print, `stderr`
# makes them fail with it (`fail-run-<n>`: only their n-th run), `hang` keeps them running; `no-pool` makes the
# pool inactive; `lvs.json` is what lvs prints.
FAKE_DMSETUP = """#!/bin/sh
echo "$*" >> "$FAKE_DIR/dmsetup.log"
fail() { echo "device-mapper: message ioctl on $2  failed: $1" >&2; exit 1; }
case "$4" in
reserve_metadata_snap)
    if [ -e "$FAKE_DIR/no-pool" ]; then fail "No such device or address" "$2"; fi
    if [ -e "$FAKE_DIR/held" ]; then fail "Device or resource busy" "$2"; fi
    touch "$FAKE_DIR/held";;
release_metadata_snap)
    if [ ! -e "$FAKE_DIR/held" ]; then fail "Invalid argument" "$2"; fi
    rm "$FAKE_DIR/held";;
esac
"""
# Like the real ones with -m, they read nothing without a held metadata snapshot: a run outside reserve/release fails.
FAKE_THIN_TOOL = """#!/bin/sh
echo "$0 $*" >> "$FAKE_DIR/tool.log"
run=$(( $(cat "$FAKE_DIR/runs" 2>/dev/null || echo 0) + 1 )); echo $run > "$FAKE_DIR/runs"
if [ ! -e "$FAKE_DIR/held" ]; then echo "no current metadata snap" >&2; exit 1; fi
cat "$FAKE_DIR/output.xml"
for failure in "$FAKE_DIR/stderr" "$FAKE_DIR/fail-run-$run"; do
    if [ -e "$failure" ]; then cat "$failure" >&2; exit 1; fi
done
if [ -e "$FAKE_DIR/hang" ]; then exec sleep 60; fi
"""
FAKE_LVS = """#!/bin/sh
cat "$FAKE_DIR/lvs.json"
"""


class FakeThinTools:
    """dmsetup, thin_delta, thin_dump and lvs on a PATH of their own (see FAKE_DMSETUP), for the host program run for
    real; `env()` is what its environment needs."""

    def __init__(self, tmp: Path):
        self.dir = tmp / "fake"
        self.bin = tmp / "bin"
        for path in (self.dir, self.bin):
            path.mkdir()
        tools = {"dmsetup": FAKE_DMSETUP, "thin_delta": FAKE_THIN_TOOL, "thin_dump": FAKE_THIN_TOOL, "lvs": FAKE_LVS}
        for name, script in tools.items():
            (self.bin / name).write_text(script)
            (self.bin / name).chmod(0o755)

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE_DIR": str(self.dir)}

    def output(self, xml: str) -> None:
        (self.dir / "output.xml").write_text(xml)

    def flag(self, name: str, text: str = "") -> None:
        (self.dir / name).write_text(text)

    def dmsetup_calls(self) -> list[str]:
        log = self.dir / "dmsetup.log"
        return [line.split()[3] for line in log.read_text().splitlines()] if log.exists() else []

    @property
    def held(self) -> bool:
        return (self.dir / "held").exists()
