"""This node's identity for NodeGetInfo: the iSCSI initiator name and the addresses NFS exports allow."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from csi_driver.ids import InvalidId, encode_node_id

from .commands import Runner
from .errors import NodeError

log = logging.getLogger("berth.node.identity")


class NodeIdTooLong(ValueError):
    pass


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


# Kubernetes refuses a CSINode whose driver node ID is longer than this; kubelet's registration then fails over
# and over with an error far from its cause, so Berth refuses to start instead.
NODE_ID_MAX_BYTES = 256
# Interfaces whose addresses are not how this node reaches a storage host, used when no storage_networks are
# configured: container and VM bridges that every node has with the same address (docker0 172.17.0.1, virbr0
# 192.168.122.1), pod-network bridges, tunnels and veths, and kube-ipvs0, which holds every Service ClusterIP
# when kube-proxy runs in IPVS mode.
POD_AND_SERVICE_INTERFACES = (
    "docker", "br-", "cni", "cbr", "flannel", "cali", "cilium", "lxc", "veth", "kube-", "virbr", "weave", "vxlan",
    "tunl", "genev", "nodelocaldns", "podman", "antrea", "ovn-k8s",
)  # fmt: skip
VIRTUAL_LINK_KINDS = ("veth", "dummy", "vxlan", "ipip", "geneve", "sit")


@dataclass(frozen=True)
class Address:
    address: str
    interface: str
    kind: str  # `ip -d` linkinfo.info_kind: "" for a plain NIC, "bridge", "veth", "dummy", ...


def discover_addresses(runner: Runner) -> list[Address]:
    """Global-scope addresses of this host with their interfaces, as `ip -j -d addr` lists them."""
    result = runner.run(["ip", "-j", "-d", "addr", "show", "scope", "global"], timeout=10)
    return parse_addresses(result.stdout)


def parse_addresses(ip_json: str) -> list[Address]:
    addresses = []
    for link in json.loads(ip_json or "[]"):
        kind = link.get("linkinfo", {}).get("info_kind", "")
        for info in link.get("addr_info", []):
            if info.get("local") and info.get("scope") == "global":
                addresses.append(Address(info["local"], link.get("ifname", ""), kind))
    return addresses


def node_addresses(found: Sequence[Address], storage_networks: Sequence[str]) -> list[str]:
    """The addresses for the node ID: those inside `storage_networks` when any are configured (the way to
    choose), else every address except link-local ones and those on pod, service and VM-bridge interfaces."""
    if storage_networks:
        return in_networks([a.address for a in found], storage_networks)
    chosen = []
    for a in found:
        if a.interface.startswith(POD_AND_SERVICE_INTERFACES) or a.kind in VIRTUAL_LINK_KINDS:
            log.info("address left out of the node ID", extra={"address": a.address, "interface": a.interface})
        elif not ipaddress.ip_address(a.address).is_link_local:
            chosen.append(a.address)
    return chosen


def check_node_id(node_id: str) -> None:
    """NodeIdTooLong unless Kubernetes can store `node_id` in its CSINode object."""
    size = len(node_id.encode())
    if size > NODE_ID_MAX_BYTES:
        raise NodeIdTooLong(
            f"the node ID is {size} bytes, more than the {NODE_ID_MAX_BYTES} Kubernetes accepts in a CSINode: "
            f"{node_id!r}. Set node.storage_networks to the storage networks' CIDRs (or pass a shorter --node-id)"
        )


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
    """The node ID when `--node-id` is not given: IQN + the addresses node_addresses picks, else `fallback`."""
    from .commands import LocalRunner

    try:
        addresses = node_addresses(discover_addresses(runner or LocalRunner()), storage_networks)
    except (NodeError, ValueError) as err:
        log.warning("cannot list this node's addresses", extra={"error": str(err)})
        addresses = []
    return local_node_id(addresses, fallback, initiator_file)
