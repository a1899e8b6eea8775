"""The host-side LIO program: argument validation (pure) and its rtslib logic against a fake."""

import ast
import io
import json
import re
import subprocess
from importlib import resources

import pytest

from csi_driver.storage import lio_host

from . import fake_rtslib_fb

T = "iqn.2026-11.io.berth:vol-0123456789abcdef0123"
VOL = "vol-0123456789abcdef0123"
DEV = "/dev/berth/vol-0123456789abcdef0123"
SERIAL = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9"
NODE1 = "iqn.1993-08.org.debian:01:node1"
NODE2 = "iqn.1993-08.org.debian:01:node2"


def export_op(**kw):
    op = {
        "op": "export",
        "volume": VOL,
        "target": T,
        "device": DEV,
        "serial": SERIAL,
        "portals": ["198.18.0.2:3260", "198.18.1.2"],
    }
    op.update(kw)
    return op


def add_op(initiator=NODE1, readonly=False, chap=None):
    return {"op": "add_initiator", "target": T, "initiator": initiator, "readonly": readonly, "chap": chap}


# --- the file that is shipped to the host ---


def test_module_is_self_contained():
    source = resources.files("csi_driver.storage").joinpath("lio_host.py").read_text()
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the file runs alone on the host"
            imported.add((node.module or "").split(".")[0])
    allowed = {
        "__future__",
        "contextlib",
        "fcntl",
        "ipaddress",
        "json",
        "os",
        "re",
        "subprocess",
        "sys",
        "time",
        "collections",
        "typing",
        "rtslib_fb",
    }
    assert imported <= allowed, imported - allowed


# --- validation ---


@pytest.mark.parametrize(
    "portal,expected",
    [
        ("198.18.0.2", ("198.18.0.2", 3260)),
        ("198.18.0.2:3261", ("198.18.0.2", 3261)),
        ("0.0.0.0:3260", ("0.0.0.0", 3260)),
        ("[fd00::2]", ("[fd00::2]", 3260)),
        ("[fd00::2]:3262", ("[fd00::2]", 3262)),
    ],
)
def test_parse_portal(portal, expected):
    assert lio_host.parse_portal(portal) == expected


@pytest.mark.parametrize(
    "portal",
    [
        "",
        "host.example:3260",
        "1.2.3.4:0",
        "1.2.3.4:70000",
        "1.2.3.4:x",
        "fd00::2",
        "[fd00::2",
        "[x]:1",
        "1.2.3.4:3260;reboot",
        3260,
        None,
    ],
)
def test_parse_portal_rejects(portal):
    with pytest.raises(lio_host.RequestError):
        lio_host.parse_portal(portal)


@pytest.mark.parametrize(
    "op",
    [
        export_op(volume="vol x"),
        export_op(volume="../etc"),
        export_op(target="iqn.bad"),
        export_op(target=T + "; rm -rf /"),
        export_op(device="/dev/../etc/shadow"),
        export_op(device="relative/path"),
        export_op(device="/dev/berth/$(id)"),
        export_op(serial="not a serial"),
        export_op(portals=[]),
        export_op(portals="198.18.0.2"),
        export_op(extra=1),
        add_op(initiator="node1"),
        add_op(readonly="yes"),
        add_op(chap={"user": "u"}),
        add_op(chap={"user": "u", "password": "with space"}),
        add_op(chap={"user": "u", "password": "NULL"}),
        add_op(chap={"user": "u", "password": "p" * 256}),
        add_op(chap={"user": "u", "password": "p", "mutual_user": "m"}),
        add_op(chap={"user": "u", "password": "p", "other": "x"}),
        add_op(chap="u:p"),
        {"op": "list_exports", "iqn_prefix": "nope"},
        {"op": "save", "path": "/etc/../root/x.json"},
        {"op": "save", "path": "/home/x.json"},
        {"op": "format_disk"},
        {"no": "op"},
        "export",
    ],
)
def test_validate_op_rejects(op):
    with pytest.raises(lio_host.RequestError):
        lio_host.validate_op(op)


def test_validate_op_normalises():
    op = lio_host.validate_op(export_op(portals=["198.18.1.2", "198.18.0.2:3260", "198.18.1.2:3260"]))
    assert op["portals"] == [("198.18.0.2", 3260), ("198.18.1.2", 3260)]
    chap = {"user": "node1", "password": "s3cret-pass!", "mutual_user": "tgt", "mutual_password": "m-s3cret"}
    assert lio_host.validate_op(add_op(chap=chap))["chap"] == chap


