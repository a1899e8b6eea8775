"""Run the tiny VM (guest.asm) with QEMU and drive it through QMP: what the hand-over test does on each node.

Standard library only (runs inside the lab nodes with python3, and on the host for the quick local test).
State lives in one directory per VM name (default /run/berth-vm/NAME): serial log, QMP socket, pid file.

    vmctl.py start NAME DISK [--incoming PORT]     qemu -daemonize; the VM boots from DISK (or waits for a migration)
    vmctl.py wait NAME --gen G [--timeout S]       until the serial log shows generation G verified (or an error)
    vmctl.py serial NAME                           the parsed serial log (JSON)
    vmctl.py migrate NAME URI [--timeout S]        QMP migrate + poll query-migrate until completed (JSON stats)
    vmctl.py qmp NAME COMMAND [JSON-ARGS]          any QMP command (JSON answer)
    vmctl.py quit NAME                             QMP quit, then wait for the process to end
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pattern import parse_serial  # noqa: E402

ROOT = Path(os.environ.get("BERTH_VM_DIR", "/run/berth-vm"))
QEMU = os.environ.get("BERTH_VM_QEMU", "qemu-system-x86_64")


class VMError(RuntimeError):
    pass


def vm_dir(name: str) -> Path:
    return ROOT / name


def qemu_argv(name: str, disk: str, incoming: int | None = None, daemonize: bool = True) -> list[str]:
    """The same argv on source and target (a migration needs identical devices); only -incoming differs.
    A launcher pod (tests/k8s/test_migration.py) runs it with daemonize=False: qemu is its container's process."""
    d = vm_dir(name)
    argv = [
        QEMU, "-name", f"berth-vm-{name}", "-accel", "tcg", "-machine", "pc", "-nodefaults", "-no-user-config",
        "-m", "16", "-display", "none",
        # cache=none: O_DIRECT on the volume, so what the VM wrote on one node is what the other node reads.
        "-drive", f"file={disk},format=raw,if=virtio,cache=none",
        "-serial", f"file:{d / 'serial.log'}",
        "-qmp", f"unix:{d / 'qmp.sock'},server=on,wait=off",
        "-pidfile", str(d / "qemu.pid"),
    ]  # fmt: skip
    if daemonize:
        argv.append("-daemonize")
    if incoming is not None:
        argv += ["-incoming", f"tcp:0.0.0.0:{incoming}"]
    return argv


def start(name: str, disk: str, incoming: int | None) -> dict:
    d = vm_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    for f in ("serial.log", "qmp.sock", "qemu.pid"):
        (d / f).unlink(missing_ok=True)
    argv = qemu_argv(name, disk, incoming)
    started = time.time()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise VMError(f"qemu failed (rc {result.returncode}): {result.stderr.strip()}")
    return {"pid": pid(name), "started": started, "argv": argv}


def pid(name: str) -> int | None:
    try:
        return int((vm_dir(name) / "qemu.pid").read_text())
    except (OSError, ValueError):
        return None


def alive(name: str) -> bool:
    p = pid(name)
    if p is None:
        return False
    try:
        os.kill(p, 0)
    except ProcessLookupError:
        return False
    return True


class QMP:
    def __init__(self, name: str, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(vm_dir(name) / "qmp.sock"))
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise VMError("QMP connection closed")
            message = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, arguments: dict | None = None):
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        answer = self._read()
        if "error" in answer:
            raise VMError(f"QMP {command}: {answer['error']}")
        return answer.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def serial(name: str) -> dict:
    path = vm_dir(name) / "serial.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return {**parse_serial(text), "alive": alive(name)}


def wait(name: str, gen: int, timeout: float) -> dict:
    """Poll the serial log (in this process: a shell loop would slow the nested VM) until generation `gen`."""
    deadline = time.monotonic() + timeout
    # A launcher pod's container runs before its QEMU has written the pidfile: a VM without one yet is starting.
    starting_until = time.monotonic() + min(timeout, 60)
    started = time.time()
    while True:
        state = serial(name)
        gens = state["generations"]
        gone = not state["alive"] and (pid(name) is not None or time.monotonic() > starting_until)
        if state["errors"] or (gens and gens[-1] >= gen) or gone:
            return {**state, "waited": round(time.time() - started, 2)}
        if time.monotonic() > deadline:
            raise VMError(f"{name}: generation {gen} not reached in {timeout:.0f}s (last {gens[-1:]}, {state})")
        time.sleep(0.5)


def migrate(name: str, uri: str, timeout: float) -> dict:
    qmp = QMP(name)
    try:
        qmp.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + timeout
        while True:
            info = qmp.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                qmp.execute("migrate_cancel")
                raise VMError(f"{name}: migration to {uri} not done in {timeout:.0f}s: {info}")
            time.sleep(0.2)
        if info["status"] != "completed":
            raise VMError(f"{name}: migration to {uri} {info['status']}: {info}")
        status = qmp.execute("query-status")
        return {**info, "source_status": status.get("status")}
    finally:
        qmp.close()


def quit_vm(name: str, timeout: float = 30) -> dict:
    p = pid(name)
    if p is None or not alive(name):
        return {"quit": False}
    try:
        qmp = QMP(name)
        try:
            qmp.execute("quit")
        finally:
            qmp.close()
    except (OSError, VMError):
        os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(name):
        if time.monotonic() > deadline:
            os.kill(p, signal.SIGKILL)
            break
        time.sleep(0.1)
    return {"quit": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start")
    p.add_argument("name")
    p.add_argument("disk")
    p.add_argument("--incoming", type=int)
    p = sub.add_parser("wait")
    p.add_argument("name")
    p.add_argument("--gen", type=int, required=True)
    p.add_argument("--timeout", type=float, default=120)
    p = sub.add_parser("serial")
    p.add_argument("name")
    p = sub.add_parser("migrate")
    p.add_argument("name")
    p.add_argument("uri")
    p.add_argument("--timeout", type=float, default=120)
    p = sub.add_parser("qmp")
    p.add_argument("name")
    p.add_argument("qmp_command")
    p.add_argument("arguments", nargs="?", default="{}")
    p = sub.add_parser("quit")
    p.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "start":
        out = start(args.name, args.disk, args.incoming)
    elif args.command == "wait":
        out = wait(args.name, args.gen, args.timeout)
    elif args.command == "serial":
        out = serial(args.name)
    elif args.command == "migrate":
        out = migrate(args.name, args.uri, args.timeout)
    elif args.command == "qmp":
        qmp = QMP(args.name)
        try:
            out = qmp.execute(args.qmp_command, json.loads(args.arguments))
        finally:
            qmp.close()
    else:
        out = quit_vm(args.name)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VMError as e:
        print(f"vmctl: {e}", file=sys.stderr)
        sys.exit(1)
