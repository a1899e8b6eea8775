"""What a node needs before it can attach volumes: each protocol's tools and a writable state dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence

TOOLS_BY_PROTOCOL = {
    "iscsi": ("iscsiadm", "blkid", "mount", "umount"),
    "nfs": ("mount.nfs", "mount", "umount"),
}


def node_readiness_check(
    protocols: Sequence[str], state_dir: str, which: Callable[[str], str | None] = shutil.which
) -> Callable[[], str | None]:
    def check() -> str | None:
        problems = []
        missing = sorted({tool for p in protocols for tool in TOOLS_BY_PROTOCOL[p] if which(tool) is None})
        if missing:
            problems.append(f"missing node tools: {', '.join(missing)}")
        try:
            os.makedirs(state_dir, exist_ok=True)
            if not os.access(state_dir, os.W_OK):
                problems.append(f"state dir {state_dir} is not writable")
        except OSError as err:
            problems.append(f"state dir {state_dir} cannot be created: {err.strerror}")
        return "; ".join(problems) or None

    return check
