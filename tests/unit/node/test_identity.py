"""The node ID (issue #13 item 6): which addresses enter it by default, and Kubernetes' length limit."""

import json

import pytest

from csi_driver.config import ConfigError
from csi_driver.node.identity import NodeIdTooLong, check_node_id, node_addresses, parse_addresses
from csi_driver.services.node import make_node_service


def link(name: str, kind: str, *addresses: str) -> dict:
    entry: dict = {"ifname": name, "addr_info": [{"local": a, "scope": "global"} for a in addresses]}
    if kind:
        entry["linkinfo"] = {"info_kind": kind}
    return entry


# `ip -j -d addr show scope global` on a Kubernetes node with IPVS kube-proxy, Calico, Docker and libvirt.
IP_JSON = json.dumps([
    link("ens3", "", "198.18.0.11"),
    link("ens4", "", "198.18.1.11", "169.254.3.4"),
    link("br0", "bridge", "192.0.2.11"),  # a host bridge carrying the node's own uplink address
    link("docker0", "bridge", "172.17.0.1"),
    link("virbr0", "bridge", "192.168.122.1"),
    link("cni0", "bridge", "10.244.3.1"),
    link("kube-ipvs0", "dummy", *[f"10.96.{i // 250}.{i % 250 + 1}" for i in range(300)]),
    link("cali0a1b2c3d4e5", "veth", "10.244.3.7"),
    link("flannel.1", "vxlan", "10.244.3.0"),
    link("tunl0", "ipip", "10.244.3.64"),
])  # fmt: skip


def test_default_addresses_leave_out_pod_service_and_shared_bridge_interfaces():
    assert node_addresses(parse_addresses(IP_JSON), []) == ["198.18.0.11", "198.18.1.11", "192.0.2.11"]


def test_storage_networks_choose_explicitly():
    found = parse_addresses(IP_JSON)
    assert node_addresses(found, ["198.18.1.0/24"]) == ["198.18.1.11"]
    assert node_addresses(found, ["10.96.0.0/12"])[:2] == ["10.96.0.1", "10.96.0.2"], "explicit CIDRs win"


def test_node_id_longer_than_kubernetes_accepts_stops_the_start(tmp_path):
    iqn = "iqn.2026-11.io.berth.lab:node1|"
    check_node_id(iqn + "198.18.0.11")
    too_long = iqn + ",".join(f"10.96.0.{i}" for i in range(1, 40))
    with pytest.raises(NodeIdTooLong, match="more than the 256 Kubernetes accepts.*storage_networks"):
        check_node_id(too_long)
    with pytest.raises(ConfigError, match="storage_networks"):
        make_node_service(too_long, str(tmp_path))
