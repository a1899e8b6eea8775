import pytest

from csi_driver.node.commands import Result
from csi_driver.node.errors import AttachFailed, CommandFailed, InvalidVolume, LoginRefused, WwnMismatch, masked
from csi_driver.node.iscsi import (
    ISCSI_ERR_LOGIN_AUTH_FAILED,
    connection_properties,
    normalize_wwn,
    targets_from_publish_context,
)

from .conftest import WWN


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
