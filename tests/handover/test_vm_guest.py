"""The tiny VM on this host (no lab): it boots, verifies its generations, reports a corrupted sector, and survives a
live migration between two QEMU processes over loopback. Quick (~10 s); needs nasm and qemu-system-x86_64."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.handover.vm.pattern import COUNT, DATA_LBA, KEEP_LBA, SECTOR, parse_serial, read_direct, sector_generations

pytestmark = [
    pytest.mark.handover,
    pytest.mark.skipif(not (shutil.which("nasm") and shutil.which("qemu-system-x86_64")), reason="needs nasm, qemu"),
]
VM = Path(__file__).parent / "vm"


@pytest.fixture
def vm(tmp_path):
    image = tmp_path / "guest.img"
    subprocess.run(["nasm", "-f", "bin", "-o", str(image), str(VM / "guest.asm")], check=True)
    assert image.stat().st_size == 512 and image.read_bytes()[-2:] == b"\x55\xaa"
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.write(image.read_bytes())
        f.truncate(4 * (1 << 20))
    env = {**os.environ, "BERTH_VM_DIR": str(tmp_path)}
    names: list[str] = []

    def ctl(*args: str) -> dict:
        if args[0] == "start":
            names.append(args[1])
        out = subprocess.run([sys.executable, str(VM / "vmctl.py"), *args], env=env, check=True, timeout=120,
                             capture_output=True, text=True).stdout  # fmt: skip
        return json.loads(out.strip().splitlines()[-1])

    ctl.disk = str(disk)  # type: ignore[attr-defined]
    ctl.dir = tmp_path  # type: ignore[attr-defined]
    yield ctl
    for name in names:
        ctl("quit", name)


@pytest.mark.parametrize("lba", [DATA_LBA + 7, KEEP_LBA + 63])
def test_guest_verifies_generations_and_reports_a_corrupted_sector(vm, lba):
    vm("start", "a", vm.disk)
    assert not vm("wait", "a", "--gen", "5", "--timeout", "60")["errors"]
    fd = os.open(vm.disk, os.O_WRONLY)
    try:
        for _ in range(40):  # the guest reads each generation back one timer tick after writing it
            os.pwrite(fd, bytes(SECTOR), lba * SECTOR)
            if vm("serial", "a")["errors"]:
                break
    finally:
        os.close(fd)
    errors = vm("wait", "a", "--gen", "100000", "--timeout", "10")["errors"]
    want = "0" if lba >= KEEP_LBA else ""
    assert errors and errors[0].startswith(f"BAD s={lba} g=0 want={want}"), errors


def test_guest_survives_a_local_live_migration(vm):
    vm("start", "a", vm.disk)
    vm("start", "b", vm.disk, "--incoming", "44444")
    first = vm("wait", "a", "--gen", "10", "--timeout", "60")
    stats = vm("migrate", "a", "tcp:127.0.0.1:44444")
    assert stats["status"] == "completed", stats
    vm("quit", "a")
    source_gens = vm("serial", "a")["generations"]
    after = vm("wait", "b", "--gen", str(source_gens[-1] + 10), "--timeout", "60")
    assert not after["errors"] and after["boots"] == 0, after
    vm("qmp", "b", "stop")
    text = "".join((vm.dir / n / "serial.log").read_text() for n in ("a", "b"))
    joined = parse_serial(text)
    assert joined["generations"] == list(range(1, len(joined["generations"]) + 1)), (first, joined)
    on_disk = sector_generations(read_direct(vm.disk))
    assert len(on_disk) == COUNT and set(on_disk) <= {joined["generations"][-1], joined["generations"][-1] + 1}
    assert sector_generations(read_direct(vm.disk, KEEP_LBA), KEEP_LBA) == [0] * COUNT
