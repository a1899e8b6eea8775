"""thin_metadata_host: validation, the XML of thin_delta and thin_dump, paging, and whole requests against fake
dmsetup / thin_delta / thin_dump programs on PATH that keep the pool's metadata-snapshot state in a file."""

from __future__ import annotations

import fcntl
import io
import json
import os
import time
from pathlib import Path

import pytest

from csi_driver.storage import thin_metadata_host as h
from tests.unit.storage.fakes import DELTA_CHUNKS, DUMP_CHUNKS, FakeThinTools
from tests.unit.storage.fakes import THIN_DELTA_XML as DELTA_XML
from tests.unit.storage.fakes import THIN_DUMP_XML as DUMP_XML

CHUNK = 64 << 10  # data_block_size="128" sectors


class FakeHost(FakeThinTools):
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch):
        super().__init__(tmp)
        for key, value in self.env().items():
            monkeypatch.setenv(key, value)
        self.host = h.Host(state_dir=str(tmp / "state"))
        self.output(DELTA_XML)

    def ask(self, **fields) -> dict:
        request = {"v": 1, "op": "delta", "vg": "my-vg", "pool": "thin-pool", "thin_ids": [7, 9], "start_byte": 0,
                   "max_ranges": 1000, "budget_seconds": 20, **fields}  # fmt: skip
        out = io.StringIO()
        assert h.main(io.StringIO(json.dumps(request)), out, self.host) == 0
        return json.loads(out.getvalue())


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeHost:
    return FakeHost(tmp_path, monkeypatch)


# --- pure parts ---


def test_dm_names_double_the_dashes_inside_names():
    assert h.dm_name("berth", "pool") == "berth-pool"
    assert h.dm_name("my-vg", "thin-pool") + "-tpool" == "my--vg-thin--pool-tpool"
    assert h.dm_name("my-vg", "thin-pool_tmeta") == "my--vg-thin--pool_tmeta"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "version"),
        ({"op": "dump"}, "op must be"),
        ({"thin_ids": [7]}, "takes 2 thin id"),
        ({"thin_ids": [7, 1 << 24]}, "thin id"),
        ({"thin_ids": [7, True]}, "thin id"),
        ({"vg": "-rf"}, "volume group"),
        ({"pool": "a/b"}, "thin pool"),
        ({"start_byte": -1}, "start_byte"),
        ({"max_ranges": 0}, "max_ranges"),
        ({"budget_seconds": 0}, "budget_seconds"),
        ({"extra": 1}, "unknown request fields"),
    ],
)
def test_requests_are_checked(change, message):
    request = {"v": 1, "op": "delta", "vg": "berth", "pool": "pool", "thin_ids": [7, 9], "start_byte": 0,
               "max_ranges": 10, "budget_seconds": 5, **change}  # fmt: skip
    with pytest.raises(h.RequestError, match=message):
        h.validate_request(request)


def parse(op: str, xml: str, start_byte: int = 0, limit: int = 1000, thin_id: int = 9) -> tuple[list[int], int | None]:
    collector = h.RangeCollector(limit)
    output = h.ToolOutput(op, thin_id, start_byte, collector)
    if output.feed(xml.encode()):
        output.feed(b"", final=True)
    assert output.chunk_bytes == CHUNK
    return collector.flat(), collector.next_chunk


def test_delta_xml_gives_the_changed_chunks_merged():
    assert parse("delta", DELTA_XML) == (DELTA_CHUNKS, None)


def test_dump_xml_gives_the_mapped_chunks_of_the_device_only():
    assert parse("allocated", DUMP_XML) == (DUMP_CHUNKS, None)


def test_xml_fed_in_pieces_parses_the_same():
    collector = h.RangeCollector(1000)
    output = h.ToolOutput("delta", 9, 0, collector)
    data = DELTA_XML.encode()
    for i in range(0, len(data), 7):
        output.feed(data[i : i + 7])
    output.feed(b"", final=True)
    assert collector.flat() == DELTA_CHUNKS


