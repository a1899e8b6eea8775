"""Paths and fixed names shared by the lab modules."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAB_DIR = REPO / "lab"
FILES_DIR = LAB_DIR / "files"

# Image cache, machine-wide so every clone (CI runs a fresh one) reuses the image its inputs hash to;
# BERTH_LAB_CACHE moves it, e.g. to a CI cache volume.
CACHE = Path(os.environ.get("BERTH_LAB_CACHE", "/var/cache/berth-lab")).resolve()
# Run state of the CLI lab (git-ignored): state.json, overlays, console logs, monitor sockets. A directory of its
# own beside pytest's lab/run/pytest-<pid>: `down` removes it whole, and CI runs sanity/run's lab next to pytest's.
RUN_DIR = Path(os.environ.get("BERTH_LAB_RUN", LAB_DIR / "run" / "cli")).resolve()

SUITE = "bookworm"
CSI_SANITY_VERSION = "v5.5.0"
CSI_SANITY_MODULE = "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"

GUEST_VENV = "/opt/berth/venv"
GUEST_SRC = "/opt/berth/src"
IQN_PREFIX = "iqn.2026-11.io.berth.lab"
SUBNETS = ("198.18.0", "198.18.1")  # RFC 2544 test range: two data links for two iSCSI portals


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")
