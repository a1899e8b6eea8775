#!/usr/bin/env python3
"""Benchmark (issue #14, controller overhead): each controller RPC against the bare storage-host commands it must run.

The controller's ControllerService is built from sanity/berth-lab.yaml (all its backends, as csi-sanity runs it, so
e.g. the attach-limit count sees every backend) with every backend's host pointed at the lab's storage guest through
its ssh port forward, and its RPCs are called in-process (no gRPC): CreateVolume, CreateSnapshot,
ControllerPublish, ControllerUnpublish, DeleteSnapshot and DeleteVolume, for the iSCSI and the NFS backend.

"Bare" is what an operator would type for the same change, one command per ssh call over the same ssh master:

- iSCSI: `lvcreate --type thin` (with tags), `lvcreate --snapshot`, a `python3 -c` rtslib script doing exactly the
  configfs changes (publish: backstore, target, TPG, LUN 0, two portals, ACL with LUN 0 mapped; unpublish: ACL
  deleted; delete: target and backstore deleted; no save to saveconfig.json), `lvchange --addtag/--deltag` (Berth
  records publications in LV tags), `lvremove`.
- NFS: `lvcreate`, `mkfs.xfs -K`, `mkdir -p`, `mount`; `sync -f` + `lvcreate --snapshot`; `exportfs -o` (both node
  addresses in one call) + `lvchange --addtag`; `exportfs -u` + `lvchange --deltag`; `umount` + `lvremove`.

It prints, per RPC: Berth ms and bare ms (medians of --rounds), their ratio, and the host commands Berth ran (count
and time of each kind), and writes JSON to artifacts/bench/controller_overhead.json. Not a test: nothing is asserted.

    .venv/bin/python bench/controller_overhead.py             # starts its own small lab (storage + node1), ~10 min
    .venv/bin/python bench/controller_overhead.py --attach    # uses the lab of `python -m lab up` (nobody else on it)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from csi_driver.assembly import build_backends  # noqa: E402
from csi_driver.config import Config, HostConfig, load_config  # noqa: E402
from csi_driver.csi import csi_pb2  # noqa: E402
from csi_driver.services.controller import ControllerService  # noqa: E402
from csi_driver.storage import lio, nfs, resident  # noqa: E402
from csi_driver.storage import runner as runner_module  # noqa: E402
from lab import config as lab_config  # noqa: E402
from lab.topology import Lab  # noqa: E402

LAB_CONFIG = REPO / "sanity" / "berth-lab.yaml"
DEFAULT_OUT = REPO / "artifacts" / "bench" / "controller_overhead.json"
NODE_ID = "iqn.2026-11.io.berth.lab:node1|198.18.0.11,198.18.1.11"
NODE_INITIATOR, NODE_ADDRESSES = NODE_ID.split("|")[0], NODE_ID.split("|")[1].split(",")
ISCSI_BYTES = 64 << 20
NFS_BYTES = 320 << 20  # xfs needs 300 MiB
VG, POOL = "berth", "pool"
BARE_PREFIX = "bench-bare-"
BARE_IQN_PREFIX = "iqn.2026-11.io.berth.bench-bare"
BARE_EXPORT_ROOT = "/srv/bench-bare"
RPCS = ("CreateVolume", "CreateSnapshot", "ControllerPublish", "ControllerUnpublish", "DeleteSnapshot", "DeleteVolume")

# Measurement probes (the bare LIO changes), not storage logic: argv carries the names.
BARE_LIO_PUBLISH = """
import sys, rtslib_fb as r
name, dev, serial, iqn, initiator, *portals = sys.argv[1:]
so = r.BlockStorageObject(name, dev=dev, wwn=serial)
tpg = r.TPG(r.Target(r.FabricModule("iscsi"), iqn), 1)
tpg.set_attribute("authentication", "0")
tpg.set_attribute("generate_node_acls", "0")
lun = r.LUN(tpg, 0, so)
for p in portals:
    ip, port = p.rsplit(":", 1)
    r.NetworkPortal(tpg, ip, int(port))
