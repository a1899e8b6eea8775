"""Readiness checks with a time bound, shared by Identity.Probe and the HTTP /healthz endpoint.

A check can hang (an SSH host that never answers, a stuck mount), and whoever asks - kubelet's liveness probe,
an external-provisioner - must still get "not ready" within a few seconds. So each check runs in a daemon
thread and the caller waits only until a deadline. A run still going when the next caller arrives is joined,
not started again: a hung check holds one thread however often it is polled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

# A readiness check returns None when healthy, or a sentence saying what is wrong.
ReadinessCheck = Callable[[], str | None]

CHECK_TIMEOUT_SECONDS = 5.0


class _Run:
    """One execution of a check: done once the check returned or raised."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.problem: str | None = None
        self.error: BaseException | None = None


class BoundedCheck:
    def __init__(self, check: ReadinessCheck) -> None:
        self._check = check
        self._lock = threading.Lock()
        self._run: _Run | None = None

    def current_run(self) -> _Run:
        """The run in progress, or a new one if the last has finished."""
        with self._lock:
            if self._run is None or self._run.done.is_set():
                self._run = _Run()
                threading.Thread(target=self._execute, args=(self._run,), daemon=True, name="readiness").start()
            return self._run

    def describe(self) -> str:
        # A check is usually a closure: "node_readiness_check.<locals>.check" names its factory.
        return getattr(self._check, "__qualname__", repr(self._check)).split(".<locals>")[0]

    def _execute(self, run: _Run) -> None:
        try:
            run.problem = self._check()
        except BaseException as err:  # handed to the waiting caller
            run.error = err
        finally:
            run.done.set()


def run_checks(checks: Sequence[BoundedCheck], timeout: float = CHECK_TIMEOUT_SECONDS) -> str | None:
    """Run every check at once; return None when all pass, else the problems joined by '; '.

    A check still running after `timeout` seconds counts as a problem. A check that raised re-raises here:
    that is a bug, and Probe reports it as INTERNAL.
    """
    runs = [(check, check.current_run()) for check in checks]
    deadline = time.monotonic() + timeout
    problems = []
    for check, run in runs:
        if not run.done.wait(max(0.0, deadline - time.monotonic())):
            problems.append(f"{check.describe()} did not finish within {timeout:g} s")
        elif run.error is not None:
            raise run.error
        elif run.problem:
            problems.append(run.problem)
    return "; ".join(problems) or None
