"""No field marked csi_secret, in any CSI message, may reach the log."""

import io
import logging

import pytest
from google.protobuf import descriptor_pool

from csi_driver.csi import csi_pb2
from csi_driver.server.logs import configure_logging
from csi_driver.server.redaction import REDACTED, redact

SENTINEL = "hunter2-do-not-log"


def all_message_types():
    file = descriptor_pool.Default().FindFileByName(csi_pb2.DESCRIPTOR.name)
    pending = list(file.message_types_by_name.values())
    while pending:
        descriptor = pending.pop()
        if not descriptor.GetOptions().map_entry:
            yield descriptor
        pending.extend(descriptor.nested_types)


def secret_fields(descriptor):
    return [f for f in descriptor.fields if f.GetOptions().Extensions[csi_pb2.csi_secret]]


MESSAGES_WITH_SECRETS = [d for d in all_message_types() if secret_fields(d)]


def test_the_proto_marks_the_expected_secrets():
    names = {d.name for d in MESSAGES_WITH_SECRETS}
    # A spot check that the option is read from the proto, not from a list: these carry `secrets` in CSI 1.12.
    assert {"CreateVolumeRequest", "NodeStageVolumeRequest", "ControllerPublishVolumeRequest"} <= names
    assert len(names) >= 14


def fill_secret(message, field):
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        getattr(message, field.name)[SENTINEL + "-key"] = SENTINEL
    elif field.type == field.TYPE_STRING:
        setattr(message, field.name, SENTINEL)
    else:
        pytest.fail(f"unexpected secret field type {field.full_name}")


@pytest.mark.parametrize("descriptor", MESSAGES_WITH_SECRETS, ids=lambda d: d.name)
def test_secret_never_reaches_the_log(descriptor):
    message_class = getattr(csi_pb2, descriptor.name)
    message = (
        message_class(volume_id="vol-1") if "volume_id" in descriptor.fields_by_name else message_class()
    )
    for field in secret_fields(descriptor):
        fill_secret(message, field)
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    logging.getLogger("test").debug("request", extra={"request": redact(message)})
    output = stream.getvalue()
    assert SENTINEL not in output
    assert REDACTED in output
    if "volume_id" in descriptor.fields_by_name:
        assert "vol-1" in output, "non-secret fields stay visible"


def test_nested_messages_and_enums_are_rendered():
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        volume_capabilities=[
            csi_pb2.VolumeCapability(
                block=csi_pb2.VolumeCapability.BlockVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(
                    mode=csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER
                ),
            )
        ],
        parameters={"fsType": "xfs"},
        secrets={"password": SENTINEL},
    )
    rendered = redact(request)
    assert rendered["secrets"] == REDACTED
    assert rendered["parameters"] == {"fsType": "xfs"}
    assert rendered["volume_capabilities"][0]["access_mode"]["mode"] == "MULTI_NODE_MULTI_WRITER"