tpg.enable = True
r.MappedLUN(r.NodeACL(tpg, initiator), 0, tpg_lun=lun)
"""
BARE_LIO_UNPUBLISH = """
import sys, rtslib_fb as r
iqn, initiator = sys.argv[1:]
tpg = r.TPG(r.Target(r.FabricModule("iscsi"), iqn, mode="lookup"), 1, mode="lookup")
r.NodeACL(tpg, initiator, mode="lookup").delete()
"""
BARE_LIO_DELETE = """
import sys, rtslib_fb as r
name, iqn = sys.argv[1:]
r.Target(r.FabricModule("iscsi"), iqn, mode="lookup").delete()
r.BlockStorageObject(name).delete()
"""


class Aborted(Exception):
    pass


class Context:
    """The part of grpc.ServicerContext the services use."""

    def abort(self, code: Any, message: str) -> None:
        raise Aborted(f"{code}: {message}")


# --- what Berth runs on the host, per RPC ------------------------------------------------------------------


class CommandLog:
    """Records every host command (kind, seconds) run through SshRunner while it is active."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    def record(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.entries.append((kind, seconds))

    def take(self) -> list[tuple[str, float]]:
        with self._lock:
            out, self.entries = self.entries, []
        return out


def command_kind(argv: Sequence[str]) -> str:
    if len(argv) > 2 and argv[1] == "-c":
        return f"{argv[0]} {_program_name(argv[2])}"
    return argv[0]


def _program_name(source: str) -> str:
    known = {lio.host_program(): "<lio_host>", nfs.host_program(): "<nfs_host>",
             runner_module.berth_host_program(): "<berth_host>"}  # fmt: skip
    return known.get(source, "<script>")


def install_command_log() -> CommandLog:
    """Wrap SshRunner.run and the resident host programs' calls to time every host command."""
    log = CommandLog()
    cls = runner_module.SshRunner
    original_run = cls.run

    def run(self: Any, argv: Sequence[str], **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return original_run(self, argv, **kwargs)
        finally:
            log.record(command_kind(argv), time.monotonic() - t0)

    cls.run = run  # type: ignore[method-assign]
    original_call = resident.ResidentPrograms.call

    def call(self: Any, argv: Sequence[str], request: bytes, timeout: float, label: list[str], **kwargs: Any) -> Any:
        t0 = time.monotonic()
        response = original_call(self, argv, request, timeout, label, **kwargs)
        # None: it runs one-shot, through run(); berth_host.py serves LVM and sync commands, which run() records.
        if response is not None and _program_name(argv[2]) != "<berth_host>":
            log.record(f"{command_kind(argv)} resident", time.monotonic() - t0)
        return response

    resident.ResidentPrograms.call = call  # type: ignore[method-assign]
    return log


# --- the lab ----------------------------------------------------------------------------------------------


@contextmanager
def lab_storage(attach: bool, sync: bool = False) -> Iterator[tuple[Lab, HostConfig]]:
    """The lab (its own storage + node1 unless `attach`; `sync`: Berth's tree copied into the nodes) and a HostConfig
    reaching its storage guest from here."""
    if attach:
        lab = Lab.attach()
    else:
        lab = Lab(lab_config.LAB_DIR / "run" / f"bench-{os.getpid()}", nodes=1, owner_bound=True)
        print(f"[bench] lab up: {lab.up(sync=sync)}", flush=True)
    try:
        guest = lab.guests["storage"]
        with tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
            yield (
                lab,
                HostConfig(
                    address="127.0.0.1",
                    ssh_port=guest.spec.ssh_port,
                    ssh_identity_file=str(lab.image / "id_ed25519"),
                    ssh_known_hosts_file=str(Path(tmp) / "known_hosts"),
                    ssh_strict_host_key_checking="accept-new",
                ),
            )
    finally:
        if not attach:
            lab.down()


def lab_controller(host: HostConfig) -> tuple[ControllerService, Config]:
    config = load_config(LAB_CONFIG)
    backends = {name: dataclasses.replace(b, host=host) for name, b in config.backends.items()}
    config = dataclasses.replace(config, backends=backends)
    built = build_backends(config)
    return ControllerService(built, config.default_backend, config.node.max_volumes_per_node), config


# --- one round: Berth -------------------------------------------------------------------------------------


def capability(protocol: str) -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
    if protocol == "iscsi":
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=mode)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=mode)


