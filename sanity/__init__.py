"""csi-sanity runs against Berth inside the storage lab."""