def test_a_start_byte_skips_earlier_ranges_and_cuts_the_one_it_falls_in():
    assert parse("allocated", DUMP_XML, start_byte=9 * CHUNK + 100) == ([9, 3, 16, 1], None)
    assert parse("delta", DELTA_XML, start_byte=41 * CHUNK) == ([41, 1], None)


def test_a_full_page_says_where_the_next_one_starts_and_never_splits_a_range():
    assert parse("delta", DELTA_XML, limit=2) == ([1, 1, 10, 5], 30)
    assert parse("delta", DELTA_XML, start_byte=30 * CHUNK, limit=2) == ([30, 1, 40, 2], None)
    assert parse("allocated", DUMP_XML, limit=1) == ([0, 4], 8)


def test_ranges_out_of_order_are_an_error_not_a_wrong_answer():
    collector = h.RangeCollector(10)
    collector.add(5, 2)
    with pytest.raises(ValueError, match="comes after"):
        collector.add(6, 1)


@pytest.mark.parametrize(
    "xml",
    [
        '<diff left="7" right="9"><different begin="1" length="1"/></diff>',  # no superblock first
        '<superblock data_block_size="128"><different begin="x" length="1"/></superblock>',
        '<superblock data_block_size="128"><different length="1"/></superblock>',
        "<superblock",
    ],
)
def test_output_that_makes_no_sense_is_an_error(xml):
    output = h.ToolOutput("delta", 9, 0, h.RangeCollector(10))
    with pytest.raises(ValueError):
        output.feed(xml.encode(), final=True)


# --- whole requests, fake tools ---


def test_delta_reserves_reads_and_releases_the_metadata_snapshot(fake):
    answer = fake.ask()
    assert answer == {"ok": True, "result": {"chunk_bytes": CHUNK, "ranges": DELTA_CHUNKS, "next_chunk": None,
                                             "warnings": []}}  # fmt: skip
    assert fake.dmsetup_calls() == ["reserve_metadata_snap", "release_metadata_snap"]
    log = (fake.dir / "dmsetup.log").read_text()
    assert "message my--vg-thin--pool-tpool 0 reserve_metadata_snap" in log
    tool = (fake.dir / "tool.log").read_text()
    assert "thin_delta -m --snap1 7 --snap2 9 /dev/mapper/my--vg-thin--pool_tmeta" in tool
    assert not fake.held and os.listdir(fake.host.state_dir) == ["my--vg-thin--pool.lock"], "no marker left"


def test_allocated_runs_thin_dump_for_the_device(fake):
    fake.output(DUMP_XML)
    answer = fake.ask(op="allocated", thin_ids=[9])
    assert answer["result"]["ranges"] == DUMP_CHUNKS
    assert "thin_dump -m --dev-id 9 /dev/mapper/my--vg-thin--pool_tmeta" in (fake.dir / "tool.log").read_text()


def test_a_device_missing_from_the_dump_is_not_found(fake):
    fake.output(DUMP_XML)
    answer = fake.ask(op="allocated", thin_ids=[11])
    assert answer["error"]["kind"] == "not_found" and "thin device 11" in answer["error"]["message"]
    assert fake.dmsetup_calls()[-1] == "release_metadata_snap" and not fake.held


def test_a_failing_tool_still_releases_the_snapshot(fake):
    fake.flag("stderr", "Unable to find mapping tree for snap2 (9)\nUsage: thin_delta [options] <device or file>\n")
    answer = fake.ask()
    assert answer["error"]["kind"] == "not_found"
    assert "Unable to find mapping tree for snap2 (9)" in answer["error"]["message"]
    assert fake.dmsetup_calls() == ["reserve_metadata_snap", "release_metadata_snap"] and not fake.held


def test_other_tool_failures_carry_argv_rc_and_stderr(fake):
    fake.flag("stderr", "metadata contains errors (run thin_check for details).\n")
    error = fake.ask()["error"]
    assert error["kind"] == "failed" and error["rc"] == 1 and error["argv"][0] == "thin_delta"
    assert "thin_check" in error["stderr"] and not fake.held