def berth_round(service: ControllerService, backend: str, protocol: str, tag: str, log: CommandLog) -> dict:
    """Each RPC once: {rpc: (seconds, [(command kind, seconds)])}."""
    cap = capability(protocol)
    size = ISCSI_BYTES if protocol == "iscsi" else NFS_BYTES
    out: dict[str, tuple[float, list[tuple[str, float]]]] = {}
    ctx = Context()

    def timed(rpc: str, call: Callable[[], Any]) -> Any:
        log.take()
        t0 = time.monotonic()
        result = call()
        out[rpc] = (time.monotonic() - t0, log.take())
        return result

    created = timed(
        "CreateVolume",
        lambda: service.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=f"bench-overhead-{tag}",
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[cap],
                parameters={"backend": backend},
            ),
            ctx,
        ),
    )
    volume_id = created.volume.volume_id
    snapshot = timed(
        "CreateSnapshot",
        lambda: service.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name=f"bench-overhead-snap-{tag}", source_volume_id=volume_id), ctx
        ),
    )
    publish = csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=NODE_ID, volume_capability=cap)
    timed("ControllerPublish", lambda: service.ControllerPublishVolume(publish, ctx))
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=NODE_ID)
    timed("ControllerUnpublish", lambda: service.ControllerUnpublishVolume(unpublish, ctx))
    snapshot_id = snapshot.snapshot.snapshot_id
    timed(
        "DeleteSnapshot",
        lambda: service.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id), ctx),
    )
    timed("DeleteVolume", lambda: service.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), ctx))
    return out


# --- one round: bare --------------------------------------------------------------------------------------


def bare_round(run: Callable[[list[str]], Any], protocol: str, tag: str, portals: Sequence[str]) -> dict[str, float]:
    """The same changes as the operator's commands, each its own ssh call: {rpc: seconds}."""
    lv, snap = f"{BARE_PREFIX}{tag}", f"{BARE_PREFIX}{tag}-snap"
    dev, mp = f"/dev/{VG}/{lv}", f"{BARE_EXPORT_ROOT}/{lv}"
    iqn = f"{BARE_IQN_PREFIX}:{lv}"
    size = ISCSI_BYTES if protocol == "iscsi" else NFS_BYTES
    tags = ["--addtag", "berth.kind=volume", "--addtag", "berth.state=ready"]
    pub_tag = "berth.pub.node1=rw"
    steps: dict[str, list[list[str]]] = {
        "CreateVolume": [
            ["lvcreate", "--type", "thin", "--virtualsize", f"{size}b", "--thinpool", POOL, "--name", lv, *tags,
             "--yes", VG],
        ],
        "CreateSnapshot": [
            ["lvcreate", "--snapshot", "--setactivationskip", "n", "--activate", "y", "--name", snap, "--permission",
             "r", "--addtag", "berth.kind=snapshot", "--yes", f"{VG}/{lv}"],
        ],
        "DeleteSnapshot": [["lvremove", "--force", "--yes", f"{VG}/{snap}"]],
    }  # fmt: skip
    if protocol == "iscsi":
        serial = "b" * 8 + tag.encode().hex()[:24]
        steps["ControllerPublish"] = [
            ["python3", "-c", BARE_LIO_PUBLISH, lv, dev, serial, iqn, NODE_INITIATOR, *portals],
            ["lvchange", "--addtag", pub_tag, f"{VG}/{lv}"],
        ]
        steps["ControllerUnpublish"] = [
            ["python3", "-c", BARE_LIO_UNPUBLISH, iqn, NODE_INITIATOR],
            ["lvchange", "--deltag", pub_tag, f"{VG}/{lv}"],
        ]
        steps["DeleteVolume"] = [
            ["python3", "-c", BARE_LIO_DELETE, lv, iqn],
            ["lvremove", "--force", "--yes", f"{VG}/{lv}"],
        ]
    else:
        steps["CreateVolume"] += [["mkfs.xfs", "-q", "-K", dev], ["mkdir", "-p", mp], ["mount", "-t", "xfs", dev, mp]]
        steps["CreateSnapshot"].insert(0, ["sync", "-f", mp])
        clients = [f"{address}:{mp}" for address in NODE_ADDRESSES]
        steps["ControllerPublish"] = [
            ["exportfs", "-o", "rw,sync,no_subtree_check,root_squash", *clients],
            ["lvchange", "--addtag", pub_tag, f"{VG}/{lv}"],
        ]
        steps["ControllerUnpublish"] = [
            ["exportfs", "-u", *clients],
            ["lvchange", "--deltag", pub_tag, f"{VG}/{lv}"],
        ]
        steps["DeleteVolume"] = [["umount", mp], ["lvremove", "--force", "--yes", f"{VG}/{lv}"]]
    out = {}
    for rpc in RPCS:
        t0 = time.monotonic()
        for argv in steps[rpc]:
            run(argv)
        out[rpc] = time.monotonic() - t0
    return out


