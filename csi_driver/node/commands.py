"""Run node commands as argv lists with a timeout; never a shell, never without a deadline.

Every module in this package takes a `Runner`, so unit tests substitute a recorder (tests/unit/node/fakes.py).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import CommandFailed, CommandTimeout, masked

log = logging.getLogger("berth.node.commands")

DEFAULT_TIMEOUT = 60.0
KILL_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def run(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Result:
        """Raises CommandFailed (a non-zero exit when `check`; a missing program even without it), CommandTimeout
        (still running after `timeout`: killed)."""
        ...


class LocalRunner:
    """subprocess.run with the C locale (tools' messages are parsed) and stdin closed."""

    def __init__(self) -> None:
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
        self._env.update(LANG="C", LC_ALL="C")

    def run(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Result:
        args = list(argv)
        log.debug("run", extra={"argv": masked(args)})
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                text=True,
            )
        except FileNotFoundError:
            raise CommandFailed(args, 127, f"{args[0]}: command not found") from None
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            # subprocess.run would now wait for the child without limit; a umount stuck in D state on a dead
            # NFS server never dies, so give it a moment and then abandon it to a reaper thread.
            try:
                proc.communicate(timeout=KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("abandoning unkillable command", extra={"argv": masked(args), "pid": proc.pid})
                threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
            raise CommandTimeout(args, timeout) from None
        proc_rc = proc.returncode
        if check and proc_rc != 0:
            raise CommandFailed(args, proc_rc, stderr or stdout)
        return Result(proc_rc, stdout, stderr)
