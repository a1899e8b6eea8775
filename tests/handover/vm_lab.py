"""The tiny VM (vm/guest.asm) under QEMU on a lab node, driven through vm/vmctl.py."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import PurePath

from lab.topology import Lab
from sanity.runner import SRC
from tests.handover.vm.pattern import parse_serial

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


def assemble_guest(lab: Lab, node: str, image: str = "/run/berth-vm-guest.img") -> str:
    """Assemble guest.asm in the node (nasm is in the lab image) into `image`, the boot sector; returns its path."""
    result = lab.run(node, f"command -v nasm && mkdir -p {shlex.quote(str(PurePath(image).parent))} && "
                           f"nasm -f bin -o {shlex.quote(image)} {GUEST_ASM}", check=False)  # fmt: skip
    assert result.rc == 0, (
        f"assembling the VM's boot sector on {node} failed (no nasm in the guests? `python -m lab down` "
        f"and `python -m lab up` rebuild the image): {result.stdout} {result.stderr}"
    )
    return image


def install_guest(lab: Lab, node: str, disk: str) -> None:
    """Assemble guest.asm in the node and write it as the disk's boot sector."""
    image = assemble_guest(lab, node)
    result = lab.run(node, f"command -v qemu-system-x86_64 && dd if={image} of={disk} bs=512 count=1 oflag=direct "
                           "conv=notrunc status=none", check=False)  # fmt: skip
    assert result.rc == 0, f"writing the VM's boot sector on {node} failed: {result.stdout} {result.stderr}"


def final_state(lab: Lab, source: VM, target: VM, disk: str) -> tuple[dict, dict]:
    """Stop the migrated VM, then (the joined serial logs of both, the disk's regions read on the target's node).

    `stop` drains the VM's in-flight I/O, so the disk is still when it is read (with O_DIRECT, from the storage)."""
    target.qmp("stop")
    joined = parse_serial(source.serial_text() + target.serial_text())
    regions = json.loads(lab.run(target.node, f"python3 {SRC}/tests/handover/vm/pattern.py {shlex.quote(disk)}").stdout)
    return joined, regions


def consecutive(gens: list[int]) -> bool:
    return gens == list(range(1, len(gens) + 1))


def assert_verified(joined: dict, regions: dict) -> None:
    """One boot, generations 1..N in order with no error across both hosts, and the disk holds generation N (or
    the next one, written but not yet verified) and the boot-time sectors."""
    assert joined["boots"] == 1 and not joined["errors"], joined
    assert consecutive(joined["generations"]), f"generations not 1..N in order: {joined['generations']}"
    last = joined["generations"][-1]
    on_disk = regions["data"]
    assert None not in on_disk, f"sectors without a valid pattern: {on_disk}"
    assert set(on_disk) <= {last, last + 1}, f"disk holds {set(on_disk)}, last verified generation {last}"
    assert regions["keep"] == [0] * len(regions["keep"]), f"the boot-time sectors changed: {regions['keep']}"
