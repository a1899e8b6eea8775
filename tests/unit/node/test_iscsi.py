import os

import pytest

from csi_driver.node.commands import Result
from csi_driver.node.errors import (
    AttachFailed,
    CommandFailed,
    DetachFailed,
    InvalidVolume,
    LoginRefused,
    WwnMismatch,
    masked,
)
from csi_driver.node.iscsi import (
    ISCSI_ERR_LOGIN_AUTH_FAILED,
    SECRET_PASSWORD_IN,
    SECRET_USER_IN,
    connection_properties,
    normalize_wwn,
    targets_from_publish_context,
)
from csi_driver.node.stage_record import StageRecord

from .conftest import WWN
from .fakes import FakeConnector


def test_single_portal_uses_singular_keys_and_chap():
    targets = targets_from_publish_context({"targetPortals": "198.18.0.2", "targetIqn": "iqn.x:v", "targetLun": "0"})
    props = connection_properties(targets, {"node.session.auth.username": "u", "node.session.auth.password": "p"})
    assert props == {
        "target_portal": "198.18.0.2:3260",
        "target_iqn": "iqn.x:v",
        "target_lun": 0,
        "auth_method": "CHAP",
        "auth_username": "u",
        "auth_password": "p",
    }


def test_two_portals_mean_enforced_multipath():
    ctx = {"targetPortals": "198.18.0.2:3260,198.18.1.2:3260", "targetIqn": "iqn.x:v", "targetLun": "3"}
    props = connection_properties(targets_from_publish_context(ctx), {})
    assert props["target_portals"] == ["198.18.0.2:3260", "198.18.1.2:3260"]
    assert props["target_iqns"] == ["iqn.x:v", "iqn.x:v"] and props["target_luns"] == [3, 3]
    assert props["enforce_multipath"] is True and "auth_method" not in props


@pytest.mark.parametrize("ctx", [{}, {"targetPortals": "1.2.3.4"}, {"targetIqn": "iqn.x:v", "targetPortals": " "}])
def test_incomplete_publish_context(ctx):
    with pytest.raises(InvalidVolume, match="targetPortals and targetIqn"):
        targets_from_publish_context(ctx)


@pytest.mark.parametrize("text", [WWN, "3" + WWN, "naa." + WWN, "wwn-0x" + WWN, "0x" + WWN.upper()])
def test_normalize_wwn(text):
    assert normalize_wwn(text) == WWN


PROPS = {"target_portal": "198.18.0.2:3260", "target_iqn": "iqn.x:v", "target_lun": 0}


def test_attach_sets_manual_startup_after_login(node):
    iscsi = node.volumes.protocols["iscsi"]
    device = iscsi.attach(dict(PROPS), False, WWN, {})
    assert device.path == node.device and device.wwn == WWN
    assert node.connector_log[0][0] == "connect"
    assert node.system.calls == [
        ["iscsiadm", "-m", "node", "-T", "iqn.x:v", "-p", "198.18.0.2:3260", "--op", "update",
         "-n", "node.startup", "-v", "manual"]
    ]  # fmt: skip


def test_mutual_chap_is_written_into_the_node_record_before_login(node):
    iscsi = node.volumes.protocols["iscsi"]
    secrets = {"node.session.auth.username_in": "tgt", "node.session.auth.password_in": "pw"}
    iscsi.attach(dict(PROPS), False, WWN, secrets)
    updates = [c[-3:] for c in node.system.commands("iscsiadm") if "update" in c]
    assert updates[:2] == [
        ["node.session.auth.username_in", "-v", "tgt"],
        ["node.session.auth.password_in", "-v", "pw"],
    ]
    assert ["--interface", "default", "--op", "new"] == node.system.calls[0][-4:]


def test_wrong_wwn_detaches_and_refuses(node):
    iscsi = node.volumes.protocols["iscsi"]
    with pytest.raises(WwnMismatch, match="refusing"):
        iscsi.attach(dict(PROPS), False, "6001405" + "0" * 25, {})
    kinds = [entry[0] for entry in node.connector_log]
    assert kinds == ["connect", "disconnect"]
    assert node.connector_log[1][3] is True  # force


