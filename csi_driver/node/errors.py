"""Domain errors of the node layer. Nothing here knows gRPC; services/node.py maps each class to a code.

Suggested mapping: InvalidVolume/InvalidPath→INVALID_ARGUMENT, VolumeNotFound→NOT_FOUND,
MountConflict→ALREADY_EXISTS, NotStaged/WrongAccess/StillInUse/PathBusy→FAILED_PRECONDITION,
CommandTimeout→DEADLINE_EXCEEDED, everything else→INTERNAL.
"""

from __future__ import annotations

from collections.abc import Sequence

STDERR_TAIL_CHARS = 1500


class NodeError(Exception):
    """Base of every error raised by csi_driver.node."""


class InvalidVolume(NodeError):
    """volume_context, publish_context or a capability cannot be used (missing key, unknown protocol...)."""


class InvalidPath(NodeError):
    """A staging or target path that Berth will not use: relative, with '..' or NUL, too long, inside a kernel
    filesystem, or leading through a symbolic link."""


class VolumeNotFound(NodeError):
    """No stage record for the volume, or the path given is not where the volume is."""


class NotStaged(NodeError):
    """Publish needs a staged volume and this one is not (or its staging mount is gone)."""


class MountConflict(NodeError):
    """The path is already used by something else, or the volume is staged with other parameters."""


class WrongAccess(NodeError):
    """The request conflicts with the access mode (e.g. SINGLE_NODE_SINGLE_WRITER published twice)."""


class StillInUse(NodeError):
    """Unstage while the device or staging mount is still used elsewhere (a publish target left behind)."""


class UnmountFailed(NodeError):
    """umount failed and the path is still mounted."""


class PathBusy(UnmountFailed):
    """umount refused because a process still uses the mount (open files, a working directory, a mount below)."""


class PathUnusable(NodeError):
    """A staging or target path cannot be created (a file in the way, no space, a read-only filesystem)."""


class RecordUnreadable(NodeError):
    """A stage record exists but cannot be read or parsed: what its stage attached is unknown."""


class CleanupFailed(NodeError):
    """Undoing a failed operation, or removing what Berth created, failed; the stage record keeps what is left."""


class AttachFailed(NodeError):
    """iSCSI login or device discovery failed."""


class LoginRefused(AttachFailed):
    """The target refused the iSCSI login: wrong CHAP credentials or this initiator is not in its ACL."""


class DetachFailed(NodeError):
    """Logout, device removal or multipath flush failed."""


class DeviceNotFound(NodeError):
    """The volume's block device is not (or no longer) present on this node."""


class WwnMismatch(AttachFailed):
    """The device that appeared is not the LUN the controller described: never mount it."""


class FilesystemError(NodeError):
    """mkfs refused (device holds other data), fs type mismatch, grow failed."""


def masked(argv: Sequence[str]) -> list[str]:
    """argv fit for logs and error messages: the value of `iscsiadm ... -n <...password...> -v VALUE` hidden."""
    shown = list(argv)
    for i in range(len(shown) - 3):
        if shown[i] == "-n" and "password" in shown[i + 1] and shown[i + 2] == "-v":
            shown[i + 3] = "***"
    return shown


class CommandFailed(NodeError):
    def __init__(self, argv: Sequence[str], rc: int, stderr: str = "") -> None:
        self.argv = masked(argv)
        self.rc = rc
        self.stderr = stderr
        tail = stderr.strip()[-STDERR_TAIL_CHARS:]
        super().__init__(f"`{' '.join(self.argv)}` exited {rc}" + (f": {tail}" if tail else ""))


class CommandTimeout(NodeError):
    def __init__(self, argv: Sequence[str], seconds: float) -> None:
        self.argv = masked(argv)
        self.seconds = seconds
        super().__init__(f"`{' '.join(self.argv)}` did not finish within {seconds:g} s")


# What kubelet treats as "maybe still in progress" (the services map it to DEADLINE_EXCEEDED, and kubelet answers
# it with a retry or a NodeUnstageVolume): a failed operation keeps its partial work for that
# call. Every other failure is final: kubelet assumes nothing was done, so the operation must undo itself.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (CommandTimeout,)
