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
# CSI's general size limit for strings; Berth's volume and snapshot IDs stay within it (config limits backend names).
RECOMMENDED_MAX_ID_BYTES = 128
# The spec's own limit for node IDs (NodeGetInfoResponse.node_id).
MAX_NODE_ID_BYTES = 256

# THE rule for iSCSI initiator names (RFC 3720 iqn/eui/naa, in the charset LIO accepts; LIO stores iqn names
# lower-case), used by the node ID, the controller and the storage host alike, so a node ID the controller accepts
# never fails at publish. lio_host.py must keep a verbatim copy (it runs alone on the host); a unit test keeps them
# equal. None of these characters is a node ID separator.
IQN_PATTERN = r"iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.-]*(?::[A-Za-z0-9.:_-]+)?"
EUI_PATTERN = r"eui\.[0-9A-Fa-f]{16}"
NAA_PATTERN = r"naa\.[0-9A-Fa-f]{16}(?:[0-9A-Fa-f]{16})?"
MAX_INITIATOR_NAME_BYTES = 223
_INITIATOR_RE = re.compile(f"{IQN_PATTERN}|{EUI_PATTERN}|{NAA_PATTERN}")
# Backend names come from the config; LV names from storage/ids.py. Both are conservative charsets.
_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_.-]{0,126}")


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
    if len(node_id.encode()) > MAX_NODE_ID_BYTES:
        raise InvalidId(f"node ID is {len(node_id.encode())} bytes, CSI allows {MAX_NODE_ID_BYTES}")
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
    if len(volume_id.encode()) > RECOMMENDED_MAX_ID_BYTES:
        raise InvalidId(f"ID is {len(volume_id.encode())} bytes; Berth's IDs are at most {RECOMMENDED_MAX_ID_BYTES}")
    backend, sep, lv = volume_id.partition(VOLUME_ID_SEPARATOR)
    if not sep:
        raise InvalidId(f"ID {volume_id!r} is not '<backend>/<lv>'")
    _check_part("backend", backend)
    _check_part("LV name", lv)
    return backend, lv


def is_initiator_name(name: str) -> bool:
    return len(name) <= MAX_INITIATOR_NAME_BYTES and bool(_INITIATOR_RE.fullmatch(name))


def _check_iqn(iqn: str) -> None:
    if not is_initiator_name(iqn or ""):
        raise InvalidId(
            f"{iqn!r} is not an initiator name (iqn.yyyy-mm.domain[:id] in lower case, eui.<16 hex> or naa.<hex>)"
        )


def _check_address(address: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise InvalidId(f"{address!r} is not an IP address") from None


def _check_part(what: str, value: str) -> None:
    if not _PART_RE.fullmatch(value or ""):
        raise InvalidId(f"{what} {value!r} must be 1-127 of [A-Za-z0-9+_.-], starting alphanumeric")