def test_a_t10_designator_from_os_brick_is_checked_against_the_kernels_wwid(node):
    os.makedirs(os.path.join(node.root, "sys", "sdb", "device"))
    with open(os.path.join(node.root, "sys", "sdb", "device", "wwid"), "w") as f:
        f.write(f"naa.{WWN}\n")
    iscsi = node.volumes.protocols["iscsi"]
    # os-brick answering with the LUN's T10 vendor designator instead of its NAA WWN
    t10 = "1lio-org_iblock:b0bfba3e-6de0-3abb-bef9"
    iscsi.connector_factory = lambda multipath: FakeConnector(node.device, t10, node.connector_log)
    device = iscsi.attach(dict(PROPS), False, WWN, {})
    assert device.wwn == WWN and [e[0] for e in node.connector_log] == ["connect"]


def _login_answers(rc: int):
    def handler(args):
        if args[-1] == "--login":
            return Result(rc, "", "iscsiadm: Login failed ... (exit status 24)" if rc else "")
        return None

    return handler


def test_refused_login_is_named_when_os_brick_finds_no_device(node):
    iscsi = node.volumes.protocols["iscsi"]
    node.device = ""  # os-brick found no device (its "Volume device not found at .")
    node.system.handlers.append(_login_answers(ISCSI_ERR_LOGIN_AUTH_FAILED))
    with pytest.raises(LoginRefused, match="authorization failed.*CHAP") as caught:
        iscsi.attach(dict(PROPS, auth_password="wrong-secret"), False, WWN, {})
    assert "wrong-secret" not in str(caught.value)
    assert not any(c[-1] == "--logout" for c in node.system.calls)
    updates = {c[c.index("-n") + 1]: c[-1] for c in node.system.commands("iscsiadm") if "update" in c}
    assert updates["node.session.auth.password"] == "wrong-secret", "the diagnosis logs in like os-brick did"
    assert node.system.calls[-1][-2:] == ["--op", "delete"], "no node record is left behind"


def test_other_attach_failures_stay_attach_failed_and_leave_no_session(node):
    iscsi = node.volumes.protocols["iscsi"]
    node.device = ""  # os-brick found no device (its "Volume device not found at .")
    node.system.handlers.append(_login_answers(0))
    with pytest.raises(AttachFailed) as caught:
        iscsi.attach(dict(PROPS), False, WWN, {})
    assert not isinstance(caught.value, LoginRefused)
    assert node.system.calls[-2][-1] == "--logout", "the diagnostic login is undone"
    assert node.system.calls[-1][-2:] == ["--op", "delete"]


def test_passwords_are_masked_in_command_errors():
    argv = ["iscsiadm", "-m", "node", "--op", "update", "-n", "node.session.auth.password_in", "-v", "s3cret"]
    err = CommandFailed(argv, 1, "boom")
    assert "s3cret" not in str(err) and "***" in str(err)
    assert masked(["iscsiadm", "-n", "node.session.auth.username", "-v", "user"])[-1] == "user"


def _multipath_record(node) -> StageRecord:
    return StageRecord("lab/vol-1", "iscsi", "/staging", "block", connection_properties=dict(PROPS),
                       device_path=node.device, wwn=WWN, multipath=True)  # fmt: skip


def _map(node) -> str:
    """The volume's multipath map dm-0, as udev and sysfs show it."""
    map_device = os.path.join(node.root, "dm-0")
    open(map_device, "w").close()
    os.symlink(map_device, os.path.join(node.by_id, f"dm-uuid-mpath-3{WWN}"))
    os.makedirs(os.path.join(node.root, "sys", "dm-0", "dm"))
    with open(os.path.join(node.root, "sys", "dm-0", "dm", "name"), "w") as f:
        f.write(f"3{WWN}\n")
    return map_device


def test_a_multipath_detach_flushes_through_its_map(node):
    map_device = _map(node)
    node.volumes.protocols["iscsi"].detach(_multipath_record(node), map_device)
    assert node.system.commands("multipath") == [["multipath", "-f", f"3{WWN}"]]
    assert [e[3] for e in node.connector_log if e[0] == "disconnect"] == [False]  # force


