"""Berth storage lab: real kernel iSCSI, LIO, NFS, LVM thin and multipath in qemu guests.

Only the standard library is used here: the lab runs before Berth is installed (pytest is needed only by
`lab.pytest_plugin`). Entry points: `python -m lab ...` (see `lab.__main__`), `lab.topology.Lab`, and the
pytest fixtures in `lab.pytest_plugin`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Lab", "LabError"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m lab.image customize` (run inside the image build) imports only what it needs.
    if name in __all__:
        from lab import topology

        return getattr(topology, name)
    raise AttributeError(name)
