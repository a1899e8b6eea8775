"""Berth: a CSI driver for iSCSI block and NFS file volumes served from Linux storage hosts."""

__version__ = "0.1.0"
