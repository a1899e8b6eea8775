"""Berth: a CSI driver for iSCSI block and NFS file volumes served from Linux storage hosts."""

import os

__version__ = "0.1.0"

# Before anything imports grpc. grpcio's fork handlers restart its poller in a forked child; a child that runs
# Python before exec (os-brick's commands, which use preexec_fn) then closes its fds, and that poller aborts it
# with SIGABRT (grpc/grpc#43055: NodeUnstage's `tee .../device/delete` died so in csi-sanity). Berth never
# forks to keep using grpc in the child, so it needs no fork support.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
