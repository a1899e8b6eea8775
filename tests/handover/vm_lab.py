"""Hand-over test helpers: attach a Berth volume to a node as a VM pod would, run the tiny VM (vm/vmctl.py)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from lab.topology import Lab
from sanity.runner import SRC
from tests.berth_lab.conftest import Berth, staging_path

VMCTL = f"python3 {SRC}/tests/handover/vm/vmctl.py"
GUEST_ASM = f"{SRC}/tests/handover/vm/guest.asm"


def publish_path(volume: dict) -> str:
    return "/var/lib/berth-test/publish/" + volume["volume_id"].replace("/", "_")


def attach(driver: Berth, volume: dict, node: str, capability: dict) -> str:
    """ControllerPublish + NodeStage + NodePublish on `node`: the path a VM opens (a block device file)."""
    published = driver.publish(volume, node, capability)
    assert published.ok, f"ControllerPublishVolume {node}: {published.body}"
    staged = driver.stage(volume, node, capability, published.body.get("publish_context", {}))
    assert staged.ok, f"NodeStageVolume {node}: {staged.body}"
    target = publish_path(volume)
    driver.lab.run(node, "mkdir -p /var/lib/berth-test/publish")
    driver.must(node, "Node.NodePublishVolume",
                {"volume_id": volume["volume_id"], "staging_target_path": staging_path(volume),
                 "target_path": target, "volume_capability": capability,
                 "publish_context": published.body.get("publish_context", {}),
                 "volume_context": volume.get("volume_context", {})})  # fmt: skip
    return target


def detach(driver: Berth, volume: dict, node: str) -> list[str]:
    """NodeUnpublish + NodeUnstage + ControllerUnpublish; the failures (as text), empty when all succeeded."""
    failures = []
    for rpc, answer in (
        ("NodeUnpublishVolume", driver.call(node, "Node.NodeUnpublishVolume",
                                            {"volume_id": volume["volume_id"], "target_path": publish_path(volume)})),
        ("NodeUnstageVolume", driver.unstage(volume, node)),
        ("ControllerUnpublishVolume", driver.unpublish(volume, node)),
    ):  # fmt: skip
        if not answer.ok:
            failures.append(f"{rpc} {node}: {answer.body}")
    return failures


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
