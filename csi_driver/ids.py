"""The identifiers the controller and the node exchange through CSI messages (see docs/design.md).

Both services import this module; it imports nothing from either layer, so the formats live in one place.

- node ID:   `<initiator IQN>|<address>[,<address>...]`
- volume ID: `<backend>/<lv>` (snapshot IDs have the same shape)
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

NODE_ID_SEPARATOR = "|"
ADDRESS_SEPARATOR = ","
VOLUME_ID_SEPARATOR = "/"
# CSI recommends IDs of at most 128 bytes; the spec makes it a SHOULD, so we warn via the error text only.
RECOMMENDED_MAX_ID_BYTES = 128

# RFC 3720 names as open-iscsi writes them; the separators we use can never appear inside one.
_IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[A-Za-z0-9][A-Za-z0-9.-]*(:[^\s|,]+)?|eui\.[0-9A-Fa-f]{16})$")
# Backend names come from the config; LV names from storage/ids.py. Both are conservative charsets.
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+_.-]{0,126}$")


class InvalidId(ValueError):
    """An ID that does not follow the format; the message says which part is wrong."""


@dataclass(frozen=True)
class NodeId:
    iqn: str
    addresses: tuple[str, ...]

    def encode(self) -> str:
        return encode_node_id(self.iqn, self.addresses)


def encode_node_id(iqn: str, addresses: list[str] | tuple[str, ...]) -> str:
    """Build a node ID; raises InvalidId for an empty or malformed IQN or address."""
    _check_iqn(iqn)
    if not addresses:
        raise InvalidId("a node ID needs at least one address")
    for address in addresses:
        _check_address(address)
    return iqn + NODE_ID_SEPARATOR + ADDRESS_SEPARATOR.join(addresses)


def parse_node_id(node_id: str) -> NodeId:
    """Split a node ID into IQN and addresses; a node ID that does not parse names no node."""
    iqn, sep, rest = node_id.partition(NODE_ID_SEPARATOR)
    if not sep:
        raise InvalidId(f"node ID {node_id!r} has no '|' between initiator IQN and addresses")
    _check_iqn(iqn)
    addresses = tuple(rest.split(ADDRESS_SEPARATOR)) if rest else ()
    if not addresses:
        raise InvalidId(f"node ID {node_id!r} lists no addresses after '|'")
    for address in addresses:
        _check_address(address)
    return NodeId(iqn, addresses)


def join_volume_id(backend: str, lv: str) -> str:
    _check_part("backend", backend)
    _check_part("LV name", lv)
    return backend + VOLUME_ID_SEPARATOR + lv


def split_volume_id(volume_id: str) -> tuple[str, str]:
    """`<backend>/<lv>` → (backend, lv); raises InvalidId for anything else (sanity's `fake-vol-id`)."""
    backend, sep, lv = volume_id.partition(VOLUME_ID_SEPARATOR)
    if not sep:
        raise InvalidId(f"ID {volume_id!r} is not '<backend>/<lv>'")
    _check_part("backend", backend)
    _check_part("LV name", lv)
    return backend, lv


def _check_iqn(iqn: str) -> None:
    if not _IQN_RE.match(iqn or ""):
        raise InvalidId(f"{iqn!r} is not an initiator name (iqn.yyyy-mm.domain[:id] or eui.<16 hex>)")


def _check_address(address: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise InvalidId(f"{address!r} is not an IP address") from None


def _check_part(what: str, value: str) -> None:
    if not _PART_RE.match(value or ""):
        raise InvalidId(f"{what} {value!r} must be 1-127 of [A-Za-z0-9+_.-], starting alphanumeric")
