#!/usr/bin/env python3
"""Write and verify numbered, checksummed 4 KiB blocks the way QEMU with cache=none writes a VM disk.

Runs inside a lab node (stdlib only). `write` opens the disk (a block device or a disk.img file) with O_DIRECT,
writes block `seq` at offset seq*4096, fsyncs, and only then prints `seq` on stdout: every printed number is an
acknowledged write. It stops cleanly when the stop file appears and exits 1 on the first I/O error.
`verify` reads blocks first..last back with O_DIRECT and prints a JSON verdict.

Block layout: magic (8) | seq (8, little endian) | writer tag (8) | sha256 of the payload (32) | payload.
The payload is derived from seq, so a verifier needs nothing but the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import struct
import sys
import time

BLOCK = 4096
MAGIC = b"BERTHHO1"
HEADER = struct.Struct("<8sQ8s32s")
PAYLOAD = BLOCK - HEADER.size


def payload(seq: int) -> bytes:
    return random.Random(seq).randbytes(PAYLOAD)


def encode(seq: int, tag: str) -> bytes:
    body = payload(seq)
    return HEADER.pack(MAGIC, seq, tag.encode()[:8].ljust(8), hashlib.sha256(body).digest()) + body


def check(block: bytes, seq: int) -> str | None:
    """None when `block` is the intact block `seq`, else what is wrong with it."""
    magic, found, _tag, digest = HEADER.unpack_from(block)
    if magic != MAGIC:
        return "no block header (never written or overwritten)"
    if found != seq:
        return f"holds block {found}"
    body = block[HEADER.size :]
    if hashlib.sha256(body).digest() != digest or body != payload(seq):
        return "checksum mismatch"
    return None


def open_direct(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_DIRECT)


def write(args: argparse.Namespace) -> int:
    fd = open_direct(args.path)
    buffer = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT needs
    started = time.monotonic()
    seq = args.first
    try:
        while not os.path.exists(args.stop_file) and (args.count == 0 or seq < args.first + args.count):
            buffer[:] = encode(seq, args.tag)
            try:
                os.pwrite(fd, buffer, seq * BLOCK)
                os.fsync(fd)
            except OSError as err:
                print(f"I/O error at block {seq}: {err}", file=sys.stderr, flush=True)
                return 1
            print(f"{seq} {time.monotonic() - started:.3f}", flush=True)
            seq += 1
            time.sleep(args.interval)
    finally:
        os.close(fd)
    return 0


def verify(args: argparse.Namespace) -> int:
    fd = os.open(args.path, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, BLOCK)
    bad: list[str] = []
    verified = 0
    try:
        for seq in range(args.first, args.last + 1):
            os.preadv(fd, [buffer], seq * BLOCK)
            problem = check(bytes(buffer), seq)
            if problem is None:
                verified += 1
            elif len(bad) < 10:
                bad.append(f"block {seq}: {problem}")
    finally:
        os.close(fd)
    print(json.dumps({"verified": verified, "expected": args.last - args.first + 1, "bad": bad}))
    return 0 if not bad else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("path")
    w.add_argument("--first", type=int, default=0)
    w.add_argument("--count", type=int, default=0, help="0: until the stop file appears")
    w.add_argument("--interval", type=float, default=0.0, help="pause between writes, seconds")
    w.add_argument("--stop-file", default="/tmp/blockwriter.stop")
    w.add_argument("--tag", default="writer")
    v = sub.add_parser("verify")
    v.add_argument("path")
    v.add_argument("--first", type=int, default=0)
    v.add_argument("--last", type=int, required=True)
    args = parser.parse_args(argv)
    return write(args) if args.command == "write" else verify(args)


if __name__ == "__main__":
    sys.exit(main())
