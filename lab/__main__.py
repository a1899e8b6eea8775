"""CLI: python -m lab build|up|down|status|sync|ssh NODE|run NODE -- CMD|link NODE LINK on|off|collect DIR."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from lab import config, image
from lab.cluster import ClusterError
from lab.topology import Lab, LabError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    p.add_argument("--run-dir", type=Path, default=config.RUN_DIR, help="lab state directory (%(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the guest image (or reuse the cached one)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    sub.add_parser("image", help="print the cache directory of the current image inputs")
    sub.add_parser("prune", help="remove cached images that are neither current nor used by a lab")
    u = sub.add_parser("up", help="start storage + nodes, wait until all are ready")
    u.add_argument("--nodes", type=int, default=2)
    u.add_argument("--keep", action="store_true", help="keep guest disks from the previous run (no fresh overlay)")
    u.add_argument("--no-sync", action="store_true", help="do not copy the working tree into the guests")
    u.add_argument("--kubernetes", action="store_true", help="also run a Kubernetes cluster (docs/kubernetes.md)")
    k = sub.add_parser("kubectl", help="kubectl against the lab cluster: kubectl get nodes")
    k.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("kubeconfig", help="print the path of the lab cluster's admin kubeconfig")
    d = sub.add_parser("down", help="stop all guests and remove the run state")
    d.add_argument("--keep", action="store_true", help="keep guest disks for a later `up --keep`")
    sub.add_parser("status", help="guests, pids, ports, RSS")
    sub.add_parser("sync", help="copy the working tree into the guests again (/opt/berth/src)")
    s = sub.add_parser("ssh", help="interactive shell (or a command) in a guest")
    s.add_argument("guest")
    s.add_argument("command", nargs=argparse.REMAINDER)
    r = sub.add_parser("run", help="run a command in a guest: run NODE -- CMD ...")
    r.add_argument("guest")
    r.add_argument("command", nargs=argparse.REMAINDER)
    li = sub.add_parser("link", help="pull or restore a guest's data link: link node1 1 off")
    li.add_argument("guest")
    li.add_argument("link", type=int, choices=[0, 1])
    li.add_argument("state", choices=["on", "off"])
    c = sub.add_parser("collect", help="copy console logs and journals of all guests into DIR")
    c.add_argument("dest", type=Path)
    a = p.parse_args(argv)

    try:
        if a.cmd == "build":
            print(image.ensure_image(force=a.force))
        elif a.cmd == "image":
            print(image.image_dir())
        elif a.cmd == "prune":
            # Images still used by a lab (any run directory's state.json) are kept.
            states = [config.RUN_DIR / "state.json", *(config.LAB_DIR / "run").glob("*/state.json")]
            used = {Path(json.loads(p.read_text())["image"]).resolve() for p in states if p.exists()}
            for d in image.prune(used):
                print(f"removed {d}")
        elif a.cmd == "up":
            lab = Lab(a.run_dir, nodes=a.nodes, keep=a.keep, kubernetes=a.kubernetes)
            timings = lab.up(sync=not a.no_sync)
            print(json.dumps({"timings": timings, "guests": lab.status()}, indent=2))
        elif a.cmd == "down":
            if (a.run_dir / "state.json").exists():
                Lab.attach(a.run_dir).down(keep_disks=a.keep)
        elif a.cmd == "status":
            lab = Lab.attach(a.run_dir)
            st = lab.status()
            print(
                json.dumps(
                    {
                        "run_dir": str(lab.run_dir),
                        "image": str(lab.image),
                        "guests": st,
                        "rss_total_mib": sum(g["rss_mib"] for g in st.values()),
                        "timings": lab.timings,
                    },
                    indent=2,
                )
            )
            return 0 if all(g["alive"] for g in st.values()) else 1
        elif a.cmd in ("kubectl", "kubeconfig"):
            lab = Lab.attach(a.run_dir)
            if not lab.cluster:
                raise LabError("this lab runs no Kubernetes (start it with `python -m lab up --kubernetes`)")
            cp = lab.cluster.control_plane
            if a.cmd == "kubeconfig":
                print(cp.admin_kubeconfig)
                return 0
            os.execv(cp.bin / "kubectl", ["kubectl", f"--kubeconfig={cp.admin_kubeconfig}", *a.args])
        elif a.cmd == "sync":
            Lab.attach(a.run_dir).sync()
        elif a.cmd in ("ssh", "run"):
            lab = Lab.attach(a.run_dir)
            cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
            if a.cmd == "run" and not cmd:
                p.error("run needs a command: run NODE -- CMD")
            # One argument is a shell command line (`run node1 -- 'dmesg | tail'`); several are quoted words.
            line = (cmd[0] if len(cmd) == 1 else shlex.join(cmd)) if cmd else None
            argv_ = lab.ssh(a.guest).argv(line, tty=not cmd and sys.stdin.isatty())
            sys.stdout.flush()
            os.execvp(argv_[0], argv_)  # hand the terminal to ssh; its exit code is ours
        elif a.cmd == "link":
            Lab.attach(a.run_dir).set_link(a.guest, a.link, a.state == "on")
        elif a.cmd == "collect":
            print(Lab.attach(a.run_dir).collect(a.dest))
    except (LabError, ClusterError, image.BuildError) as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
