"""Undo for node operations: every step that changes the node registers its inverse right after it succeeds
(os-brick's connect/disconnect pairs are the model), and a failed operation runs them newest first.

kubelet never calls NodeUnstageVolume for a NodeStageVolume that failed with a final error, so whatever such a
stage left behind (an iSCSI session, a multipath map, a mount, a stage record) would stay forever and make
every later stage of the volume fail. Transient failures (errors.TRANSIENT_ERRORS) keep their work: kubelet
treats those as "maybe still in progress" and comes back with a retry or an unstage.

The undo stops at the first step that fails: unmounting failed, so logging out under the mount would be wrong.
What is left is still described by the stage record, whose removal is always the oldest step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Literal

from .errors import TRANSIENT_ERRORS, CleanupFailed

log = logging.getLogger("berth.node.rollback")


class Rollback:
    def __init__(self, operation: str, cleaned_by: str) -> None:
        """`cleaned_by` names the call that removes what a failed undo leaves, e.g. "NodeUnstageVolume"."""
        self.operation = operation
        self.cleaned_by = cleaned_by
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, undo: Callable[[], None]) -> None:
        """Register the inverse of a step that just changed the node; `what` says what it undoes."""
        self._steps.append((what, undo))

    def __enter__(self) -> Rollback:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        if error is None or not isinstance(error, Exception) or isinstance(error, TRANSIENT_ERRORS):
            return False
        while self._steps:
            what, undo = self._steps.pop()
            try:
                undo()
            except Exception as undo_error:
                log.error("undo failed", extra={"operation": self.operation, "step": what, "error": str(undo_error)})
                raise CleanupFailed(
                    f"{error}; undoing the failed {self.operation} also failed at '{what}': {undo_error}. "
                    f"The stage record keeps what is left; {self.cleaned_by} or a retry removes it"
                ) from error
            log.info("undone", extra={"operation": self.operation, "step": what})
        return False