def test_chap_errors_never_echo_secrets():
    with pytest.raises(lio_host.RequestError) as exc:
        lio_host.check_chap({"user": "u", "password": "secret with space"})
    assert "secret" not in str(exc.value).replace("chap.password", "")


@pytest.mark.parametrize(
    "req",
    [
        [],
        {"ops": [{"op": "save"}]},
        {"v": 2, "ops": [{"op": "save"}]},
        {"v": 1, "ops": []},
        {"v": 1, "ops": [{"op": "save"}] * 300},
        {"v": 1, "ops": [{"op": "save"}], "save": "yes"},
    ],
)
def test_validate_request_rejects(req):
    with pytest.raises(lio_host.RequestError):
        lio_host.validate_request(req)


def run_main(payload: str) -> dict:
    out = io.StringIO()
    assert lio_host.main(io.StringIO(payload), out) == 0
    (line,) = out.getvalue().splitlines()
    return json.loads(line)


def test_main_reports_bad_json_and_invalid_request():
    assert run_main("{not json")["error"]["kind"] == "invalid"
    resp = run_main(json.dumps({"v": 1, "ops": [export_op(device="/etc/passwd")]}))
    assert resp["ok"] is False and resp["error"]["kind"] == "invalid"


def test_main_without_rtslib_is_host_not_ready(monkeypatch):
    monkeypatch.setattr(lio_host, "rtslib", None)
    resp = run_main(json.dumps({"v": 1, "ops": [{"op": "list_exports", "iqn_prefix": "iqn.2026-11.io.berth"}]}))
    assert resp["ok"] is False and resp["results"] == [] and resp["error"]["kind"] == "host_not_ready"
    assert "python3-rtslib-fb" in resp["error"]["message"]


@pytest.mark.parametrize("budget", [0, -1, "60", True, 3601])
def test_budget_must_be_a_sane_number(budget):
    with pytest.raises(lio_host.RequestError, match="budget_seconds"):
        lio_host.validate_request({"v": 1, "ops": [{"op": "save"}], "budget_seconds": budget})


# --- logic against the fake rtslib ---


@pytest.fixture
def rts(monkeypatch, tmp_path):
    fake_rtslib_fb.reset()
    monkeypatch.setattr(fake_rtslib_fb, "ACL_AUTH_ATTRIBUTE", True)
    monkeypatch.setattr(lio_host, "rtslib", fake_rtslib_fb)
    monkeypatch.setattr(lio_host, "LOCK_PATH", str(tmp_path / "lio.lock"))
    default_file = str(tmp_path / "saveconfig.json")
    monkeypatch.setattr(lio_host, "SAVE_FILE_OVERRIDE", default_file)
    write = lio_host._write_private

    def recording_write(path, saveconf):
        fake_rtslib_fb.STATE["saves"].append(None if path == default_file else path)
        write(path, saveconf)

    monkeypatch.setattr(lio_host, "_write_private", recording_write)
    return fake_rtslib_fb.STATE


def call(*ops, save=True):
    return run_main(json.dumps({"v": 1, "ops": list(ops), "save": save}))


def tpg(state):
    return state["targets"][T]["tpgs"][1]


def test_each_request_rereads_the_backstore_indexes(rts):
    """A resident lio_host outlives other writers of configfs; rtslib's index map from before would be stale."""
    fake_rtslib_fb.tcm.bs_cache["iblock/vol-written-by-someone-else"] = 0
    assert call(export_op())["ok"]
    assert "iblock/vol-written-by-someone-else" not in fake_rtslib_fb.tcm.bs_cache


def test_export_builds_the_layout_and_is_idempotent(rts):
    resp = call(export_op())
    assert resp["ok"], resp
    (res,) = resp["results"]
    assert res["changed"] and res["serial"] == SERIAL and res["lun"] == 0
    assert res["portals"] == ["198.18.0.2:3260", "198.18.1.2:3260"]
    t = tpg(rts)
    assert t["enable"] is True
    assert t["attrs"]["generate_node_acls"] == "0"
    assert t["attrs"]["demo_mode_write_protect"] == "0"
    assert t["attrs"]["authentication"] == "0"
    assert t["luns"] == {0: VOL}
    assert t["acls"] == {}, "no initiator sees anything until published"
    assert rts["storage"][VOL]["dev"] == DEV and rts["storage"][VOL]["wwn"] == SERIAL
    assert rts["storage"][VOL]["attrs"]["emulate_tpu"] == "1"
    assert rts["saves"] == [None]

    again = call(export_op())
    assert again["ok"] and again["results"][0]["changed"] is False
    assert rts["saves"] == [None], "nothing changed: no save"


