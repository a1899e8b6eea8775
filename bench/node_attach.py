#!/usr/bin/env python3
"""Benchmark (issue #14, node attach path): Berth's NodeStage and NodeUnstage of an iSCSI raw block volume with two
portals and multipath, against the bare initiator commands doing the same on the same guest.

Berth runs in node1 of a small lab (storage + node1) as the lab tests run it (`sanity.runner.start_berth`, all-in-one).
One volume is created and published to node1 once; then each round:

- **Berth**: NodeStageVolume, then NodeUnstageVolume, through csicall on node1. The time is Berth's own
  `duration_ms` (its log line for the call), so csicall and ssh are not counted. The commands os-brick ran inside
  the call (oslo's `CMD "..." returned: N in Xs` debug lines of that request_id) give the breakdown: command time
  per program, and the rest (Python, os-brick's waits and sleeps, Berth's own checks).
- **Bare**: one shell script on node1, timed inside the guest: what an operator types for the same attach.
  Stage: a node record per portal (`iscsiadm -m node -o new`), login on both portals, then wait for multipathd's
  map with both paths (`/dev/disk/by-id/dm-uuid-mpath-3<wwn>` with two slaves in sysfs, polled every 0.1 s).
  Unstage: `udevadm settle`, `multipath -f` of the map (again every second while it is "in use", as Berth does),
  logout of both portals, node records deleted.

It prints medians of --rounds and their ratios, and writes JSON to artifacts/bench/node_attach.json. Not a test:
nothing is asserted.

    .venv/bin/python bench/node_attach.py             # starts its own small lab (storage + node1), ~10 min
    .venv/bin/python bench/node_attach.py --attach    # uses the lab of `python -m lab up` (nobody else on it)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab import config as lab_config  # noqa: E402
from lab.topology import Lab  # noqa: E402
from sanity.runner import csicall, start_berth, stop_berth  # noqa: E402

DEFAULT_OUT = REPO / "artifacts" / "bench" / "node_attach.json"
NODE = "node1"
STAGING = "/var/lib/berth-bench/staging"
BLOCK_RWX = {"block": {}, "access_mode": {"mode": "MULTI_NODE_MULTI_WRITER"}}
# oslo.concurrency's processutils line for each command os-brick ran.
COMMAND_DONE = re.compile(r'CMD "(?P<cmd>[^"]*)" returned: -?\d+ in (?P<seconds>[\d.]+)s')

BARE_STAGE = r"""
set -eu
t0=$(date +%s%N)
for p in $PORTALS; do iscsiadm -m node -T "$IQN" -p "$p" -o new >/dev/null; done
for p in $PORTALS; do iscsiadm -m node -T "$IQN" -p "$p" --login >/dev/null; done
t1=$(date +%s%N)
MAP=/dev/disk/by-id/dm-uuid-mpath-3$WWN
until [ -e "$MAP" ] && [ "$(ls "/sys/block/$(basename "$(readlink -f "$MAP")")/slaves" | wc -l)" = 2 ]; do
  sleep 0.1
