#!/usr/bin/env python3
"""Benchmark (issue #4): how LIO management scales with the number of exported volumes.

Berth drives LIO with ONE short `python3` + `rtslib_fb` process per operation on the storage host (the
source of csi_driver/storage/lio_host.py over SSH, request on stdin). The alternative, one `targetcli`
call per step, rebuilds targetcli's whole UI tree from configfs at every start. This script grows the
number of exported targets on the storage host stepwise (10, 50, 100, 200 by default) and, at each level:

- times Berth's own operations, through the classes the controller uses (SshRunner from a HostConfig,
  ThinPool, LioTargets/IscsiExporter built by csi_driver.assembly from the lab's backend config):
  export (target + TPG + LUN 0 + portals + save), publish (ControllerPublish: ensure export + ACL with
  LUN 0 mapped + save), unpublish (ACL removed + save), delete (target + backstore removed + save),
  and list_exports (the whole tree in one call);
- times the same kind of steps as one-shot targetcli calls (`targetcli /iscsi create <iqn>`, `.../acls
  create|delete <initiator>`, `/iscsi delete`, `ls`, `saveconfig`) when targetcli is on the host;
  otherwise only the rtslib tree probe below stands in for "reload the whole tree per call";
- probes the cost of walking the whole tree with rtslib (`RTSRoot().dump()`, what every save does);
- records the SSH round trip (`true`) as the floor under every remote call.

It prints a table (median / p90 per operation, in seconds) and writes JSON to
artifacts/bench/lio_many_volumes.json (after every level, so an interrupted run keeps what it measured).
Everything it creates (thin LVs `bench-lio-*` of 4 MiB, targets under iqn.2026-11.io.berth.bench) is
removed at the end, also after an error, Ctrl-C or SIGTERM, and leftovers of an earlier run are removed at
the start. Not a test: nothing is asserted about the times.

    python -m lab up
    .venv/bin/python bench/lio_many_volumes.py --max 200

By default it reaches the storage guest of the running lab from this machine (ssh to the guest's port
forward with the lab's key) and takes VG, pool and portals from sanity/berth-lab.yaml. `--config FILE
--backend NAME` measures a real storage host from a Berth config instead (iSCSI backend, its own host).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from csi_driver.assembly import build_exporter, build_runner  # noqa: E402
from csi_driver.config import BackendConfig, HostConfig, load_config  # noqa: E402
from csi_driver.storage import tags as meta_keys  # noqa: E402
from csi_driver.storage.backend import KEY_BACKEND, KIND_VOLUME, NodeRef  # noqa: E402
from csi_driver.storage.errors import StorageError  # noqa: E402
from csi_driver.storage.iscsi import IscsiExporter  # noqa: E402
from csi_driver.storage.lio import LioTargets, host_program  # noqa: E402
from csi_driver.storage.lvm import LvInfo, ThinPool  # noqa: E402
from csi_driver.storage.runner import CommandRunner, last_json_object  # noqa: E402

LAB_CONFIG = REPO / "sanity" / "berth-lab.yaml"
LAB_BACKEND = "lab-iscsi"
DEFAULT_OUT = REPO / "artifacts" / "bench" / "lio_many_volumes.json"
LEVELS = (10, 50, 100, 200)

# Everything the bench creates is recognisable by these, so clean-up never touches anything else.
BENCH_IQN_PREFIX = "iqn.2026-11.io.berth.bench"
LV_PREFIX = "bench-lio-"
BENCH_BACKEND = "bench-lio"
LV_BYTES = 4 << 20
INITIATOR = "iqn.2026-11.io.berth.bench:initiator-a"
FILL_BATCH = 50  # export ops per host process when growing the background population

BERTH_OPS = ("export", "publish", "unpublish", "delete", "list_exports")
TARGETCLI_OPS = ("create", "acl_add", "acl_delete", "delete", "ls", "saveconfig")

# Measurement probe, not storage logic: the time rtslib needs to walk the whole tree (what save_to_file does).
TREE_PROBE = """
import json, time
t0 = time.monotonic()
import rtslib_fb
t1 = time.monotonic()
d = rtslib_fb.RTSRoot().dump()
t2 = time.monotonic()
print(json.dumps({"import_s": t1 - t0, "dump_s": t2 - t1, "targets": len(d.get("targets", [])),
                  "storage_objects": len(d.get("storage_objects", []))}))
