"""The data the tiny VM (guest.asm) writes, and a check of a disk image against it.

Standard library only: it also runs inside the lab nodes (`python3 pattern.py DEVICE`), reading the disk with
O_DIRECT so the answer comes from the storage, not from the node's page cache.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import sys

SECTOR = 512
KEEP_LBA = 128  # the constants of guest.asm: the region written once at boot (generation 0) ...
DATA_LBA = 64  # ... and the one rewritten every generation
COUNT = 64
MAGIC = b"BRTH"
M32 = 0xFFFFFFFF


def pattern(lba: int, gen: int) -> bytes:
    x = ((lba * 0x9E3779B1) ^ (gen * 0x85EBCA6B)) & M32
    words = []
    for _ in range(125):
        words.append(x)
        x = ((((x << 5) | (x >> 27)) & M32) + 0x6D2B79F5) & M32
    return MAGIC + struct.pack("<2I125I", lba, gen, *words)


def sector_generations(data: bytes, first_lba: int = DATA_LBA) -> list[int | None]:
    """The generation each sector of a region holds intact, None where its content is not a valid pattern."""
    gens: list[int | None] = []
    for i in range(COUNT):
        sector = data[i * SECTOR : (i + 1) * SECTOR]
        lba, gen = struct.unpack_from("<2I", sector, 4)
        gens.append(gen if lba == first_lba + i and sector == pattern(lba, gen) else None)
    return gens


def read_direct(path: str, first_lba: int = DATA_LBA) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, COUNT * SECTOR)  # page aligned, as O_DIRECT wants
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            f.seek(first_lba * SECTOR)
            f.readinto(buf)
        return bytes(buf)
    finally:
        os.close(fd)


LINE = re.compile(r"^(BOOT|G (\d+) OK|BAD .*|IOERR .*)$")


def parse_serial(text: str) -> dict:
    """The VM's serial log: generations verified in order, and any error line."""
    gens, errors, other = [], [], []
    for line in text.replace("\r", "").splitlines():
        m = LINE.match(line)
        if m is None:
            other.append(line)
        elif m.group(2):
            gens.append(int(m.group(2)))
        elif line != "BOOT":
            errors.append(line)
    return {"generations": gens, "errors": errors, "other": other, "boots": text.count("BOOT")}


if __name__ == "__main__":
    regions = {"data": DATA_LBA, "keep": KEEP_LBA}
    print(json.dumps({name: sector_generations(read_direct(sys.argv[1], lba), lba) for name, lba in regions.items()}))