done
t2=$(date +%s%N)
echo "$t0 $t1 $t2"
"""

BARE_UNSTAGE = r"""
set -eu
t0=$(date +%s%N)
NAME=$(cat "/sys/block/$(basename "$(readlink -f "/dev/disk/by-id/dm-uuid-mpath-3$WWN")")/dm/name")
udevadm settle --timeout=10
for try in $(seq 15); do multipath -f "$NAME" 2>/dev/null && break; sleep 1; done
t1=$(date +%s%N)
for p in $PORTALS; do iscsiadm -m node -T "$IQN" -p "$p" --logout >/dev/null; done
for p in $PORTALS; do iscsiadm -m node -T "$IQN" -p "$p" -o delete >/dev/null; done
t2=$(date +%s%N)
echo "$t0 $t1 $t2"
"""


@contextmanager
def small_lab(attach: bool) -> Iterator[Lab]:
    if attach:
        lab = Lab.attach()
    else:
        lab = Lab(lab_config.LAB_DIR / "run" / f"bench-{os.getpid()}", nodes=1, owner_bound=True)
        print(f"[bench] lab up: {lab.up()}", flush=True)
    try:
        yield lab
    finally:
        if not attach:
            lab.down()


@contextmanager
def published_volume(lab: Lab, name: str, size_bytes: int) -> Iterator[tuple[dict, str, dict]]:
    """Berth started all-in-one in node1 and a raw block volume of lab-iscsi published to node1: (the volume, node1's
    node id, the publish context). Afterwards the volume is unstaged (if it was), unpublished and deleted, and Berth
    stopped."""
    start_berth(lab, NODE, mode="all")
    node_id = must(lab, "Node.NodeGetInfo", {})["node_id"]
    volume = must(lab, "Controller.CreateVolume", {
        "name": name, "capacity_range": {"required_bytes": str(size_bytes)},
        "volume_capabilities": [BLOCK_RWX], "parameters": {"backend": "lab-iscsi"},
    })["volume"]  # fmt: skip
    volume_id = volume["volume_id"]
    try:
        context = must(lab, "Controller.ControllerPublishVolume", {
            "volume_id": volume_id, "node_id": node_id, "volume_capability": BLOCK_RWX,
        }).get("publish_context", {})  # fmt: skip
        lab.run(NODE, f"mkdir -p {STAGING}")
        yield volume, node_id, context
    finally:
        csicall(lab, NODE, "Node.NodeUnstageVolume", {"volume_id": volume_id, "staging_target_path": STAGING})
        csicall(lab, NODE, "Controller.ControllerUnpublishVolume", {"volume_id": volume_id, "node_id": node_id})
        csicall(lab, NODE, "Controller.DeleteVolume", {"volume_id": volume_id})
        stop_berth(lab, NODE)


def must(lab: Lab, rpc: str, request: dict) -> dict:
    ok, body = csicall(lab, NODE, rpc, request)
    if not ok:
        raise RuntimeError(f"{rpc}: {body}")
    return body


def berth_log(lab: Lab) -> list[dict]:
    out = lab.run(NODE, "journalctl -u berth -o cat --no-pager").stdout
    lines = []
    for line in out.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def logged_call(lab: Lab, rpc: str, request: dict) -> tuple[dict, dict, list[dict]]:
    """(the answer, Berth's log line for the call, every log line written during it)."""
    before = len(berth_log(lab))
    answer = must(lab, rpc, request)
    entries = berth_log(lab)[before:]
    done = [e for e in entries if e.get("msg") == "rpc" and e.get("method", "").endswith("/" + rpc.split(".")[1])]
    if not done:
        raise RuntimeError(f"no log line for {rpc}")
    return answer, done[-1], entries


def berth_call(lab: Lab, rpc: str, request: dict) -> tuple[float, dict[str, float]]:
    """(Berth's duration_ms of the call, seconds per program of the commands os-brick ran in it)."""
    _, line, entries = logged_call(lab, rpc, request)
    programs: dict[str, float] = collections.defaultdict(float)
    for e in entries:
        match = COMMAND_DONE.search(str(e.get("msg", "")))
        if match and e.get("request_id") == line.get("request_id"):
            argv = shlex.split(match["cmd"])
            programs[Path(argv[0]).name if argv else "?"] += float(match["seconds"])
    return float(line["duration_ms"]), dict(programs)


def bare(lab: Lab, script: str, steps: tuple[str, str], env: dict[str, str]) -> dict[str, float]:
    """Run a bare script on the node; it prints three nanosecond stamps around its two steps."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    out = lab.run(NODE, f"{exports} bash -c {shlex.quote(script)}").stdout.strip().splitlines()[-1]
    t0, t1, t2 = (int(t) for t in out.split())
    return {steps[0]: (t1 - t0) / 1e6, steps[1]: (t2 - t1) / 1e6, "total": (t2 - t0) / 1e6}


def median(samples: Sequence[float]) -> float:
    return round(statistics.median(samples), 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--attach", action="store_true", help="use the lab of `python -m lab up`")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    berth: dict[str, list[float]] = collections.defaultdict(list)
    berth_programs: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    bare_ms: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    with small_lab(args.attach) as lab, published_volume(lab, f"bench-attach-{os.getpid()}", 64 << 20) as published:
        volume, _, context = published
        volume_id = volume["volume_id"]
        env = {
            "IQN": context["targetIqn"],
            "PORTALS": " ".join(p.strip() for p in context["targetPortals"].split(",")),
            "WWN": volume.get("volume_context", {}).get("wwn", "").removeprefix("naa."),
        }
        stage = {"volume_id": volume_id, "staging_target_path": STAGING, "volume_capability": BLOCK_RWX,
                 "publish_context": context, "volume_context": volume.get("volume_context", {})}  # fmt: skip
        unstage = {"volume_id": volume_id, "staging_target_path": STAGING}
        for i in range(args.rounds):
            for rpc, request in (("Node.NodeStageVolume", stage), ("Node.NodeUnstageVolume", unstage)):
                ms, programs = berth_call(lab, rpc, request)
                berth[rpc].append(ms)
                berth_programs[rpc].append(programs)
            bare_ms["Node.NodeStageVolume"].append(bare(lab, BARE_STAGE, ("login", "map"), env))
            bare_ms["Node.NodeUnstageVolume"].append(bare(lab, BARE_UNSTAGE, ("flush", "logout"), env))
            print(f"[bench] round {i + 1}/{args.rounds} done", flush=True)
    rows = []
    print(f"\nmedians of {args.rounds} rounds, ms\n")
    print("| RPC | Berth | bare | ratio | bare steps | Berth's commands (os-brick), s |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for rpc in ("Node.NodeStageVolume", "Node.NodeUnstageVolume"):
        b = median(berth[rpc])
        o = median([s["total"] for s in bare_ms[rpc]])
        steps = {k: median([s[k] for s in bare_ms[rpc]]) for k in bare_ms[rpc][0] if k != "total"}
        names = sorted({p for programs in berth_programs[rpc] for p in programs})
        commands = {p: round(statistics.median([pr.get(p, 0.0) for pr in berth_programs[rpc]]), 2) for p in names}
        rows.append({"rpc": rpc, "berth_ms": b, "bare_ms": o, "ratio": round(b / o, 2), "bare_steps_ms": steps,
                     "berth_command_seconds": commands, "berth_samples": berth[rpc],
                     "bare_samples": bare_ms[rpc]})  # fmt: skip
        step_text = ", ".join(f"{k} {v:g}" for k, v in steps.items())
        command_text = ", ".join(f"{k} {v:g}" for k, v in commands.items()) or "-"
        print(f"| {rpc.split('.')[1]} | {b:g} | {o:g} | {b / o:.2f} | {step_text} | {command_text} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "csi_driver"], cwd=REPO, capture_output=True, text=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
        "rounds": args.rounds, "rows": rows,
    }, indent=2) + "\n")  # fmt: skip
    print(f"\n[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
