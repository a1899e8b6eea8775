"""Named fault points: a test-only hook that kills Berth between two steps of an operation (tests/faults).

Inert unless the environment variable BERTH_FAULT_POINTS_FILE names a file. That file lists armed points, one name
per line. When the code reaches an armed point, the point is disarmed (its line removed, so that the retry gets past
it) and the process kills itself with SIGKILL: no cleanup, no reply, as an OOM kill or a lost node would stop it.
Every point sits right after a step that changed the storage host (docs/faults.md lists them).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("berth.faults")

ENV = "BERTH_FAULT_POINTS_FILE"


def fault_point(name: str) -> None:
    """Die here when `name` is armed."""
    path = os.environ.get(ENV)
    if not path:
        return
    armed_file = Path(path)
    try:
        armed = armed_file.read_text().split()
    except FileNotFoundError:
        return
    if name not in armed:
        return
    armed.remove(name)
    pending = armed_file.with_name(armed_file.name + ".new")
    pending.write_text("".join(f"{point}\n" for point in armed))
    pending.replace(armed_file)
    log.warning("fault point reached: killing this process", extra={"fault_point": name})
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
