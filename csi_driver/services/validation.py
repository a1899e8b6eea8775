"""The CSI spec's rules for request strings and maps (spec "Size Limits" and the name fields), for every service.

- A string is at most 128 bytes unless its field says otherwise (node IDs 256, paths longer).
- A map<string, string> is at most 4 KiB in all (keys and values counted).
- A name (CreateVolume, CreateSnapshot) is any Unicode except U+0000-U+0008, U+000B, U+000C, U+000E-U+001F and
  U+007F-U+009F (the control characters other than common whitespace).

Map keys and values (parameters, secrets, contexts) may hold no control character at all: none of Berth's has a
use for one, and they end up in LV tags, export options and iscsiadm arguments. A secret's value is never echoed.
IDs are not checked here: an ID Berth could not have made names nothing, which the services answer with NOT_FOUND.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from csi_driver.services.errors import invalid

MAX_STRING_BYTES = 128
MAX_MAP_BYTES = 4096
# The spec's banned characters in names.
_BANNED_IN_NAMES = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Every C0 and C1 control character (and DEL), for map keys and values.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def name_problem(value: str) -> str | None:
    """None when `value` is a valid CSI name, else what is wrong with it."""
    size = len(value.encode())
    if not size:
        return "is empty"
    if size > MAX_STRING_BYTES:
        return f"is {size} bytes, CSI allows {MAX_STRING_BYTES}"
    banned = _BANNED_IN_NAMES.search(value)
    if banned:
        return f"holds the control character U+{ord(banned.group()):04X}"
    return None


def check_name(field: str, value: str) -> None:
    """INVALID_ARGUMENT unless `value` is a valid CSI name (empty names included: they are required)."""
    problem = name_problem(value)
    if problem:
        raise invalid(f"{field} {value[:MAX_STRING_BYTES]!r} {problem}" if value else f"{field} is required")


def map_problem(field: str, mapping: Mapping[str, str], secret: bool = False) -> str | None:
    """None when the map keeps the spec's limits, else a sentence naming the field and key (never a secret value)."""
    total = 0
    for key, value in mapping.items():
        total += len(key.encode()) + len(value.encode())
        shown = repr(key[:MAX_STRING_BYTES])
        if len(key.encode()) > MAX_STRING_BYTES:
            return f"{field} key {shown}... is {len(key.encode())} bytes, CSI allows {MAX_STRING_BYTES}"
        if _CONTROL.search(key):
            return f"{field} key {shown} holds a control character"
        what = f"{field}[{shown}]"
        if len(value.encode()) > MAX_STRING_BYTES:
            return f"{what} is {len(value.encode())} bytes, CSI allows {MAX_STRING_BYTES}"
        if _CONTROL.search(value):
            return f"{what} holds a control character" + ("" if secret else f": {value[:MAX_STRING_BYTES]!r}")
    if total > MAX_MAP_BYTES:
        return f"{field} holds {total} bytes, CSI allows {MAX_MAP_BYTES}"
    return None


def check_mutable_parameters(
    mutable: Mapping[str, str], allowed: Mapping[str, tuple[str, ...]], backend: str
) -> None:
    """INVALID_ARGUMENT unless every mutable parameter (VolumeAttributesClass) is one `backend` offers, with one of
    its allowed values; the message names the key and what is allowed."""
    offered = "; ".join(f"{key}: {', '.join(values)}" for key, values in sorted(allowed.items())) or "none"
    for key, value in sorted(mutable.items()):
        if key not in allowed:
            raise invalid(f"unknown mutable parameter {key!r}: backend {backend} offers {offered}")
        if value not in allowed[key]:
            raise invalid(f"mutable parameter {key}={value!r} is not allowed: use one of {', '.join(allowed[key])}")


def check_maps(request: Any) -> None:
    """INVALID_ARGUMENT unless every map<string, string> field of the request (parameters, secrets, contexts...)
    keeps the spec's limits; fields whose name ends in 'secrets' are treated as secret."""
    for field in request.DESCRIPTOR.fields:
        entry = field.message_type
        if entry is None or not entry.GetOptions().map_entry:
            continue
        problem = map_problem(field.name, getattr(request, field.name), secret=field.name.endswith("secrets"))
        if problem:
            raise invalid(problem)
