"""iSCSI exports of thin LVs: one LIO target per volume, one ACL per published node (LUN masking)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from . import tags as meta_keys
from .backend import NodeRef, filesystem_minimum_bytes
from .errors import InvalidRequest
from .ids import naa_wwn, volume_serial
from .lio import Chap, LioTargets
from .lvm import LvInfo

# Secret keys as iscsiadm names them, so one Kubernetes Secret serves ControllerPublish and NodeStage.
CHAP_USER = "node.session.auth.username"
CHAP_PASSWORD = "node.session.auth.password"
MUTUAL_USER = "node.session.auth.username_in"
MUTUAL_PASSWORD = "node.session.auth.password_in"
# Mutable parameter: SCSI UNMAP / WRITE SAME(unmap) passed down to the thin LV, so a node's discard frees pool space.
UNMAP_PARAMETER = "iscsiUnmap"


def chap_from_secrets(secrets: Mapping[str, str]) -> Chap | None:
    """Session CHAP (and mutual CHAP) from publish secrets; no secrets means no CHAP."""
    user, password = secrets.get(CHAP_USER), secrets.get(CHAP_PASSWORD)
    mutual_user, mutual_password = secrets.get(MUTUAL_USER), secrets.get(MUTUAL_PASSWORD)
    if not any((user, password, mutual_user, mutual_password)):
        return None
    if not (user and password):
        raise InvalidRequest(f"CHAP secrets need both {CHAP_USER} and {CHAP_PASSWORD}")
    if bool(mutual_user) != bool(mutual_password):
        raise InvalidRequest(f"mutual CHAP needs both {MUTUAL_USER} and {MUTUAL_PASSWORD}")
    return Chap(user, password, mutual_user or None, mutual_password or None)


class IscsiExporter:
    protocol = "iscsi"
    fresh_needs_prepare = False  # prepare() does nothing: the target is made at first publish
    mutable_parameters = {UNMAP_PARAMETER: ("true", "false")}

    def __init__(self, targets: LioTargets, portals: Sequence[str]) -> None:
        self.targets = targets
        self.portals = list(portals)

    def volume_context(self, lv: str) -> dict[str, str]:
        # The serial is derived from the LV name, so the WWN is known before the LUN exists.
        return {"wwn": naa_wwn(volume_serial(lv))}

    def minimum_bytes(self, parameters: Mapping[str, str]) -> int:
        # The node makes the filesystem of a mount volume; fsType is the StorageClass's choice.
        return filesystem_minimum_bytes(parameters.get("fsType", ""))

    def check_parameters(self, parameters: Mapping[str, str]) -> None:
        """Nothing iSCSI-specific: fsType is checked with the volume capabilities."""

    def prepare(self, lv: LvInfo, fresh: bool, max_bytes: int) -> None:
        """Nothing to do: the target is created on first publish, so unpublished volumes cost LIO nothing.
        A clone larger than its source has a filesystem smaller than its LUN: the node grows it at stage time."""

    def publish(self, lv: LvInfo, node: NodeRef, readonly: bool, secrets: Mapping[str, str]) -> dict[str, str]:
        chap = chap_from_secrets(secrets)
        export = self.targets.ensure_published(
            lv.name, lv.device_path, self.portals, node.initiator, readonly, chap, unmap=_unmap(lv)
        )
        return export.publish_context(readonly)

    def modify(self, lv: LvInfo) -> None:
        # Live on the backstore; a node sees the change once it rescans the LUN (docs/storage-host.md).
        self.targets.configure(lv.name, unmap=_unmap(lv))

    def unpublish(self, lv: LvInfo, node: NodeRef) -> None:
        # Removing the ACL ends the node's session and hides the LUN from it.
        self.targets.remove_initiator(lv.name, node.initiator)

    def teardown(self, lv: LvInfo) -> None:
        self.targets.unexport(lv.name)

    def grown(self, lv: LvInfo, max_bytes: int) -> bool:
        # LIO's block backstore reports the LV's new size at once; nodes must rescan (and resize the fs).
        return True

    def fence(self, lvs: Sequence[LvInfo], token: str, seconds: int) -> None:
        """No I/O reaches these volumes until unfence (or `seconds`): their targets are disabled, and the nodes
        queue their writes (docs/group-snapshots.md)."""
        self.targets.fence([lv.name for lv in lvs], token, seconds)

    def unfence(self, token: str) -> None:
        self.targets.unfence(token)

    @contextmanager
    def consistent(self, lv: LvInfo) -> Iterator[None]:
        # A raw LUN has no filesystem here to freeze: the consumer (e.g. KubeVirt's guest agent) quiesces.
        yield


def _unmap(lv: LvInfo) -> bool:
    """On unless the volume's iscsiUnmap says "false" (volumes made before it existed keep UNMAP on)."""
    return meta_keys.meta_to_params(lv.meta, meta_keys.MUTABLE_PREFIX).get(UNMAP_PARAMETER) != "false"
