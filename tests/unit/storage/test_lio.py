"""Controller side of LIO: what is sent to the host, how answers and failures map to domain errors."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from csi_driver.storage import ids
from csi_driver.storage.errors import (
    Busy,
    CommandFailed,
    HostNotReady,
    InUse,
    InvalidRequest,
    NotFound,
    StorageError,
)
from csi_driver.storage.lio import LIO_TIMEOUT, Chap, ExportInfo, LioTargets, host_program
from csi_driver.storage.runner import HOST_START_MARGIN, LocalRunner

from .fakes import FakeRunner

PREFIX = "iqn.2026-11.io.berth"
VOL = ids.volume_lv_name("blk", "pvc-1")
DEV = f"/dev/berth/{VOL}"
NODE = "iqn.1993-08.org.debian:01:node1"


def answering(*results, ok=True, error=None):
    resp = {"ok": ok, "results": list(results)}
    if error:
        resp["error"] = error
    return FakeRunner().on("python3", stdout="some warning\n" + json.dumps(resp) + "\n")


def sent(runner: FakeRunner) -> dict:
    (call,) = runner.calls
    return json.loads(call.input)


def test_export_sends_program_and_json_on_stdin():
    target = f"{PREFIX}:{VOL}"
    r = answering(
        {
            "target": target,
            "lun": 0,
            "serial": ids.volume_serial(VOL),
            "device": DEV,
            "portals": ["198.18.0.2:3260"],
            "changed": True,
        }
    )
    info = LioTargets(r, PREFIX).export(VOL, DEV, ["198.18.0.2:3260"])
    (call,) = r.calls
    assert call.argv == ["python3", "-c", host_program()]
    assert call.check is False
    req = sent(r)
    assert req["v"] == 1 and req["save"] is True
    assert req["budget_seconds"] == LIO_TIMEOUT - HOST_START_MARGIN, "the host stops acting before we give up"
    assert req["ops"] == [
        {
            "op": "export",
            "volume": VOL,
            "target": target,
            "device": DEV,
            "serial": ids.volume_serial(VOL),
            "portals": ["198.18.0.2:3260"],
            "unmap": True,
        }
    ]
    assert info.target_iqn == target and info.lun == 0
    assert info.wwn == ids.naa_wwn(ids.volume_serial(VOL))
    assert info.publish_context(readonly=True) == {
        "targetPortals": "198.18.0.2:3260",
        "targetIqn": target,
        "targetLun": "0",
        "readonly": "true",
    }


def test_host_program_is_the_module_and_fits_one_argument():
    source = host_program()
    assert "def main(" in source and "rtslib_fb" in source
    compile(source, "lio_host.py", "exec")
    # Linux limits ONE argument (the ssh remote command string) to 128 KiB.
    from csi_driver.storage.runner import remote_command

    assert len(remote_command(["python3", "-c", source])) < 100 * 1024


def test_chap_secrets_go_through_stdin_only():
    chap = Chap("node1", "s3cret-pass!", "tgt", "m-s3cret")
    assert "s3cret" not in repr(chap)
    r = answering({"target": "t", "changed": True})
    LioTargets(r, PREFIX).add_initiator(VOL, NODE, readonly=True, chap=chap)
    (call,) = r.calls
    assert not any("s3cret" in a for a in call.argv)
    op = sent(r)["ops"][0]
    assert op["chap"] == {
        "user": "node1",
        "password": "s3cret-pass!",
        "mutual_user": "tgt",
        "mutual_password": "m-s3cret",
    }
    assert op["readonly"] is True and op["initiator"] == NODE


def test_ensure_published_is_one_process():
    r = answering({"target": f"{PREFIX}:{VOL}", "lun": 0, "portals": ["198.18.0.2:3260"]}, {"changed": True})
    LioTargets(r, PREFIX).ensure_published(VOL, DEV, ["198.18.0.2"], NODE)
    assert len(r.calls) == 1
    assert [o["op"] for o in sent(r)["ops"]] == ["export", "add_initiator"]


@pytest.mark.parametrize(
    "kind,cls",
    [
        ("not_found", NotFound),
        ("conflict", InUse),
        ("invalid", InvalidRequest),
        ("busy", Busy),
        ("host_not_ready", HostNotReady),
        ("internal", StorageError),
    ],
)
def test_host_errors_map_to_domain_errors(kind, cls):
    r = answering(ok=False, error={"kind": kind, "message": "went wrong", "op_index": 0})
    with pytest.raises(cls) as exc:
        LioTargets(r, PREFIX).remove_initiator(VOL, NODE)
    assert "went wrong" in str(exc.value)


def test_no_json_means_command_failed():
    r = FakeRunner().on("python3", rc=127, stderr="sh: 1: python3: not found")
    with pytest.raises(CommandFailed) as exc:
        LioTargets(r, PREFIX).save()
    assert exc.value.rc == 127 and "python3: not found" in str(exc.value)
    assert len(str(exc.value)) < 500, "the program text is not dumped into the error"


def test_invalid_input_rejected_before_running():
    r = FakeRunner()
    lio = LioTargets(r, PREFIX)
    with pytest.raises(InvalidRequest):
        lio.export(VOL, "/dev/../etc/shadow", ["198.18.0.2"])
    with pytest.raises(InvalidRequest):
        lio.export(VOL, DEV, "198.18.0.2")
    with pytest.raises(InvalidRequest):
        lio.add_initiator(VOL, "not-an-iqn")
    with pytest.raises(InvalidRequest):
        lio.export("bad name", DEV, ["198.18.0.2"])
    with pytest.raises(InvalidRequest):
        LioTargets(r, "bogus")
    assert r.calls == []


def test_list_exports_parses():
    r = answering(
        {
            "exports": [
                {
                    "target": f"{PREFIX}:{VOL}",
                    "volume": VOL,
                    "device": DEV,
                    "serial": "abc",
                    "portals": ["198.18.0.2:3260"],
                    "enabled": True,
                    "initiators": [
                        {
                            "initiator": NODE,
                            "mapped": True,
                            "readonly": False,
                            "chap_user": None,
                            "mutual_chap": False,
                            "logged_in": True,
                        }
                    ],
                }
            ]
        }
    )
    (exp,) = LioTargets(r, PREFIX).list_exports()
    assert isinstance(exp, ExportInfo)
    assert exp.volume == VOL and exp.initiators[0].logged_in and exp.initiators[0].readonly is False
    assert sent(r)["save"] is False, "reads never save"


def test_persist_false_does_not_save():
    r = answering({"changed": True})
    LioTargets(r, PREFIX, persist=False).unexport(VOL)
    assert sent(r)["save"] is False


# --- end to end through a real process: LocalRunner → python3 -c <lio_host> → fake rtslib_fb ---


@pytest.fixture
def host_env(tmp_path):
    shutil.copy(Path(__file__).with_name("fake_rtslib_fb.py"), tmp_path / "rtslib_fb.py")
    env = dict(
        os.environ,
        PYTHONPATH=str(tmp_path),
        BERTH_LIO_LOCK=str(tmp_path / "lio.lock"),
        BERTH_LIO_SAVE_FILE=str(tmp_path / "saveconfig.json"),
    )
    runner = LocalRunner(env=env)
    yield runner
    runner.close()


def test_end_to_end_batch_in_one_process(host_env):
    lio = LioTargets(host_env, PREFIX, python=sys.executable)
    info = lio.ensure_published(
        VOL, DEV, ["198.18.0.2", "[fd00::2]:3261"], NODE, readonly=True, chap=Chap("node1", "s3cret-pass!")
    )
    assert info.portals == ("198.18.0.2:3260", "[fd00::2]:3261")
    assert info.serial == ids.volume_serial(VOL)
    # The fake keeps its state in the process: the resident host program answered both requests.
    assert [e.volume for e in lio.list_exports()] == [VOL]
    assert [i.initiator for i in lio.list_initiators(VOL)] == [NODE]


def test_end_to_end_one_shot_when_the_resident_program_is_busy(host_env):
    """A request that finds the resident program busy runs in a process of its own (a fresh, empty fake)."""
    lio = LioTargets(host_env, PREFIX, python=sys.executable)
    lio.export(VOL, DEV, ["198.18.0.2"])
    argv = [sys.executable, "-c", host_program()]
    host_env.resident._busy[tuple(argv)] = 1  # the one resident instance is taken
    try:
        assert lio.list_exports() == []
    finally:
        host_env.resident._busy[tuple(argv)] = 0
    assert [e.volume for e in lio.list_exports()] == [VOL]


def test_end_to_end_without_rtslib(tmp_path):
    runner = LocalRunner(env=dict(os.environ, BERTH_LIO_LOCK=str(tmp_path / "lio.lock")))
    with pytest.raises(HostNotReady, match="python3-rtslib-fb is not installed"):
        LioTargets(runner, PREFIX, python=sys.executable).list_exports()