def test_a_tool_past_the_budget_is_killed_and_the_snapshot_released(fake):
    fake.flag("hang")
    started = time.monotonic()
    error = fake.ask(budget_seconds=1)["error"]
    assert error["kind"] == "timeout" and error["argv"][0] == "thin_delta"
    assert time.monotonic() - started < 10, "the tool was not waited for"
    assert fake.dmsetup_calls() == ["reserve_metadata_snap", "release_metadata_snap"] and not fake.held


def test_a_full_page_stops_reading_without_waiting_for_the_tool(fake):
    fake.output(DELTA_XML)
    fake.flag("hang")  # prints everything, then would keep its output open for a minute
    started = time.monotonic()
    answer = fake.ask(max_ranges=2, budget_seconds=30)
    assert answer["result"]["ranges"] == [1, 1, 10, 5] and answer["result"]["next_chunk"] == 30
    assert time.monotonic() - started < 10
    assert not fake.held


def test_unreadable_output_is_an_internal_error_and_releases(fake):
    fake.output('<superblock data_block_size="128"><different begin="9" length="1"/><different begin="2" length="1"/>')
    error = fake.ask()["error"]
    assert error["kind"] == "internal" and "cannot read the output of thin_delta" in error["message"]
    assert not fake.held


def test_a_snapshot_someone_else_holds_is_left_alone(fake):
    fake.flag("held")  # e.g. an operator's thin_ls, or one that survived a reboot without our marker
    error = fake.ask()["error"]
    assert error["kind"] == "host_not_ready"
    assert "dmsetup message my--vg-thin--pool-tpool 0 release_metadata_snap" in error["message"]
    assert fake.dmsetup_calls() == ["reserve_metadata_snap"] and fake.held
    assert not (fake.dir / "tool.log").exists()


def test_a_snapshot_an_interrupted_request_left_is_released_first(fake):
    fake.flag("held")
    os.makedirs(fake.host.state_dir)
    Path(fake.host.state_dir, "my--vg-thin--pool-tpool.held").write_text("4242\n")  # its marker
    answer = fake.ask()
    assert answer["result"]["ranges"] == DELTA_CHUNKS
    assert "interrupted request" in answer["result"]["warnings"][0]
    assert fake.dmsetup_calls() == ["release_metadata_snap", "reserve_metadata_snap", "release_metadata_snap"]
    assert not fake.held


def test_an_inactive_pool_is_host_not_ready(fake):
    fake.flag("no-pool")
    error = fake.ask()["error"]
    assert error["kind"] == "host_not_ready" and "not active" in error["message"]
    assert not os.path.exists(os.path.join(fake.host.state_dir, "my--vg-thin--pool-tpool.held"))


def test_a_pool_held_by_another_request_for_the_whole_budget_is_busy(fake):
    os.makedirs(fake.host.state_dir)
    with open(os.path.join(fake.host.state_dir, "my--vg-thin--pool.lock"), "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        error = fake.ask(budget_seconds=0.3)["error"]
    assert error["kind"] == "busy" and "retry later" in error["message"]
    assert fake.dmsetup_calls() == []


def test_missing_tools_name_their_package(fake, monkeypatch, tmp_path):
    (tmp_path / "bin" / "thin_dump").unlink()
    monkeypatch.setattr(h, "_env", lambda: {"PATH": str(tmp_path / "bin")})  # no real thin_dump on the system PATH
    error = fake.ask(op="allocated", thin_ids=[9])["error"]
    assert error == {"kind": "host_not_ready", "message": "thin_dump is not installed on the storage host "
                                                          "(apt-get install thin-provisioning-tools)"}  # fmt: skip


def test_bad_json_is_invalid(fake):
    out = io.StringIO()
    h.main(io.StringIO("{"), out, fake.host)
    assert json.loads(out.getvalue())["error"]["kind"] == "invalid"
