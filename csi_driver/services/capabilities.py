"""Which volume capabilities each protocol can honour, in one place for the controller and the node."""

from __future__ import annotations

from csi_driver.csi import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode

MULTI_NODE_MODES = {Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER, Mode.MULTI_NODE_MULTI_WRITER}
READ_ONLY_MODES = {Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY}
KNOWN_MODES = set(Mode.Mode.values()) - {Mode.UNKNOWN}
FILESYSTEMS = ("ext4", "xfs")


def describe(capability: csi_pb2.VolumeCapability) -> str:
    access = "block" if capability.HasField("block") else "mount"
    mode = capability.access_mode.mode
    # A mode from a newer spec (or garbage) has no name here: describe it, never fail on it.
    name = Mode.Mode.Name(mode) if mode in Mode.Mode.values() else f"access mode {mode}"
    return f"{access} {name}"


def problem_with(capability: csi_pb2.VolumeCapability, protocol: str) -> str | None:
    """None when `protocol` can serve the capability, else a sentence saying why not and what to do."""
    if not (capability.HasField("block") or capability.HasField("mount")):
        return "a volume capability needs an access type (block or mount)"
    mode = capability.access_mode.mode
    if mode not in KNOWN_MODES:
        return f"unsupported access mode {mode}"
    if capability.HasField("block"):
        if protocol == "nfs":
            return "NFS volumes are file volumes: raw block access needs an iSCSI StorageClass"
        return None
    fs_type = capability.mount.fs_type
    if protocol == "iscsi":
        if fs_type and fs_type not in FILESYSTEMS:
            return f"filesystem {fs_type!r} is not supported on iSCSI volumes (use one of {', '.join(FILESYSTEMS)})"
        if mode in MULTI_NODE_MODES:
            return (
                f"{Mode.Mode.Name(mode)} with a filesystem on an iSCSI LUN would corrupt it (ext4/xfs are not "
                "cluster filesystems): use an NFS StorageClass for shared file volumes, or raw block access"
            )
    elif fs_type and fs_type != "nfs":
        return f"NFS volumes are mounted as nfs, not {fs_type!r}"
    return None