"""


class Interrupted(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted(f"signal {signum}")


# --- statistics -----------------------------------------------------------------------------------------


def summary(samples: Sequence[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    # p90 by nearest rank: with 3-5 samples it is the largest or second largest.
    p90 = ordered[min(len(ordered) - 1, max(0, -(-9 * len(ordered) // 10) - 1))]
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 4),
        "p90": round(p90, 4),
        "min": round(ordered[0], 4),
        "max": round(ordered[-1], 4),
        "samples": [round(s, 4) for s in samples],
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    result = fn()
    return time.monotonic() - t0, result


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- the storage host, through Berth's own classes -------------------------------------------------------


@dataclasses.dataclass
class Storage:
    runner: CommandRunner
    pool: ThinPool
    exporter: IscsiExporter
    where: str
    jobs: int = 2
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def targets(self) -> LioTargets:
        return self.exporter.targets

    def close(self) -> None:
        self.runner.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def lab_host() -> tuple[HostConfig, tempfile.TemporaryDirectory, str]:
    """A HostConfig reaching the lab's storage guest from this machine, as lab/ssh.py does it: ssh to the
    guest's port forward on 127.0.0.1 as root with the image's key. The guest's host key is the image's,
    new at every run: a private known-hosts file with accept-new."""
    from lab.topology import Lab

    lab = Lab.attach()
    guest = lab.guests.get("storage")
    if guest is None or not guest.alive():
        raise SystemExit("the lab's storage guest is not running (python -m lab up)")
    tmp = tempfile.TemporaryDirectory(prefix="berth-bench-")
    host = HostConfig(
        address="127.0.0.1",
        ssh_port=guest.spec.ssh_port,
        ssh_identity_file=str(lab.image / "id_ed25519"),
        ssh_known_hosts_file=str(Path(tmp.name) / "known_hosts"),
        ssh_strict_host_key_checking="accept-new",
    )
    return host, tmp, f"lab storage guest (127.0.0.1:{guest.spec.ssh_port}, qemu TCG)"


def connect(args: argparse.Namespace) -> Storage:
    tmp = None
    if args.config:
        config = load_config(args.config)
        backend: BackendConfig = config.backends[args.backend]
        where = f"{backend.host.address} (backend {args.backend} of {args.config})"
    else:
        config = load_config(LAB_CONFIG)
        host, tmp, where = lab_host()
        backend = dataclasses.replace(config.backends[LAB_BACKEND], host=host)
    if backend.protocol != "iscsi" or backend.iscsi is None:
        raise SystemExit(f"backend {args.backend or LAB_BACKEND} is not an iSCSI backend")
    # Own IQN prefix: list_exports and clean-up then only ever see the bench's targets.
    backend = dataclasses.replace(backend, iscsi=dataclasses.replace(backend.iscsi, iqn_prefix=BENCH_IQN_PREFIX))
    runner = build_runner(backend.host)
    exporter = build_exporter(backend, runner)
    assert isinstance(exporter, IscsiExporter)
    pool = ThinPool(runner, backend.lvm.volume_group, backend.lvm.thin_pool)
    return Storage(runner, pool, exporter, where, jobs=args.jobs, _tmp=tmp)


def parallel(jobs: int, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    if jobs <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(jobs) as ex:
        return list(ex.map(fn, items))


def lv_name(index: int) -> str:
    return f"{LV_PREFIX}{index:04d}"


def create_lvs(st: Storage, names: Sequence[str]) -> tuple[list[LvInfo], list[float]]:
    def one(name: str) -> tuple[float, LvInfo]:
        meta = {
            meta_keys.KEY_NAME: name,
            meta_keys.KEY_KIND: KIND_VOLUME,
            meta_keys.KEY_STATE: meta_keys.STATE_READY,
            KEY_BACKEND: BENCH_BACKEND,
        }
        return timed(lambda: st.pool.create_volume(name, LV_BYTES, meta))

    results = parallel(st.jobs, one, list(names))
    return [info for _, info in results], [t for t, _ in results]


def export_batch(st: Storage, lvs: Sequence[LvInfo]) -> None:
    """Export many volumes in one host process per FILL_BATCH (background population, not measured).

    LioTargets.run_ops with the export ops LioTargets itself builds: the same host program and the same
    op as LioTargets.export, only several per process so growing to 200 targets takes seconds, not minutes.
    """
    for part in chunks(lvs, FILL_BATCH):
        ops = [st.targets._export_op(lv.name, lv.device_path, st.exporter.portals, unmap=True) for lv in part]
        st.targets.run_ops(ops, save=True)


def cleanup(st: Storage, quiet: bool = False) -> dict[str, int]:
    """Remove every bench target and bench LV (idempotent; safe after a crash or Ctrl-C).

    Targets first (an exported LV is held open by LIO), in batches of unexport ops (the op
    LioTargets.unexport sends); then the LVs with ThinPool.remove.
    """
    removed = {"targets": 0, "lvs": 0}
    exports = st.targets.list_exports()  # only targets under BENCH_IQN_PREFIX
    for part in chunks([e.volume for e in exports], FILL_BATCH):
        ops = [{"op": "unexport", "volume": v, "target": st.targets.target_for(v)} for v in part]
        st.targets.run_ops(ops, save=True)
    removed["targets"] = len(exports)
    lvs = [i.name for i in st.pool.list(managed_only=False) if i.name.startswith(LV_PREFIX)]
    parallel(st.jobs, st.pool.remove, lvs)
    removed["lvs"] = len(lvs)
    if not quiet and (removed["targets"] or removed["lvs"]):
        print(f"   removed {removed['targets']} bench targets and {removed['lvs']} bench LVs", flush=True)
    return removed


def cleanup_retrying(st: Storage) -> None:
    # A Ctrl-C also hits the ssh children of an in-flight clean-up command: retry a few times.
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        for attempt in range(3):
            try:
                cleanup(st)
                return
            except (StorageError, OSError) as e:
                print(f"   clean-up attempt {attempt + 1} failed: {e}", file=sys.stderr, flush=True)
                time.sleep(2)
        print(
            f"!! clean-up incomplete: remove targets {BENCH_IQN_PREFIX}:* and LVs {LV_PREFIX}* by hand "
            f"(or run this script with --cleanup-only)",
            file=sys.stderr,
        )
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


# --- measurements -----------------------------------------------------------------------------------------


def measure_berth(st: Storage, lvs: Sequence[LvInfo], list_samples: int) -> dict[str, list[float]]:
    """One full life cycle per measurement volume: export, publish, unpublish, delete."""
    node = NodeRef(node_id=f"{INITIATOR}|198.18.0.99", initiator=INITIATOR, addresses=("198.18.0.99",))
    out: dict[str, list[float]] = {op: [] for op in BERTH_OPS}
    for lv in lvs:
        t, _ = timed(lambda lv=lv: st.targets.export(lv.name, lv.device_path, st.exporter.portals))
        out["export"].append(t)
        t, _ = timed(lambda lv=lv: st.exporter.publish(lv, node, False, {}))
        out["publish"].append(t)
        t, _ = timed(lambda lv=lv: st.exporter.unpublish(lv, node))
        out["unpublish"].append(t)
        t, _ = timed(lambda lv=lv: st.exporter.teardown(lv))
        out["delete"].append(t)
    for _ in range(list_samples):
        t, _ = timed(st.targets.list_exports)
        out["list_exports"].append(t)
    return out


def targetcli_present(st: Storage) -> bool:
    return st.runner.run(["sh", "-c", "command -v targetcli"], check=False).rc == 0


def measure_targetcli(st: Storage, samples: int) -> dict[str, list[float]]:
    """The same kind of steps as one-shot targetcli calls; each call loads the whole tree first.

    One-shot targetcli does not save (only its interactive exit does), so persisting costs one more call:
    `saveconfig`, timed separately.
    """
    out: dict[str, list[float]] = {op: [] for op in TARGETCLI_OPS}

    def tcli(op: str, *argv: str) -> None:
        t, _ = timed(lambda: st.runner.run(["targetcli", *argv], timeout=600))
        out[op].append(t)

    for i in range(samples):
        iqn = f"{BENCH_IQN_PREFIX}:tcli-{i}"
        acls = f"/iscsi/{iqn}/tpg1/acls"
        tcli("create", "/iscsi", "create", iqn)
        tcli("acl_add", acls, "create", INITIATOR)
        tcli("acl_delete", acls, "delete", INITIATOR)
        tcli("delete", "/iscsi", "delete", iqn)
        tcli("ls", "ls")
        tcli("saveconfig", "saveconfig")
    return out


def measure_probe(st: Storage, samples: int) -> dict[str, Any]:
    wall, dump, imp = [], [], []
    counts: dict[str, int] = {}
    for _ in range(samples):
        t, res = timed(lambda: st.runner.run([st.targets.python, "-c", TREE_PROBE], timeout=600))
        doc = last_json_object(res.text) or {}
        wall.append(t)
        dump.append(float(doc.get("dump_s", 0.0)))
        imp.append(float(doc.get("import_s", 0.0)))
        counts = {"lio_targets": int(doc.get("targets", 0)), "lio_storage_objects": int(doc.get("storage_objects", 0))}
    return {"rtslib_tree_walk_call": wall, "rtslib_dump_in_process": dump, "rtslib_import": imp, **counts}


def measure_floor(st: Storage, samples: int) -> list[float]:
    return [timed(lambda: st.runner.run(["true"]))[0] for _ in range(samples)]


# --- report -----------------------------------------------------------------------------------------------


def fmt(s: dict[str, Any]) -> str:
    return f"{s['median']:.2f}/{s['p90']:.2f}" if s.get("n") else "-"


def print_table(levels: list[dict[str, Any]], with_targetcli: bool) -> None:
    cols = [("berth", op) for op in BERTH_OPS]
    if with_targetcli:
        cols += [("targetcli", op) for op in TARGETCLI_OPS]
    cols += [("probe", "rtslib_tree_walk_call"), ("probe", "rtslib_dump_in_process"), ("probe", "ssh_true")]
    heads = ["N", "LIO tgts"] + [f"{'tcli ' if g == 'targetcli' else ''}{op}" for g, op in cols]
    rows = []
    for lv in levels:
        row = [str(lv["n"]), str(lv.get("lio_targets", "?"))]
        row += [fmt(lv.get(g, {}).get(op, {})) for g, op in cols]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    print("\nseconds per call, median/p90 (wall time seen by the controller, SSH included)")
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


# --- main -------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max", type=int, default=200, help="largest number of exported volumes (default 200)")
    p.add_argument(
        "--levels",
        default=",".join(map(str, LEVELS)),
        help="population steps, comma-separated (default 10,50,100,200; capped by --max)",
    )
    p.add_argument("--samples", type=int, default=5, help="Berth life cycles timed per level (default 5)")
    p.add_argument("--targetcli-samples", type=int, default=3, help="targetcli rounds per level (default 3, 0: skip)")
    p.add_argument("--jobs", type=int, default=2, help="parallel LV creations/removals while setting up (default 2)")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)})"
    )
    p.add_argument("--config", help="a Berth config file: measure its backend's host instead of the lab")
    p.add_argument("--backend", help="the iSCSI backend of --config to use")
    p.add_argument(
        "--budget-min",
        type=float,
        default=15,
        help="skip the next level when it would end after this many minutes (default 15)",
    )
    p.add_argument("--cleanup-only", action="store_true", help="remove what an interrupted run left, then exit")
    args = p.parse_args(argv)
    if bool(args.config) != bool(args.backend):
        p.error("--config and --backend go together")
    levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    args.level_list = [n for n in levels if 0 < n <= args.max] or [args.max]
    return args


def run(st: Storage, args: argparse.Namespace) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "benchmark": "lio_many_volumes",
        "issue": 4,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "storage": st.where,
        "commit": git_commit(),
        # The host program actually sent (the working tree's, which may differ from the commit).
        "lio_host_sha256": hashlib.sha256(host_program().encode()).hexdigest()[:16],
        "controller_host": {"machine": platform.machine(), "python": platform.python_version()},
        "units": "seconds per call, wall time seen by the controller (SSH round trip included)",
        "samples_per_level": {"berth": args.samples, "targetcli": args.targetcli_samples},
        "levels": [],
        "setup": {},
    }
    print(f"== storage host: {st.where}", flush=True)
    leftovers = cleanup(st)
    doc["setup"]["leftovers_removed"] = leftovers
    has_tcli = targetcli_present(st)
    doc["targetcli_present"] = has_tcli
    if not has_tcli:
        print("   targetcli is not installed on the storage host: measuring only the rtslib tree walk", flush=True)
    tcli_samples = args.targetcli_samples if has_tcli else 0

    # Measurement volumes (their targets come and go during each level), then the background population.
    t0 = time.monotonic()
    measure_lvs, lv_times = create_lvs(st, [lv_name(9000 + i) for i in range(args.samples)])
    background: list[LvInfo] = []
    fill_times: list[dict[str, Any]] = []
    for n in args.level_list:
        step_t0 = time.monotonic()
        need = n - len(background)
        if doc["levels"]:
            prev, fill = doc["levels"][-1], fill_times[-1]
            guess = prev["measure_s"] * n / prev["n"] + (prev["step_s"] - prev["measure_s"]) * need / fill["added"]
            if step_t0 - t0 + guess > args.budget_min * 60:
                print(
                    f"\n== N={n} skipped: would take ~{guess:.0f}s more, over --budget-min {args.budget_min}",
                    flush=True,
                )
                doc["skipped_levels"] = [m for m in args.level_list if m >= n]
                break
        print(f"\n== N={n}: creating {need} thin LVs and exports", flush=True)
        new_lvs, times = create_lvs(st, [lv_name(len(background) + i) for i in range(need)])
        lv_times += times
        t_lv = time.monotonic() - step_t0
        t_exp, _ = timed(lambda new_lvs=new_lvs: export_batch(st, new_lvs))
        background += new_lvs
        fill_times.append({"n": n, "added": need, "lv_create_s": round(t_lv, 2), "export_batched_s": round(t_exp, 2)})
        print(f"   {need} LVs in {t_lv:.1f}s, exported in {t_exp:.1f}s (batches of {FILL_BATCH})", flush=True)

        level: dict[str, Any] = {"n": n}
        m_t0 = time.monotonic()
        berth = measure_berth(st, measure_lvs, list_samples=2)
        level["berth"] = {op: summary(v) for op, v in berth.items()}
        print("   berth: " + ", ".join(f"{op} {fmt(level['berth'][op])}" for op in BERTH_OPS), flush=True)
        if tcli_samples:
            tcli = measure_targetcli(st, tcli_samples)
            level["targetcli"] = {op: summary(v) for op, v in tcli.items()}
            tcli_line = ", ".join(f"{op} {fmt(level['targetcli'][op])}" for op in TARGETCLI_OPS)
            print(f"   targetcli: {tcli_line}", flush=True)
        probe = measure_probe(st, 3)
        level["lio_targets"] = probe.pop("lio_targets", None)
        level["lio_storage_objects"] = probe.pop("lio_storage_objects", None)
        level["probe"] = {k: summary(v) for k, v in probe.items()}
        level["probe"]["ssh_true"] = summary(measure_floor(st, 5))
        walk, in_proc = level["probe"]["rtslib_tree_walk_call"], level["probe"]["rtslib_dump_in_process"]
        floor = level["probe"]["ssh_true"]
        print(
            f"   rtslib tree walk {fmt(walk)} (in process {fmt(in_proc)}), ssh floor {fmt(floor)}, "
            f"LIO targets {level['lio_targets']}",
            flush=True,
        )
        level["measure_s"] = round(time.monotonic() - m_t0, 1)
        level["step_s"] = round(time.monotonic() - step_t0, 1)
        doc["levels"].append(level)
        doc["setup"].update(lv_create=summary(lv_times), fill=fill_times, elapsed_s=round(time.monotonic() - t0, 1))
        write_json(args.out, doc)
        print(f"   level done in {level['step_s']:.0f}s", flush=True)
    print_table(doc["levels"], with_targetcli=bool(tcli_samples))
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    st = connect(args)
    status = 0
    t0 = time.monotonic()
    try:
        if args.cleanup_only:
            cleanup(st)
            return 0
        run(st, args)
        print(f"\nwrote {args.out}", flush=True)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\n!! interrupted ({e or 'Ctrl-C'}): cleaning up", file=sys.stderr, flush=True)
        status = 130
    except Exception:
        print("\n!! failed: cleaning up", file=sys.stderr, flush=True)
        raise
    finally:
        if not args.cleanup_only:
            t_clean, _ = timed(lambda: cleanup_retrying(st))
            print(f"== clean-up {t_clean:.1f}s; total {time.monotonic() - t0:.0f}s", flush=True)
        st.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
