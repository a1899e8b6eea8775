"""One operation per volume at a time; a second caller is told to come back (ABORTED), never queued.

Queuing would pile kubelet retries behind a stuck iSCSI login; refusing lets the CO back off.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import OperationInFlight


class VolumeLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._busy: dict[str, str] = {}

    @contextmanager
    def hold(self, volume_id: str, operation: str) -> Iterator[None]:
        with self._guard:
            running = self._busy.get(volume_id)
            if running is not None:
                raise OperationInFlight(f"{running} is still in progress on volume {volume_id}; retry later")
            self._busy[volume_id] = operation
        try:
            yield
        finally:
            with self._guard:
                self._busy.pop(volume_id, None)