def bare_cleanup(run: Callable[..., Any]) -> None:
    """Leftovers of an interrupted bare round (best effort, bench names only)."""
    script = f"""
import glob, os, subprocess, rtslib_fb as r
for t in list(r.FabricModule("iscsi").targets):
    if t.wwn.startswith("{BARE_IQN_PREFIX}:"):
        t.delete()
for so in list(r.RTSRoot().storage_objects):
    if so.name.startswith("{BARE_PREFIX}"):
        so.delete()
for mp in glob.glob("{BARE_EXPORT_ROOT}/*"):
    subprocess.run(["exportfs", "-u", "*:" + mp], capture_output=True)
    subprocess.run(["umount", mp], capture_output=True)
    os.rmdir(mp)
"""
    run(["python3", "-c", script], check=False)
    lvs = run(["lvs", "--noheadings", "-o", "lv_name", "--select", f"lv_name=~{BARE_PREFIX}", VG]).text.split()
    for lv in sorted(lvs, reverse=True):  # snapshots (-snap) before their origins
        run(["lvremove", "--force", "--yes", f"{VG}/{lv}"], check=False)


# --- report -----------------------------------------------------------------------------------------------


def median_ms(samples: Sequence[float]) -> float:
    return round(statistics.median(samples) * 1000)


def commands_summary(rounds: Sequence[list[tuple[str, float]]]) -> str:
    """'lvs ×5 (3.1 s), lvchange ×1 (0.9 s)': commands per RPC (median count and median total time per kind)."""
    kinds = sorted({kind for entries in rounds for kind, _ in entries})
    parts = []
    for kind in kinds:
        counts = [sum(1 for k, _ in entries if k == kind) for entries in rounds]
        seconds = [sum(s for k, s in entries if k == kind) for entries in rounds]
        parts.append(f"{kind} ×{statistics.median(counts):g} ({statistics.median(seconds):.2f} s)")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--attach", action="store_true", help="use the lab of `python -m lab up`")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--protocols", default="iscsi,nfs")
    args = parser.parse_args(argv)
    log = install_command_log()
    protocols = args.protocols.split(",")
    berth: dict[str, dict[str, list[float]]] = {p: collections.defaultdict(list) for p in protocols}
    commands: dict[str, dict[str, list[list[tuple[str, float]]]]] = {
        p: collections.defaultdict(list) for p in protocols
    }
    bare: dict[str, dict[str, list[float]]] = {p: collections.defaultdict(list) for p in protocols}
    with lab_storage(args.attach) as (lab, host):
        service, config = lab_controller(host)
        runner = next(iter(service.backends.values())).pool.runner

        def typed(argv: list[str], **kwargs: Any) -> Any:
            """The bare side's commands: each its own ssh session, as an operator types them (stdin given, even
            empty, keeps a command off the runner's resident berth_host.py)."""
            return runner.run(argv, **{"input": b"", **kwargs})

        portals = config.backends["lab-iscsi"].iscsi.portals  # type: ignore[union-attr]
        bare_cleanup(typed)
        ssh_rtt = []
        for _ in range(5):
            t0 = time.monotonic()
            runner.run(["true"])
            ssh_rtt.append(time.monotonic() - t0)
        backend_of = {"iscsi": "lab-iscsi", "nfs": "lab-nfs"}
        try:
            for i in range(args.rounds):
                for protocol in protocols:
                    tag = f"{protocol}-{os.getpid()}-{i}"
                    measured = berth_round(service, backend_of[protocol], protocol, tag, log)
                    for rpc, (seconds, entries) in measured.items():
                        berth[protocol][rpc].append(seconds)
                        commands[protocol][rpc].append(entries)
                    for rpc, seconds in bare_round(typed, protocol, tag, portals).items():
                        bare[protocol][rpc].append(seconds)
                    log.take()
                print(f"[bench] round {i + 1}/{args.rounds} done", flush=True)
        finally:
            bare_cleanup(typed)
            runner.close()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "csi_driver"], cwd=REPO, capture_output=True, text=True)
    rows = []
    print(f"\nssh round trip (true): {median_ms(ssh_rtt)} ms; medians of {args.rounds} rounds\n")
    print("| protocol | RPC | Berth ms | bare ms | ratio | Berth's host commands |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for protocol in protocols:
        for rpc in RPCS:
            b, o = median_ms(berth[protocol][rpc]), median_ms(bare[protocol][rpc])
            summary = commands_summary(commands[protocol][rpc])
            rows.append({"protocol": protocol, "rpc": rpc, "berth_ms": b, "bare_ms": o, "ratio": round(b / o, 2),
                         "berth_samples": berth[protocol][rpc], "bare_samples": bare[protocol][rpc],
                         "commands": summary})  # fmt: skip
            print(f"| {protocol} | {rpc} | {b} | {o} | {b / o:.2f} | {summary} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "commit": commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
                "rounds": args.rounds,
                "ssh_rtt_ms": median_ms(ssh_rtt),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\n[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