def test_export_replaces_portals(rts):
    call(export_op())
    call(export_op(portals=["198.18.2.2"]))
    assert set(tpg(rts)["nps"]) == {("198.18.2.2", 3260)}


def test_export_conflicts(rts):
    call(export_op())
    resp = call(export_op(device="/dev/berth/other"))
    assert resp["error"]["kind"] == "conflict"
    resp = call(export_op(serial="00000000-0000-0000-0000-000000000000"))
    assert resp["error"]["kind"] == "conflict"


def test_add_initiator_masks_lun_per_node(rts):
    resp = call(export_op(), add_op(NODE1), add_op(NODE2, readonly=True))
    assert resp["ok"], resp
    acls = tpg(rts)["acls"]
    assert acls[NODE1]["mapped"] == {0: {"tpg_lun": 0, "wp": False}}
    assert acls[NODE2]["mapped"] == {0: {"tpg_lun": 0, "wp": True}}
    assert acls[NODE1]["attrs"]["authentication"] == "0"
    # Idempotent, and a changed readonly flag is applied in place.
    resp = call(add_op(NODE1))
    assert resp["results"][0]["changed"] is False
    resp = call(add_op(NODE1, readonly=True))
    assert resp["results"][0]["changed"] is True and acls[NODE1]["mapped"][0]["wp"] is True

    listed = call({"op": "list_initiators", "target": T}, save=False)["results"][0]["initiators"]
    assert [(i["initiator"], i["readonly"], i["mapped"]) for i in listed] == [(NODE1, True, True), (NODE2, True, True)]


def test_add_initiator_with_chap_per_acl(rts):
    chap = {"user": "node1", "password": "s3cret-pass!", "mutual_user": "tgt", "mutual_password": "m-s3cret"}
    resp = call(export_op(), add_op(NODE1, chap=chap))
    assert resp["results"][1]["auth"] == "acl"
    acl = tpg(rts)["acls"][NODE1]
    assert acl["auth"] == {
        "userid": "node1",
        "password": "s3cret-pass!",
        "userid_mutual": "tgt",
        "password_mutual": "m-s3cret",
    }
    assert acl["attrs"]["authentication"] == "1"
    assert tpg(rts)["attrs"]["authentication"] == "0"
    listed = call({"op": "list_initiators", "target": T}, save=False)
    assert "s3cret" not in json.dumps(listed), "passwords never leave the host"
    # Dropping CHAP clears the credentials.
    call(add_op(NODE1))
    assert acl["auth"]["userid"] == "" and acl["attrs"]["authentication"] == "0"


def test_chap_falls_back_to_tpg_on_old_kernels(rts, monkeypatch):
    monkeypatch.setattr(fake_rtslib_fb, "ACL_AUTH_ATTRIBUTE", False)
    resp = call(export_op(), add_op(NODE1, chap={"user": "u", "password": "p4ssword"}))
    assert resp["results"][1]["auth"] == "tpg"
    assert tpg(rts)["attrs"]["authentication"] == "1"
    call(export_op())
    assert tpg(rts)["attrs"]["authentication"] == "1", "re-export must not silently disable CHAP"


def test_add_initiator_needs_an_export(rts):
    resp = call(add_op())
    assert resp["ok"] is False and resp["error"]["kind"] == "not_found"


def test_remove_initiator_idempotent(rts):
    call(export_op(), add_op(NODE1))
    assert call({"op": "remove_initiator", "target": T, "initiator": NODE1})["results"][0]["changed"]
    assert tpg(rts)["acls"] == {}
    assert not call({"op": "remove_initiator", "target": T, "initiator": NODE1})["results"][0]["changed"]
    other = T.replace("0123", "9999")
    assert not call({"op": "remove_initiator", "target": other, "initiator": NODE1})["results"][0]["changed"]


def test_unexport_removes_target_and_backstore(rts):
    call(export_op(), add_op(NODE1))
    resp = call({"op": "unexport", "volume": VOL, "target": T})
    assert resp["results"][0]["changed"]
    assert rts["targets"] == {} and rts["storage"] == {}
    resp = call({"op": "unexport", "volume": VOL, "target": T})
    assert resp["ok"] and resp["results"][0]["changed"] is False


