#!/usr/bin/env python3
"""Benchmark (issue #14, scale): controller and node RPCs with 1,000 volumes and 500 exported targets on one
backend, against the same RPCs with 10 volumes; and 50 concurrent CreateVolume calls against 50 sequential ones.

The controller is Berth's ControllerService built in-process from sanity/berth-lab.yaml (as bench/controller_overhead.py
builds it: every host pointed at the lab's storage guest), so each time is the RPC's wall time including its ssh
commands. The node side is Berth all-in-one in node1 (as the lab tests run it) with one volume staged there:
NodeGetVolumeStats is timed by Berth's own `duration_ms`.

At each level (10 volumes, then --volumes with --exported of them exported), 5 samples of:

- ListVolumes, the first page (max_entries 100) and all pages (following next_token);
- CreateVolume of a 64 MiB block volume, ControllerPublish of it to node1 (then unpublished and deleted: not timed);
- NodeGetVolumeStats of the staged volume.

The background population is made the fast way, not measured: thin LVs carrying exactly the tags CreateVolume gives a
ready volume (backend lab-iscsi), created by one `lvm` shell on the storage host (one LVM start for all of them),
and LIO exports (target, LUN, portals and an ACL for a made-up initiator, recorded as a publication in the LV's tags
as ControllerPublish records it) in batches through the same host program and ops as Berth's LioTargets. Everything
the bench made (names `bench-scale-*`) is removed at the end, also after an error or Ctrl-C.

    .venv/bin/python bench/scale.py                 # starts its own small lab (storage + node1); ~40 min under TCG
    .venv/bin/python bench/scale.py --attach        # uses the lab of `python -m lab up` (nobody else on it)

Prints medians and the 1,000 ÷ 10 ratios; writes JSON to artifacts/bench/scale.json. Not a test: nothing is asserted
about times (it does check that the concurrent creations all succeeded and made one volume each).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.controller_overhead import Aborted, Context, capability, lab_controller, lab_storage  # noqa: E402
from bench.node_attach import BLOCK_RWX, STAGING, berth_call, must  # noqa: E402
from csi_driver.csi import csi_pb2  # noqa: E402
from csi_driver.services.controller import ControllerService  # noqa: E402
from csi_driver.storage import tags as meta_keys  # noqa: E402
from csi_driver.storage.backend import KEY_BACKEND, KIND_VOLUME, PUBLISHED_PREFIX  # noqa: E402
from csi_driver.storage.errors import Busy  # noqa: E402
from csi_driver.storage.ids import volume_lv_name  # noqa: E402
from csi_driver.storage.lvm import ThinPool  # noqa: E402
from csi_driver.storage.runner import CommandRunner  # noqa: E402
from lab.topology import Lab  # noqa: E402
from sanity.runner import csicall, start_berth, stop_berth  # noqa: E402

DEFAULT_OUT = REPO / "artifacts" / "bench" / "scale.json"
BACKEND = "lab-iscsi"
PREFIX = "bench-scale-"
POPULATION_BYTES = 4 << 20
MEASURED_BYTES = 64 << 20
NODE = "node1"
# The made-up node the exported population is published to (no such initiator logs in).
OTHER_NODE = "iqn.2026-11.io.berth.bench:scale-node|198.18.0.99"
LVM_BATCH = 100  # lvcreate commands per lvm shell
LIO_BATCH = 50  # export ops per host program call
UNEXPORT_BATCH = 20
SAFE_WORD = re.compile(r"[A-Za-z0-9_.:=/+-]+")


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    result = call()
    return time.monotonic() - t0, result


# --- the background population ----------------------------------------------------------------------------


def population_names(start: int, stop: int) -> list[str]:
    return [f"{PREFIX}pop-{i:04d}" for i in range(start, stop)]


def create_population(runner: CommandRunner, pool: ThinPool, names: Sequence[str], published: bool) -> None:
    """Thin LVs tagged as ready Berth volumes of BACKEND, LVM_BATCH per `lvm` shell."""
    for first in range(0, len(names), LVM_BATCH):
        lines = []
        for name in names[first : first + LVM_BATCH]:
            meta = {meta_keys.KEY_NAME: name, meta_keys.KEY_KIND: KIND_VOLUME, KEY_BACKEND: BACKEND,
                    meta_keys.KEY_STATE: meta_keys.STATE_READY}  # fmt: skip
            if published:
                meta[PUBLISHED_PREFIX + OTHER_NODE] = "rw"
            argv = ["lvcreate", "--type", "thin", "--virtualsize", f"{POPULATION_BYTES}b", "--thinpool", pool.pool,
                    "--name", volume_lv_name(BACKEND, name), "--yes"]  # fmt: skip
            for tag in meta_keys.encode_tags(meta):
                argv += ["--addtag", tag]
            argv.append(pool.vg)
            # The lvm shell splits on blanks; every word here is a plain name or an escaped tag.
            assert all(SAFE_WORD.fullmatch(word) for word in argv), argv
            lines.append(" ".join(argv))
        runner.run(["lvm"], input=("\n".join(lines) + "\n").encode(), timeout=1800)


def export_population(service: ControllerService, names: Sequence[str]) -> None:
    """LIO export + ACL for OTHER_NODE's initiator, LIO_BATCH volumes per host program call (Berth's own ops)."""
    backend = service.backends[BACKEND]
    targets = backend.exporter.targets  # type: ignore[attr-defined]
    portals = backend.exporter.portals  # type: ignore[attr-defined]
    initiator = OTHER_NODE.split("|")[0]
    for first in range(0, len(names), LIO_BATCH):
        ops = []
        for name in names[first : first + LIO_BATCH]:
            lv = volume_lv_name(BACKEND, name)
            ops += [targets._export_op(lv, f"/dev/{backend.pool.vg}/{lv}", portals, unmap=True),
                    targets._add_op(lv, initiator, False, None)]  # fmt: skip
        targets.run_ops(ops, save=True)


def cleanup(service: ControllerService) -> None:
    """Every bench-scale volume: unexported in batches, then its LV removed (in `lvm` shells)."""
    backend = service.backends[BACKEND]
    targets = backend.exporter.targets  # type: ignore[attr-defined]
    lvs = [
        info.name
        for info in backend.pool.list({KEY_BACKEND: BACKEND})
        if info.meta.get(meta_keys.KEY_NAME, "").startswith(PREFIX)
    ]

    def still_exported() -> list[str]:
        return sorted({e.volume for e in targets.list_exports()} & set(lvs))

    doomed = left = still_exported()
    while left:
        # A host program call has a time budget; with 500 targets an unexport of 50 once ran out of it (Busy,
        # having unexported some): so smaller batches, and what is left is read again until nothing is.
        ops = [{"op": "unexport", "volume": lv, "target": targets.target_for(lv)} for lv in left[:UNEXPORT_BATCH]]
        try:
            targets.run_ops(ops, save=True)
        except Busy as err:
            print(f"[bench] clean-up: {err}; again", flush=True)
        still = still_exported()
        if len(still) == len(left):
            raise RuntimeError(f"clean-up: no export removed, {len(still)} left")
        left = still
    runner = backend.pool.runner
    for first in range(0, len(lvs), LVM_BATCH):
        lines = [f"lvremove --force --yes {backend.pool.vg}/{lv}" for lv in lvs[first : first + LVM_BATCH]]
        runner.run(["lvm"], input=("\n".join(lines) + "\n").encode(), timeout=1800)
    print(f"[bench] removed {len(doomed)} bench exports and {len(lvs)} bench LVs", flush=True)


# --- measurements -----------------------------------------------------------------------------------------


def list_all(service: ControllerService, ctx: Context) -> int:
    token, count = "", 0
    while True:
        page = service.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=100, starting_token=token), ctx)
        count += len(page.entries)
        token = page.next_token
        if not token:
            return count


def measure(service: ControllerService, lab: Lab, node_id: str, staged: dict[str, Any], level: str,
            samples: int) -> dict[str, list[float]]:  # fmt: skip
    ctx = Context()
    cap = capability("iscsi")
    out: dict[str, list[float]] = {k: [] for k in ("ListVolumes page", "ListVolumes all", "CreateVolume",
                                                   "ControllerPublish", "NodeGetVolumeStats")}  # fmt: skip
    first_page = csi_pb2.ListVolumesRequest(max_entries=100)
    for i in range(samples):
        out["ListVolumes page"].append(timed(lambda: service.ListVolumes(first_page, ctx))[0])
        seconds, count = timed(lambda: list_all(service, ctx))
        out["ListVolumes all"].append(seconds)
        request = csi_pb2.CreateVolumeRequest(
            name=f"{PREFIX}m-{level}-{i}", capacity_range=csi_pb2.CapacityRange(required_bytes=MEASURED_BYTES),
            volume_capabilities=[cap], parameters={"backend": BACKEND},
        )  # fmt: skip
        seconds, created = timed(lambda request=request: service.CreateVolume(request, ctx))
        out["CreateVolume"].append(seconds)
        volume_id = created.volume.volume_id
        publish = csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id, volume_capability=cap)
        out["ControllerPublish"].append(timed(lambda publish=publish: service.ControllerPublishVolume(publish, ctx))[0])
        service.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id), ctx
        )
        service.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), ctx)
        ms, _ = berth_call(lab, "Node.NodeGetVolumeStats", staged)
        out["NodeGetVolumeStats"].append(ms / 1000)
        print(f"[bench] {level}: sample {i + 1}/{samples} (ListVolumes saw {count} volumes)", flush=True)
    return out


def concurrency(service: ControllerService, calls: int) -> dict[str, Any]:
    """`calls` CreateVolume one after another, then `calls` others at once; each set deleted after."""
    ctx = Context()
    cap = capability("iscsi")

    def create(name: str) -> str:
        request = csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=POPULATION_BYTES),
            volume_capabilities=[cap], parameters={"backend": BACKEND},
        )  # fmt: skip
        return str(service.CreateVolume(request, ctx).volume.volume_id)

    def delete(ids: Sequence[str]) -> None:
        for volume_id in ids:
            service.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), ctx)

    sequential_names = [f"{PREFIX}seq-{i:02d}" for i in range(calls)]
    sequential, ids = timed(lambda: [create(n) for n in sequential_names])
    delete(ids)
    concurrent_names = [f"{PREFIX}con-{i:02d}" for i in range(calls)]
    failures: list[str] = []

    def attempt(name: str) -> str | None:
        try:
            return create(name)
        except Aborted as err:
            failures.append(f"{name}: {err}")
            return None

    with ThreadPoolExecutor(calls) as pool:
        concurrent, results = timed(lambda: list(pool.map(attempt, concurrent_names)))
    made = [i for i in results if i]
    lvs = [info for info in service.backends[BACKEND].pool.list({KEY_BACKEND: BACKEND})
           if info.meta.get(meta_keys.KEY_NAME, "").startswith(f"{PREFIX}con-")]  # fmt: skip
    delete(made)
    return {
        "calls": calls,
        "sequential_s": round(sequential, 1),
        "concurrent_s": round(concurrent, 1),
        "speed_up": round(sequential / concurrent, 2),
        "succeeded": len(made),
        "distinct_volume_ids": len(set(made)),
        "lvs_made": len(lvs),
        "failures": failures,
    }


def median(samples: Sequence[float]) -> float:
    return round(statistics.median(samples) * 1000)


def report(doc: dict[str, Any], args: argparse.Namespace, small: int) -> None:
    """The table and the JSON, written as soon as both levels are measured (before the long clean-up)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    doc["commit"] = commit.stdout.strip()
    small_level, big_level = doc["levels"][str(small)], doc["levels"][str(args.volumes)]
    print(f"\nmedians of {args.samples} samples, ms\n")
    print(f"| RPC | {small} volumes | {args.volumes} volumes ({args.exported} exported) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for rpc, samples in small_level.items():
        a, b = median(samples), median(big_level[rpc])
        print(f"| {rpc} | {a} | {b} | {b / a:.2f} |")
    c = doc["concurrency"]
    print(f"\n{c['calls']} CreateVolume: sequential {c['sequential_s']} s, concurrent {c['concurrent_s']} s "
          f"(speed-up {c['speed_up']}); {c['succeeded']} succeeded, {c['distinct_volume_ids']} distinct ids, "
          f"{c['lvs_made']} LVs")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n[bench] wrote {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=1000)
    parser.add_argument("--exported", type=int, default=500)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--attach", action="store_true", help="use the lab of `python -m lab up`")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    doc: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "levels": {}}
    with lab_storage(args.attach, sync=True) as (lab, host):
        service, _ = lab_controller(host)
        backend = service.backends[BACKEND]
        start_berth(lab, NODE, mode="all")
        ctx = Context()
        staged: dict[str, Any] = {}
        try:
            cleanup(service)
            node_id = must(lab, "Node.NodeGetInfo", {})["node_id"]
            cap = capability("iscsi")
            staged_volume = service.CreateVolume(csi_pb2.CreateVolumeRequest(
                name=f"{PREFIX}staged", capacity_range=csi_pb2.CapacityRange(required_bytes=MEASURED_BYTES),
                volume_capabilities=[cap], parameters={"backend": BACKEND},
            ), ctx).volume  # fmt: skip
            context = service.ControllerPublishVolume(
                csi_pb2.ControllerPublishVolumeRequest(
                    volume_id=staged_volume.volume_id, node_id=node_id, volume_capability=cap
                ),
                ctx,
            ).publish_context
            lab.run(NODE, f"mkdir -p {STAGING}")
            must(lab, "Node.NodeStageVolume", {
                "volume_id": staged_volume.volume_id, "staging_target_path": STAGING, "volume_capability": BLOCK_RWX,
                "publish_context": dict(context), "volume_context": dict(staged_volume.volume_context)})  # fmt: skip
            staged = {"volume_id": staged_volume.volume_id, "volume_path": STAGING, "staging_target_path": STAGING}
            small = 10
            seconds, _ = timed(
                lambda: create_population(backend.pool.runner, backend.pool, population_names(1, small), False)
            )
            doc["levels"][str(small)] = measure(service, lab, node_id, staged, str(small), args.samples)
            doc["concurrency"] = concurrency(service, args.concurrent)
            print(f"[bench] concurrency: {doc['concurrency']}", flush=True)
            exported = population_names(small, small + args.exported)
            seconds, _ = timed(lambda: create_population(backend.pool.runner, backend.pool, exported, True))
            seconds += timed(lambda: export_population(service, exported))[0]
            rest = population_names(small + args.exported, args.volumes)
            seconds += timed(lambda: create_population(backend.pool.runner, backend.pool, rest, False))[0]
            doc["population_s"] = round(seconds)
            print(
                f"[bench] population of {args.volumes} ({args.exported} exported) made in {seconds:.0f} s", flush=True
            )
            doc["levels"][str(args.volumes)] = measure(service, lab, node_id, staged, str(args.volumes), args.samples)
            report(doc, args, small)
        finally:
            if staged:
                csicall(
                    lab,
                    NODE,
                    "Node.NodeUnstageVolume",
                    {"volume_id": staged["volume_id"], "staging_target_path": STAGING},
                )
            stop_berth(lab, NODE)
            cleanup(service)
            backend.pool.runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
