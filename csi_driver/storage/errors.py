"""Domain errors of the storage-host layer.

The CSI service layer maps these to gRPC status codes; nothing here knows gRPC.
Suggested mapping: NotFound→NOT_FOUND, AlreadyExists→ALREADY_EXISTS,
CapacityExhausted→RESOURCE_EXHAUSTED, OutOfRange→OUT_OF_RANGE, InvalidRequest→INVALID_ARGUMENT,
InUse→FAILED_PRECONDITION, HostNotReady→FAILED_PRECONDITION, NotSupported→FAILED_PRECONDITION, Busy→ABORTED,
HostUnreachable→UNAVAILABLE, CommandTimeout→DEADLINE_EXCEEDED, anything else→INTERNAL.
"""

from __future__ import annotations

from collections.abc import Sequence

# Keep enough stderr to diagnose, not so much that a log line becomes a page.
STDERR_TAIL_CHARS = 2000


def _tail(text: str, limit: int = STDERR_TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


class StorageError(Exception):
    """Base of every error raised by csi_driver.storage."""


class NotFound(StorageError):
    """The volume, snapshot, export or initiator does not exist."""


class AlreadyExists(StorageError):
    """The name is taken by an object with incompatible parameters."""


class CapacityExhausted(StorageError):
    """The pool or volume group cannot hold the request."""


class OutOfRange(StorageError):
    """The requested size is one this backend will never serve (above its limit, below a source's size)."""


class InvalidRequest(StorageError):
    """The request is malformed (bad name, size, IQN, portal, tag...)."""


class InUse(StorageError):
    """The object is open or referenced and cannot be changed or removed now."""


class HostNotReady(StorageError):
    """The storage host lacks something Berth needs (a package, the volume group, the thin pool): an operator
    must fix the host or the config; retrying the same call will not help."""


class NotSupported(StorageError):
    """The backend offers no such operation for this object (e.g. changed blocks of an NFS volume's snapshot): no
    retry can succeed."""


class Busy(StorageError):
    """Another operation holds a lock on the object; retrying later may succeed."""


class HostUnreachable(StorageError):
    """The storage host could not be reached (SSH failed to connect or authenticate)."""


class CommandFailed(StorageError):
    """A command on the storage host exited non-zero.

    The message is what a human reads in the CSI error: the command, the exit code and the tail of
    stderr (where LVM and Python put the actual reason).
    """

    def __init__(self, argv: Sequence[str], rc: int, stderr: str | bytes = "", stdout: str | bytes = ""):
        self.argv = list(argv)
        self.rc = rc
        self.stderr = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
        self.stdout = stdout.decode("utf-8", "replace") if isinstance(stdout, bytes) else stdout
        super().__init__(self._message())

    def _message(self) -> str:
        # Only the program and its first arguments: a python3 -c program would flood the message.
        shown = " ".join(a if len(a) <= 80 else a[:77] + "..." for a in self.argv[:8])
        if len(self.argv) > 8:
            shown += " ..."
        tail = _tail(self.stderr)
        return f"{shown!s} exited {self.rc}" + (f": {tail}" if tail else "")

    @property
    def stderr_tail(self) -> str:
        return _tail(self.stderr)


class CommandTimeout(CommandFailed):
    """The command did not finish in time (it was killed locally; the remote side may still run)."""

    def __init__(self, argv: Sequence[str], timeout: float, stderr: str | bytes = ""):
        self.timeout = timeout
        super().__init__(argv, -1, stderr)

    def _message(self) -> str:
        return f"{self.argv[0] if self.argv else '?'} timed out after {self.timeout:g}s"