def test_list_exports_filters_by_prefix(rts):
    call(export_op(), add_op(NODE1, readonly=True))
    fake_rtslib_fb.Target(fake_rtslib_fb.FabricModule("iscsi"), "iqn.2003-01.org.other:disk1")
    resp = call({"op": "list_exports", "iqn_prefix": "iqn.2026-11.io.berth"}, save=False)
    (exp,) = resp["results"][0]["exports"]
    assert exp["volume"] == VOL and exp["device"] == DEV and exp["serial"] == SERIAL
    assert exp["initiators"][0]["readonly"] is True and exp["enabled"] is True


def test_failure_mid_batch_still_saves_what_was_applied(rts):
    resp = call(
        export_op(),
        add_op("iqn.2026-11.io.berth:node9"),
        {
            "op": "add_initiator",
            "target": T.replace("0123", "7777"),
            "initiator": NODE1,
            "readonly": False,
            "chap": None,
        },
    )
    assert resp["ok"] is False and resp["error"]["op_index"] == 2
    assert len(resp["results"]) == 2
    assert rts["saves"] == [None]


def test_save_op_with_path(rts):
    resp = call({"op": "save", "path": "/etc/rtslib-fb-target/saveconfig.json"}, save=False)
    assert resp["ok"] and rts["saves"] == ["/etc/rtslib-fb-target/saveconfig.json"]


def test_saves_rewrite_only_what_changed(rts, tmp_path):
    other_volume, other_target = "vol-other", "iqn.2026-11.io.berth.test:vol-other"
    saved = tmp_path / "saveconfig.json"
    assert call(export_op())["ok"]
    assert "everything" in rts["dumps"], "no file yet: a full dump"
    rts["dumps"].clear()
    assert call(export_op(volume=other_volume, target=other_target, device="/dev/berth/vol-other"))["ok"]
    assert sorted(rts["dumps"]) == sorted([other_target, other_volume]), "only the new export was dumped"
    conf = json.loads(saved.read_text())
    assert {t["wwn"] for t in conf["targets"]} == {T, other_target}
    assert {o["name"] for o in conf["storage_objects"]} == {VOL, other_volume}
    assert oct(saved.stat().st_mode & 0o777) == "0o600", "the file holds CHAP secrets"

    assert call({"op": "unexport", "volume": VOL, "target": T})["ok"]
    conf = json.loads(saved.read_text())
    assert [t["wwn"] for t in conf["targets"]] == [other_target], "an unexported target leaves the file"
    assert [o["name"] for o in conf["storage_objects"]] == [other_volume]

    saved.write_text("{not json")
    rts["dumps"].clear()
    assert call(export_op())["ok"]
    assert "everything" in rts["dumps"], "an unreadable file is replaced by a full dump"


# --- a request the controller gave up on changes nothing (issue #13 item 4) ---