def test_a_map_still_in_use_for_a_moment_is_flushed_again_within_seconds(node, monkeypatch):
    # os-brick's own flush would retry after 20 and then 40 s (the lab saw a 63 s NodeUnstage).
    monkeypatch.setattr("csi_driver.node.iscsi.MAP_FLUSH_INTERVAL", 0.0)
    map_device = _map(node)
    busy = iter([Result(1, "", "map in use"), Result(1, "", "map in use")])
    node.system.handlers.append(lambda argv: next(busy, None) if argv[0] == "multipath" else None)
    node.volumes.protocols["iscsi"].detach(_multipath_record(node), map_device)
    assert len(node.system.commands("multipath")) == 3
    assert node.system.commands("udevadm") == [["udevadm", "settle", "--timeout=10"]] * 3
    assert [e[0] for e in node.connector_log] == ["disconnect", "sweep locks"]


def test_a_multipath_detach_that_failed_half_way_is_finished_by_force(node):
    # The map was flushed and removed, a path device is left: nothing is left to flush, and os-brick's flush of that
    # dying path (ENXIO) would fail every non-forced retry.
    node.volumes.protocols["iscsi"].detach(_multipath_record(node), node.device)
    assert [e[3] for e in node.connector_log if e[0] == "disconnect"] == [True]  # force


def _record(node) -> StageRecord:
    return StageRecord("lab/vol-1", "iscsi", "/staging", "block", connection_properties=dict(PROPS),
                       device_path=node.device, wwn=WWN)  # fmt: skip


def _no_connector(multipath: bool) -> FakeConnector:
    raise ImportError("No module named 'os_brick'")  # what a broken os-brick install raises while building it


@pytest.mark.parametrize(
    "step, error",
    [
        (lambda iscsi, node: iscsi.attach(dict(PROPS), False, WWN, {SECRET_USER_IN: "tgt", SECRET_PASSWORD_IN: "pw"}),
         AttachFailed),
        (lambda iscsi, node: iscsi.detach(_record(node), node.device), DetachFailed),
        (lambda iscsi, node: iscsi.expand(_record(node)), AttachFailed),
    ],
    ids=["attach", "detach", "expand"],
)  # fmt: skip
def test_a_connector_that_cannot_be_built_fails_the_step_like_os_brick_does(node, step, error):
    iscsi = node.volumes.protocols["iscsi"]
    iscsi.connector_factory = _no_connector
    with pytest.raises(error) as caught:
        step(iscsi, node)
    assert str(caught.value) == (
        "cannot set up os-brick's iSCSI connector for iqn.x:v at 198.18.0.2:3260: No module named 'os_brick'"
    )
    assert node.system.calls == [] and node.connector_log == [], "nothing was changed on the node"


def test_a_lock_sweep_that_fails_is_logged_and_the_detach_stands(node, caplog):
    iscsi = node.volumes.protocols["iscsi"]

    def broken_sweep() -> None:
        raise PermissionError("lock_path is read-only")

    iscsi.sweep_locks = broken_sweep
    iscsi.detach(_record(node), node.device)
    assert [e[0] for e in node.connector_log] == ["disconnect"]
    assert "cannot remove os-brick's portal lock files" in caplog.text


@pytest.mark.parametrize(
    "multipath, expected_wwn, reason",
    [
        (False, "6001405" + "0" * 25, f"has WWN {WWN}, not 6001405{'0' * 25}; refusing to use it"),
        (True, WWN, f"multipathd assembled no map for WWN {WWN}"),
    ],
    ids=["wrong-wwn", "no-multipath-map"],
)
def test_a_wrong_device_that_cannot_be_detached_names_both_failures(node, multipath, expected_wwn, reason):
    iscsi = node.volumes.protocols["iscsi"]
    connector = FakeConnector(node.device, "3" + WWN, node.connector_log)
    connector.disconnect_error = RuntimeError("map in use")
    iscsi.connector_factory = lambda multipath: connector
    with pytest.raises(DetachFailed) as caught:
        iscsi.attach(dict(PROPS), multipath, expected_wwn, {})
    assert type(caught.value) is DetachFailed
    assert reason in str(caught.value), "why the device was dropped"
    assert str(caught.value).endswith("detaching it failed too: iSCSI detach from iqn.x:v at 198.18.0.2:3260 failed: "
                                      "map in use")  # fmt: skip
