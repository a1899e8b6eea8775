"""The tiny VM (vm/guest.asm) under QEMU on a lab node, driven through vm/vmctl.py."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from lab.topology import Lab
from sanity.runner import SRC

VMCTL = f"python3 {SRC}/tests/handover/vm/vmctl.py"
GUEST_ASM = f"{SRC}/tests/handover/vm/guest.asm"


@dataclass
class VM:
    """The tiny VM (tests/handover/vm/guest.asm) under QEMU on one lab node, driven through vmctl.py."""

    lab: Lab
    node: str
    name: str

    def ctl(self, *args: str, timeout: float = 180) -> dict:
        result = self.lab.run(self.node, f"{VMCTL} {shlex.join(args)}", timeout=timeout + 30, check=False)
        if result.rc != 0:
            raise AssertionError(f"vmctl {' '.join(args)} on {self.node}: {result.stderr.strip()} {result.stdout}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def start(self, disk: str, incoming: int | None = None) -> dict:
        return self.ctl("start", self.name, disk, *(["--incoming", str(incoming)] if incoming else []))

    def wait(self, gen: int, timeout: float = 300) -> dict:
        return self.ctl("wait", self.name, "--gen", str(gen), "--timeout", str(timeout), timeout=timeout)

    def serial(self) -> dict:
        return self.ctl("serial", self.name)

    def serial_text(self) -> str:
        return self.lab.run(self.node, f"cat /run/berth-vm/{self.name}/serial.log 2>/dev/null; true").stdout

    def migrate(self, uri: str, timeout: float = 300) -> dict:
        return self.ctl("migrate", self.name, uri, "--timeout", str(timeout), timeout=timeout)

    def qmp(self, command: str, arguments: dict | None = None):
        return self.ctl("qmp", self.name, command, json.dumps(arguments or {}))

    def quit(self) -> None:
        self.lab.run(self.node, f"{VMCTL} quit {self.name}", check=False, timeout=60)


def install_guest(lab: Lab, node: str, disk: str) -> None:
    """Assemble guest.asm in the node (nasm is in the lab image) and write it as the disk's boot sector."""
    image = "/run/berth-vm-guest.img"
    result = lab.run(node, f"command -v nasm && command -v qemu-system-x86_64 && nasm -f bin -o {image} {GUEST_ASM} "
                           f"&& dd if={image} of={disk} bs=512 count=1 oflag=direct conv=notrunc status=none",
                     check=False)  # fmt: skip
    assert result.rc == 0, (
        f"building/writing the VM's boot sector on {node} failed (no nasm/qemu in the guests? `python -m lab down` "
        f"and `python -m lab up` rebuild the image): {result.stdout} {result.stderr}"
    )
