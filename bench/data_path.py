#!/usr/bin/env python3
"""Benchmark (issue #14, data path): fio on the block device Berth publishes (the dm-multipath map over two iSCSI
portals) against fio on one raw iSCSI path (`/dev/sdX`, one of the map's own paths) of the same LUN, on the same guest.

Berth runs in node1 all-in-one (as the lab tests run it). One raw block volume is created, published to node1,
staged and published (NodePublishVolume: the map bound at a target path, what a pod's `volumeDevices` sees). Then
for each job, fio runs on the published path and on the first path of the map, alternately, --rounds times:
4k random read and write (iodepth 16) and 1M sequential read and write (iodepth 4), all O_DIRECT with libaio, each
--seconds long, over the first 192 MiB of the device. The multipath policy in force is recorded from
`multipath -ll`. `--policy failover` overrides multipath-tools' built-in one for the run (`overrides {
path_grouping_policy failover }` in /etc/multipath/conf.d, removed afterwards): one path carries the I/O, the other
waits, which tells device-mapper's own cost from the cost of spreading I/O over two sessions.

It prints medians (IOPS for 4k, MiB/s for 1M) and the ratio multipath ÷ one path, and writes JSON to
artifacts/bench/data_path.json. Not a test: nothing is asserted.

    .venv/bin/python bench/data_path.py             # starts its own small lab (storage + node1), ~15 min
    .venv/bin/python bench/data_path.py --attach    # uses the lab of `python -m lab up` (nobody else on it)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.node_attach import BLOCK_RWX, NODE, STAGING, must, published_volume, small_lab  # noqa: E402
from lab.topology import Lab  # noqa: E402
from sanity.runner import csicall  # noqa: E402

DEFAULT_OUT = REPO / "artifacts" / "bench" / "data_path.json"
TARGET = "/var/lib/berth-bench/publish/data-path"
POLICY_CONF = "/etc/multipath/conf.d/berth-bench-policy.conf"
RECONFIGURE = "if systemctl -q is-active multipathd; then multipathd reconfigure; fi"  # else it reads it at start
POLICIES = {"default": "", "failover": "overrides {\n\tpath_grouping_policy failover\n}\n"}
VOLUME_BYTES = 256 << 20
FIO_SPAN = "192m"
# name: (fio rw, block size, iodepth, what is reported)
JOBS = {
    "4k random read": ("randread", "4k", 16, "iops"),
    "4k random write": ("randwrite", "4k", 16, "iops"),
    "1M sequential read": ("read", "1m", 4, "MiB/s"),
    "1M sequential write": ("write", "1m", 4, "MiB/s"),
}


def fio(lab: Lab, device: str, job: str, seconds: int) -> float:
    rw, bs, depth, unit = JOBS[job]
    argv = ["fio", "--name=bench", f"--filename={device}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
            "--ioengine=libaio", "--direct=1", f"--size={FIO_SPAN}", "--time_based", f"--runtime={seconds}",
            "--ramp_time=2", "--randrepeat=0", "--output-format=json"]  # fmt: skip
    result = json.loads(lab.run(NODE, shlex.join(argv)).stdout)
    side = result["jobs"][0]["write" if "write" in rw else "read"]
    return float(side["iops"]) if unit == "iops" else float(side["bw_bytes"]) / (1 << 20)


@contextmanager
def path_policy(lab: Lab, policy: str) -> Iterator[None]:
    """multipathd on the node with `policy` in force for every map made meanwhile (the default: as installed)."""
    if not POLICIES[policy]:
        yield
        return
    write = f"printf %s {shlex.quote(POLICIES[policy])} > {POLICY_CONF}"
    lab.run(NODE, f"mkdir -p {os.path.dirname(POLICY_CONF)} && {write} && {RECONFIGURE}")
    try:
        yield
    finally:
        lab.run(NODE, f"rm -f {POLICY_CONF} && {RECONFIGURE}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--attach", action="store_true", help="use the lab of `python -m lab up`")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="default", help="multipath path policy")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    results: dict[str, dict[str, list[float]]] = {job: {"multipath": [], "one path": []} for job in JOBS}
    topology = ""
    with small_lab(args.attach) as lab, path_policy(lab, args.policy), \
            published_volume(lab, f"bench-data-path-{os.getpid()}", VOLUME_BYTES) as pub:
        volume, _, context = pub
        volume_id = volume["volume_id"]
        lab.run(NODE, f"mkdir -p {os.path.dirname(TARGET)}")
        common = {"volume_id": volume_id, "staging_target_path": STAGING, "volume_capability": BLOCK_RWX,
                  "publish_context": context, "volume_context": volume.get("volume_context", {})}  # fmt: skip
        must(lab, "Node.NodeStageVolume", common)
        must(lab, "Node.NodePublishVolume", {**common, "target_path": TARGET})
        try:
            # The target is the map's device node bound onto a file: its major:minor names the map.
            major, minor = (int(n, 16) for n in lab.run(NODE, f"stat -c '%t %T' {TARGET}").stdout.split())
            dm = Path(lab.run(NODE, f"readlink -f /sys/dev/block/{major}:{minor}").stdout.strip()).name
            paths = lab.run(NODE, f"ls /sys/block/{dm}/slaves").stdout.split()
            one_path = f"/dev/{paths[0]}"
            topology = lab.run(NODE, f"multipath -ll $(cat /sys/block/{dm}/dm/name)").stdout
            print(f"[bench] published {TARGET} -> /dev/{dm}; paths {paths}\n{topology}", flush=True)
            for i in range(args.rounds):
                for job in JOBS:
                    results[job]["multipath"].append(fio(lab, TARGET, job, args.seconds))
                    results[job]["one path"].append(fio(lab, one_path, job, args.seconds))
                print(f"[bench] round {i + 1}/{args.rounds} done", flush=True)
        finally:
            csicall(lab, NODE, "Node.NodeUnpublishVolume", {"volume_id": volume_id, "target_path": TARGET})
    rows: list[dict[str, Any]] = []
    print(f"\nmedians of {args.rounds} rounds of {args.seconds} s\n")
    print("| job | unit | multipath (published) | one raw path | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for job, sides in results.items():
        unit = JOBS[job][3]
        mp, raw = statistics.median(sides["multipath"]), statistics.median(sides["one path"])
        rows.append({"job": job, "unit": unit, "multipath": round(mp, 1), "one_path": round(raw, 1),
                     "ratio": round(mp / raw, 2), "samples": sides})  # fmt: skip
        print(f"| {job} | {unit} | {mp:.1f} | {raw:.1f} | {mp / raw:.2f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit.stdout.strip(),
        "rounds": args.rounds, "seconds": args.seconds, "policy": args.policy, "multipath_ll": topology, "rows": rows,
    }, indent=2) + "\n")  # fmt: skip
    print(f"\n[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
