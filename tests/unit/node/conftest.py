from __future__ import annotations

import os
from dataclasses import dataclass, field

import grpc
import pytest

from csi_driver.node.filesystems import Filesystems
from csi_driver.node.iscsi import IscsiVolumes
from csi_driver.node.mounts import Mounter
from csi_driver.node.nfs import NfsVolumes
from csi_driver.node.volumes import NodeVolumes
from csi_driver.services.node import NodeService

from .fakes import FakeConnector, FakeSystem

WWN = "6001405abcdef0123456789abcdef012"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    def abort(self, code, details):
        raise Aborted(code, details)


@dataclass
class Node:
    root: str
    system: FakeSystem
    connectors: list[FakeConnector]
    connector_log: list
    by_id: str
    device: str
    service: NodeService
    volumes: NodeVolumes
    extend_errors: list[Exception] = field(default_factory=list)  # os-brick's extend_volume raises these first

    def make_service(self) -> NodeService:
        """A fresh plugin process on the same host: same state dir, same devices, no memory."""
        service, volumes = build(self.root, self.system, self)
        self.service, self.volumes = service, volumes
        return service

    def remove_device(self) -> None:
        os.unlink(os.path.join(self.by_id, f"wwn-0x{WWN}"))
        os.unlink(self.device)


def build(root: str, system: FakeSystem, node: Node | None = None):
    mounter = Mounter(system, system.table)
    fs = Filesystems(system, mounter)

    def factory(multipath: bool) -> FakeConnector:
        connector = FakeConnector(device=node.device, wwn="3" + WWN, log=node.connector_log)
        connector.extend_errors = node.extend_errors
        node.connectors.append(connector)
        return connector

    iscsi = IscsiVolumes(
        system,
        mounter,
        fs,
        factory,
        by_id_dir=os.path.join(root, "by-id"),
        sys_block_dir=os.path.join(root, "sys"),
        dev_dir=os.path.join(root, "dev"),
        sweep_locks=lambda: node.connector_log.append(("sweep locks",)),
        multipath_wait=0.0,
    )
    volumes = NodeVolumes(os.path.join(root, "state"), {"iscsi": iscsi, "nfs": NfsVolumes(mounter)}, mounter, fs)
    return NodeService("iqn.2026-11.io.berth.lab:node1|198.18.0.11", volumes, max_volumes_per_node=16), volumes


@pytest.fixture
def node(tmp_path) -> Node:
    root = str(tmp_path)
    by_id = os.path.join(root, "by-id")
    os.makedirs(by_id)
    os.makedirs(os.path.join(root, "dev"))
    device = os.path.join(root, "dev", "sdb")
    open(device, "w").close()
    os.symlink(device, os.path.join(by_id, f"wwn-0x{WWN}"))
    os.makedirs(os.path.join(root, "staging"))
    os.makedirs(os.path.join(root, "mnt"))
    system = FakeSystem()
    system.sizes[device] = 10 << 30
    n = Node(root, system, [], [], by_id, device, None, None)  # type: ignore[arg-type]
    n.make_service()
    return n


@pytest.fixture
def context() -> FakeContext:
    return FakeContext()
