"""Turn CSI messages into loggable dicts with every field marked `csi_secret` in the proto stripped.

Which fields are secret comes from the `csi.v1.csi_secret` field option, so a new secret field in a future
CSI version is redacted without anyone keeping a list.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from csi_driver.csi import csi_pb2

REDACTED = "***stripped***"


@cache
def _is_secret(field: FieldDescriptor) -> bool:
    # protoc's .pyi declares the extension a plain FieldDescriptor, not the _ExtensionFieldDescriptor the stubs want.
    return bool(field.GetOptions().Extensions[csi_pb2.csi_secret])  # type: ignore[index]


def redact(message: Message) -> dict[str, Any]:
    """A JSON-friendly dict of `message` with secrets replaced by a marker (a secret map's keys too)."""
    result: dict[str, Any] = {}
    for field, value in message.ListFields():
        if _is_secret(field):
            result[field.name] = REDACTED
        else:
            result[field.name] = _value(field, value)
    return result


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {key: _scalar_or_message(value_field, item) for key, item in value.items()}
    if field.is_repeated:
        return [_scalar_or_message(field, item) for item in value]
    return _scalar_or_message(field, value)


def _scalar_or_message(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return redact(value)
    if field.enum_type is not None:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value
