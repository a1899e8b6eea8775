#!/usr/bin/env python3
"""Benchmark (issue #14, side by side with csi-driver-nfs, Berth's half): the RPCs the issue names, on a volume
holding 1 GiB of data against the same RPCs on an empty one, for the NFS and the iSCSI backend.

csi-driver-nfs copies a volume's files with tar for a snapshot, a restore and a clone, so those grow with the data.
Berth's are thin LVM snapshots and must not. The peer itself cannot be built here yet (the Go module proxy refuses
every version of kubernetes-csi/csi-driver-nfs, bench/README.md), so this measures Berth alone, as a ratio of 1 GiB
to empty.

Berth runs all-in-one in node1 of a small lab (storage + node1), as the lab tests run it; each time is Berth's own
`duration_ms` of the call (its log line), so csicall and ssh are not counted. Per backend and per level (empty,
then --data-mib written into the source volume on the storage host), --rounds samples of:

- CreateVolume of a new 2 GiB volume (then deleted, not timed);
- CreateSnapshot of the source volume, CreateVolume from that snapshot, CreateVolume cloning the source;
- NodeStageVolume and NodePublishVolume of the source on node1 (ControllerPublish and the unwinding not timed).

NFS volumes are mounts (RWX); iSCSI volumes are raw block (RWX, two portals, multipath). The data is a 64 MiB
random chunk written again and again into the volume's host mount (NFS) or its LV (iSCSI), then synced.

    .venv/bin/python bench/data_size.py             # starts its own small lab (storage + node1), ~7 min under TCG
    .venv/bin/python bench/data_size.py --attach    # uses the lab of `python -m lab up` (nobody else on it)

Prints medians and the ratios; writes JSON to artifacts/bench/data_size.json. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.node_attach import BLOCK_RWX, NODE, logged_call, median, must, small_lab  # noqa: E402
from lab.topology import Lab  # noqa: E402
from sanity.runner import csicall, start_berth, stop_berth  # noqa: E402

DEFAULT_OUT = REPO / "artifacts" / "bench" / "data_size.json"
VOLUME_BYTES = 2 << 30
CHUNK_MIB = 64
STAGING = "/var/lib/berth-bench/data-size/staging"
TARGET = "/var/lib/berth-bench/data-size/target"
MOUNT_RWX = {"mount": {}, "access_mode": {"mode": "MULTI_NODE_MULTI_WRITER"}}
BACKENDS = {"lab-nfs": MOUNT_RWX, "lab-iscsi": BLOCK_RWX}
RPCS = ("CreateVolume", "CreateSnapshot", "CreateVolume from snapshot", "CreateVolume clone", "NodeStageVolume",
        "NodePublishVolume")  # fmt: skip


def timed(lab: Lab, rpc: str, request: dict) -> tuple[float, dict]:
    """(Berth's duration_ms of the call, its answer)."""
    answer, line, _ = logged_call(lab, rpc, request)
    return float(line["duration_ms"]), answer


def create_request(name: str, backend: str, source: dict | None = None) -> dict:
    request = {"name": name, "capacity_range": {"required_bytes": str(VOLUME_BYTES)},
               "volume_capabilities": [BACKENDS[backend]], "parameters": {"backend": backend}}  # fmt: skip
    if source:
        request["volume_content_source"] = source
    return request


def fill(lab: Lab, backend: str, volume: dict, mib: int) -> None:
    """Write `mib` MiB into the volume on the storage host: a file in its host mount, or the LV itself."""
    lv = volume["volume_id"].split("/", 1)[1]
    target = f"{volume['volume_context']['nfsExport']}/data" if backend == "lab-nfs" else f"/dev/berth/{lv}"
    chunks = mib // CHUNK_MIB
    lab.run("storage", f"dd if=/dev/urandom of=/tmp/chunk bs=1M count={CHUNK_MIB} status=none && "
                       f"for i in $(seq 1 {chunks}); do cat /tmp/chunk; done | "
                       f"dd of={target} bs=1M conv=fsync status=none", timeout=1800)  # fmt: skip


@contextmanager
def source_volume(lab: Lab, backend: str, name: str, data_mib: int) -> Iterator[dict]:
    volume = must(lab, "Controller.CreateVolume", create_request(name, backend))["volume"]
    try:
        if data_mib:
            fill(lab, backend, volume, data_mib)
        yield volume
    finally:
        csicall(lab, NODE, "Controller.DeleteVolume", {"volume_id": volume["volume_id"]})


def one_round(lab: Lab, backend: str, source: dict, node_id: str, tag: str) -> dict[str, float]:
    times: dict[str, float] = {}
    capability = BACKENDS[backend]
    with ExitStack() as undo:

        def create(rpc: str, name: str, content: dict | None = None) -> dict:
            times[rpc], answer = timed(lab, "Controller.CreateVolume", create_request(name, backend, content))
            volume_id = answer["volume"]["volume_id"]
            undo.callback(csicall, lab, NODE, "Controller.DeleteVolume", {"volume_id": volume_id})
            return answer["volume"]

        create("CreateVolume", f"bench-size-new-{tag}")
        times["CreateSnapshot"], answer = timed(lab, "Controller.CreateSnapshot", {
            "name": f"bench-size-snap-{tag}", "source_volume_id": source["volume_id"]})  # fmt: skip
        snapshot_id = answer["snapshot"]["snapshot_id"]
        undo.callback(csicall, lab, NODE, "Controller.DeleteSnapshot", {"snapshot_id": snapshot_id})
        create("CreateVolume from snapshot", f"bench-size-restore-{tag}", {"snapshot": {"snapshot_id": snapshot_id}})
        create("CreateVolume clone", f"bench-size-clone-{tag}", {"volume": {"volume_id": source["volume_id"]}})

        volume_id = source["volume_id"]
        published = must(lab, "Controller.ControllerPublishVolume",
                         {"volume_id": volume_id, "node_id": node_id, "volume_capability": capability})  # fmt: skip
        context = published.get("publish_context", {})
        undo.callback(csicall, lab, NODE, "Controller.ControllerUnpublishVolume",
                      {"volume_id": volume_id, "node_id": node_id})  # fmt: skip
        lab.run(NODE, f"mkdir -p {STAGING} && rm -rf {TARGET}")
        stage = {"volume_id": volume_id, "staging_target_path": STAGING, "volume_capability": capability,
                 "publish_context": context, "volume_context": source.get("volume_context", {})}  # fmt: skip
        times["NodeStageVolume"], _ = timed(lab, "Node.NodeStageVolume", stage)
        undo.callback(csicall, lab, NODE, "Node.NodeUnstageVolume",
                      {"volume_id": volume_id, "staging_target_path": STAGING})  # fmt: skip
        times["NodePublishVolume"], _ = timed(lab, "Node.NodePublishVolume", {**stage, "target_path": TARGET})
        undo.callback(csicall, lab, NODE, "Node.NodeUnpublishVolume", {"volume_id": volume_id, "target_path": TARGET})
    return times


def measure(lab: Lab, backend: str, data_mib: int, rounds: int, node_id: str) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {rpc: [] for rpc in RPCS}
    level = f"{data_mib}m"
    with source_volume(lab, backend, f"bench-size-source-{backend}-{level}", data_mib) as source:
        for i in range(rounds):
            for rpc, ms in one_round(lab, backend, source, node_id, f"{backend}-{level}-{i}").items():
                samples[rpc].append(ms)
            print(f"[bench] {backend} {level} round {i + 1}/{rounds}", flush=True)
    return samples


def report(results: dict, data_mib: int, say: Callable[[str], None]) -> None:
    for backend, levels in results.items():
        say(f"\n{backend}: Berth's duration_ms, medians; {data_mib} MiB of data ÷ empty")
        say(f"{'RPC':<28}{'empty':>10}{f'{data_mib} MiB':>10}{'ratio':>8}")
        for rpc in RPCS:
            empty, full = median(levels["empty"][rpc]), median(levels["data"][rpc])
            say(f"{rpc:<28}{empty:>10}{full:>10}{full / empty:>8.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attach", action="store_true", help="use the running lab (python -m lab up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-mib", type=int, default=1024, help=f"data in the full volume (a multiple of "
                                                                   f"{CHUNK_MIB})")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.data_mib < CHUNK_MIB or args.data_mib % CHUNK_MIB:
        parser.error(f"--data-mib must be a positive multiple of {CHUNK_MIB}")
    results: dict[str, dict] = {}
    with small_lab(args.attach) as lab:
        start_berth(lab, NODE, mode="all")
        try:
            node_id = must(lab, "Node.NodeGetInfo", {})["node_id"]
            for backend in BACKENDS:
                results[backend] = {level: measure(lab, backend, mib, args.rounds, node_id)
                                    for level, mib in (("empty", 0), ("data", args.data_mib))}  # fmt: skip
        finally:
            stop_berth(lab, NODE)
    report(results, args.data_mib, print)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": datetime.now(UTC).isoformat(timespec="seconds"),
                                    "data_mib": args.data_mib, "samples_ms": results}, indent=2))  # fmt: skip
    print(f"\n[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
