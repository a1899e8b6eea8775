"""This node's identity for NodeGetInfo: the iSCSI initiator name and the addresses NFS exports allow."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Sequence

from csi_driver.ids import InvalidId, encode_node_id

from .commands import Runner
from .errors import NodeError

log = logging.getLogger("berth.node.identity")

INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"


def read_initiator_iqn(path: str = INITIATOR_FILE) -> str | None:
    """`InitiatorName=iqn...` from open-iscsi's file; None when absent (no iSCSI on this node)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key.strip() == "InitiatorName" and value.strip():
                    return value.strip()
    except OSError:
        return None
    return None


def discover_addresses(runner: Runner) -> list[str]:
    """Global-scope addresses of this host, as `ip -j addr` lists them (loopback and link-local excluded)."""
    result = runner.run(["ip", "-j", "addr", "show", "scope", "global"], timeout=10)
    addresses = []
    for link in json.loads(result.stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("local") and info.get("scope") == "global":
                addresses.append(info["local"])
    return addresses


def local_node_id(addresses: Sequence[str], fallback: str, initiator_file: str = INITIATOR_FILE) -> str:
    """`<iqn>|<addresses>` (docs/design.md), or `fallback` (the host name) when this node has no initiator
    name or address; the controller then treats the node as unknown, which is right for such a node."""
    iqn = read_initiator_iqn(initiator_file)
    try:
        if iqn is None:
            raise InvalidId(f"no InitiatorName in {initiator_file}")
        return encode_node_id(iqn, list(addresses))
    except InvalidId as err:
        log.warning("node ID falls back to the host name", extra={"reason": str(err), "node_id": fallback})
        return fallback


def in_networks(addresses: Sequence[str], networks: Sequence[str]) -> list[str]:
    """The addresses inside any of `networks` (CIDRs), in order; all of them when `networks` is empty."""
    if not networks:
        return list(addresses)
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    return [a for a in addresses if any(ipaddress.ip_address(a) in net for net in nets)]


def default_node_id(
    fallback: str,
    storage_networks: Sequence[str] = (),
    runner: Runner | None = None,
    initiator_file: str = INITIATOR_FILE,
) -> str:
    """The node ID when `--node-id` is not given: IQN + global addresses in the storage networks, else `fallback`."""
    from .commands import LocalRunner

    try:
        addresses = in_networks(discover_addresses(runner or LocalRunner()), storage_networks)
    except (NodeError, ValueError) as err:
        log.warning("cannot list this node's addresses", extra={"error": str(err)})
        addresses = []
    return local_node_id(addresses, fallback, initiator_file)