def test_lock_wait_is_bounded(tmp_path):
    """The lock was waited for without limit: a publish the controller had timed out on ran after its unpublish."""
    import fcntl
    import time

    path = tmp_path / "lio.lock"
    with open(path, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(lio_host.BusyError, match="nothing was changed"):
            with lio_host.host_lock(started + 0.3, str(path)):
                pass
        assert 0.3 <= time.monotonic() - started < 2
    with lio_host.host_lock(time.monotonic(), str(path)):  # free again: taken at once even with no time left
        pass


def test_a_publish_whose_budget_ran_out_waiting_grants_nothing(rts, tmp_path):
    import fcntl

    call(export_op())
    with open(tmp_path / "lio.lock", "a") as holder:  # a long operation of another request holds the lock
        fcntl.flock(holder, fcntl.LOCK_EX)
        late = run_main(json.dumps({"v": 1, "ops": [add_op()], "save": True, "budget_seconds": 0.2}))
    assert late["ok"] is False and late["error"]["kind"] == "busy"
    assert tpg(rts)["acls"] == {}, "the node got no access"


def test_operations_after_the_budget_are_not_started(rts):
    ticks = iter([0.0, 0.5, 2.0, 2.0, 2.0])  # start, the lock, export before the deadline, add_initiator after it
    out = io.StringIO()
    request = {"v": 1, "ops": [export_op(), add_op()], "save": True, "budget_seconds": 1}
    lio_host.main(io.StringIO(json.dumps(request)), out, clock=lambda: next(ticks))
    response = json.loads(out.getvalue())
    assert response["error"]["kind"] == "busy" and response["error"]["op_index"] == 1
    assert T in rts["targets"] and tpg(rts)["acls"] == {}
    assert rts["saves"], "what the first operation did is still saved"


# --- UNMAP emulation (the iscsiUnmap mutable parameter) ---


def test_export_applies_unmap_and_a_later_export_restores_what_the_volume_asks(rts):
    call(export_op(unmap=False))
    assert rts["storage"][VOL]["attrs"] == {"emulate_tpu": "0", "emulate_tpws": "0"}
    rts["storage"][VOL]["attrs"]["emulate_tpu"] = "1"  # e.g. a modify the tags never recorded
    resp = call(export_op(unmap=False))
    assert resp["results"][0]["changed"] and rts["storage"][VOL]["attrs"]["emulate_tpu"] == "0"


def test_configure_switches_unmap_live_and_saves_it(rts):
    call(export_op(), add_op())
    assert call({"op": "configure", "volume": VOL, "target": T, "unmap": False})["results"][0]["changed"]
    assert rts["storage"][VOL]["attrs"] == {"emulate_tpu": "0", "emulate_tpws": "0"}
    assert tpg(rts)["acls"], "the node keeps its ACL: no detach"
    saved = json.loads(open(lio_host.SAVE_FILE_OVERRIDE).read())
    (backstore,) = saved["storage_objects"]
    assert backstore["attributes"]["emulate_tpu"] == "0", "a restore at boot would bring UNMAP back"
    again = call({"op": "configure", "volume": VOL, "target": T, "unmap": False})
    assert again["results"][0]["changed"] is False


def test_configure_of_a_volume_never_exported_changes_nothing(rts):
    resp = call({"op": "configure", "volume": VOL, "target": T, "unmap": True})
    assert resp["ok"] and resp["results"][0]["changed"] is False and rts["storage"] == {}


def test_configure_needs_a_boolean(rts):
    resp = call({"op": "configure", "volume": VOL, "target": T, "unmap": "yes"})
    assert resp["error"]["kind"] == "invalid" and "unmap" in resp["error"]["message"]


# --- fences: a group snapshot's common instant (docs/group-snapshots.md) ---

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def timers(rts, monkeypatch, tmp_path):
    monkeypatch.setattr(lio_host, "FENCE_DIR", str(tmp_path / "fences"))
    commands: list[list[str]] = []
    monkeypatch.setattr(
        lio_host, "run_command", lambda argv: commands.append(argv) or subprocess.CompletedProcess(argv, 0, "", "")
    )
    return commands


def test_a_fence_disables_the_targets_after_arming_the_timer_that_lifts_it(rts, timers):
    call(export_op(), add_op())
    fenced = call({"op": "fence", "targets": [T, "iqn.2026-11.io.berth.storage:vol-never-published"],
                   "token": TOKEN, "seconds": 60})  # fmt: skip
    assert fenced["results"][0] == {"fenced": [T]}  # a volume published nowhere has no target: nothing to fence
    assert rts["targets"][T]["tpgs"][1]["enable"] is False
    (timer,) = timers
    assert timer[:6] == ["systemd-run", "--quiet", "--collect", f"--unit=berth-unfence-{TOKEN}", "--on-active=60s",
                         "--timer-property=AccuracySec=1s"]  # fmt: skip
    assert timer[6:] == ["sh", "-c", lio_host.ENABLE_SCRIPT, "sh", f"/sys/kernel/config/target/iscsi/{T}/tpgt_1/enable"]
    assert rts["saves"] == [None], "a fence is never saved: a reboot brings the targets back enabled"

    assert call({"op": "unfence", "token": TOKEN})["results"][0] == {"unfenced": [T]}
    assert rts["targets"][T]["tpgs"][1]["enable"] is True
    assert timers[-1] == ["systemctl", "stop", f"berth-unfence-{TOKEN}.timer"]
    assert call({"op": "unfence", "token": TOKEN})["results"][0] == {"unfenced": []}  # idempotent


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"op": "fence", "targets": [], "token": TOKEN, "seconds": 60}, "targets must be a list of 1..256"),
        ({"op": "fence", "targets": [T], "token": "ABC", "seconds": 60}, "token must be 16 to 64 lowercase hex"),
        ({"op": "fence", "targets": [T], "token": TOKEN, "seconds": 0}, "seconds must be an integer from 1 to 600"),
        ({"op": "unfence", "token": "../../etc/passwd"}, "token must be"),
    ],
)
def test_fence_requests_are_validated(op, message):
    with pytest.raises(lio_host.RequestError, match=re.escape(message)):
        lio_host.validate_op(op)
