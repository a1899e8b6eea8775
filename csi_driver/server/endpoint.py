"""CSI endpoints: `unix:///path/csi.sock` (what kubelet and the sidecars use) or `tcp://host:port`."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


class EndpointError(ValueError):
    pass


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "unix" or "tcp"
    address: str  # socket path, or host:port

    @property
    def grpc_address(self) -> str:
        return f"unix:{self.address}" if self.scheme == "unix" else self.address

    def __str__(self) -> str:
        return f"unix://{self.address}" if self.scheme == "unix" else f"tcp://{self.address}"


def parse_endpoint(text: str) -> Endpoint:
    """Accept the forms CSI tooling uses: unix:///p, unix:/p, a bare absolute path, tcp://h:p, h:p."""
    if text.startswith("unix://"):
        path = text.removeprefix("unix://")
    elif text.startswith("unix:"):
        path = text.removeprefix("unix:")
    elif text.startswith("/"):
        path = text
    else:
        address = text.removeprefix("tcp://")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise EndpointError(
                f"endpoint {text!r}: expected unix:///path/to.sock or tcp://host:port "
                "(port 0-65535, 0 picks a free one)"
            )
        return Endpoint("tcp", address)
    if not path.startswith("/"):
        raise EndpointError(f"endpoint {text!r}: a unix socket needs an absolute path")
    return Endpoint("unix", path)


def prepare_unix_socket(path: str) -> None:
    """Create the parent directory and remove a stale socket left by a previous run.

    A regular file or directory at the path is never removed: that would be someone else's data.
    """
    socket_path = Path(path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = socket_path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise EndpointError(f"endpoint path {path} exists and is not a socket; refusing to replace it")
    os.unlink(socket_path)
