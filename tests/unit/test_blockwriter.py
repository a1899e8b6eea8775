"""The hand-over writer/verifier (tests/handover/blockwriter.py): a verifier that cannot fail proves nothing."""

from __future__ import annotations

import json

import pytest

from tests.handover import blockwriter


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * 64 * blockwriter.BLOCK)
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = blockwriter.main(list(argv))
    return rc, capsys.readouterr().out


def test_acknowledged_blocks_verify(disk, capsys, tmp_path):
    rc, out = run(capsys, "write", disk, "--first", "3", "--count", "5", "--stop-file", str(tmp_path / "stop"))
    assert rc == 0 and [int(line.split()[0]) for line in out.splitlines()] == [3, 4, 5, 6, 7]
    rc, out = run(capsys, "verify", disk, "--first", "3", "--last", "7")
    assert rc == 0 and json.loads(out) == {"verified": 5, "expected": 5, "bad": []}


def test_lost_torn_and_misplaced_blocks_are_caught(disk, capsys, tmp_path):
    run(capsys, "write", disk, "--count", "4", "--stop-file", str(tmp_path / "stop"))
    with open(disk, "r+b") as f:
        f.seek(1 * blockwriter.BLOCK + 2000)
        f.write(b"torn")
        f.seek(2 * blockwriter.BLOCK)
        f.write(blockwriter.encode(9, "other"))
    rc, out = run(capsys, "verify", disk, "--last", "4")
    verdict = json.loads(out)
    assert rc == 1 and verdict["verified"] == 2
    assert verdict["bad"] == [
        "block 1: checksum mismatch",
        "block 2: holds block 9",
        "block 4: no block header (never written or overwritten)",
    ]


def test_writer_stops_at_the_stop_file(disk, capsys, tmp_path):
    stop = tmp_path / "stop"
    stop.touch()
    rc, out = run(capsys, "write", disk, "--stop-file", str(stop))
    assert rc == 0 and out == ""
