"""Host programs (lio_host.py, nfs_host.py) kept running on the storage host between requests.

Each request used to start `python3 -c <program>` on the host: under TCG that start (interpreter, imports,
rtslib) cost 0.5-1.5 s of every ControllerPublish, DeleteVolume and NFS CreateVolume (bench/controller_overhead.py).
Now one process per program and host (`python3 -c <program> --serve`, over the runner's connection) answers one
JSON line per JSON request line. It is started on first use; one that died, or whose request timed out (it is
killed then, as a one-shot process would be), is replaced at the next request. A request that finds it busy runs
the one-shot way (after waiting for it a while, if its caller says so), so concurrency, per-request timeouts and the
programs' own host locks behave as before: the resident process takes and releases the same locks per request.

Nothing is installed on the host: the program's source travels with the command, as before.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from .errors import CommandFailed, CommandTimeout

SERVE_FLAG = "--serve"
# A response line is at most this long (list_exports of every target; inventory of every export).
MAX_RESPONSE_BYTES = 64 << 20


class Dead(Exception):
    """The resident process is gone; `sent` says whether the request may have reached it."""

    def __init__(self, sent: bool):
        super().__init__("resident host program ended")
        self.sent = sent


class ResidentProcess:
    """One running `python3 -c <program> --serve`: a request line in, a response line out."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr: IO[bytes], on_exit: Callable[[], None]):
        self.proc = proc
        self._stderr = stderr
        self._on_exit = on_exit
        self._buffer = b""
        self._closed = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exchange(self, line: bytes, argv: list[str], timeout: float) -> dict[str, Any]:
        """Send one request line; the first JSON object line that comes back. CommandTimeout (the process is
        killed), Dead (it ended)."""
        deadline = time.monotonic() + timeout
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(line + b"\n")
            stdin.flush()
        except (BrokenPipeError, ValueError):
            raise Dead(sent=False) from None
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                text, self._buffer = self._buffer[:newline], self._buffer[newline + 1 :]
                response = _json_object(text)
                if response is not None:
                    return response
                continue  # noise (a library warning): the response follows
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stderr = self.stderr_tail()
                self.close()
                raise CommandTimeout(argv, timeout, stderr)
            ready, _, _ = select.select([stdout], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk or len(self._buffer) > MAX_RESPONSE_BYTES:
                raise Dead(sent=True)
            self._buffer += chunk

    def exit_code(self, wait: float = 2.0) -> int | None:
        """Its exit status once it ended (it has closed its output, so it is about to), None if it lingers."""
        try:
            return self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            return None

    def stderr_tail(self) -> bytes:
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-4000:]
        except (OSError, ValueError):
            return b""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        self._on_exit()


def _json_object(line: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def wait_deadline(start: float, timeout: float, wait: float, finished: float | None) -> float:
    """Until when a request that came at `start` waits for a busy resident: `wait` seconds after the later of its
    coming and the last request a process of that program `finished`, and never past half its timeout."""
    since = start if finished is None else max(start, finished)
    return min(start + timeout / 2, since + wait)


class ResidentPrograms:
    """Up to `instances` resident processes per program argv (1 unless the caller says otherwise). A caller that
    finds all of them busy waits while they make progress: it gets None (run it one-shot) once none of them has
    finished a request for `wait` seconds (0 unless it says otherwise), or after half its timeout."""

    def __init__(
        self,
        spawn: Callable[[list[str]], ResidentProcess | None],
        lost: Callable[[list[str], int, bytes], Exception] = CommandFailed,
    ):
        self._spawn = spawn  # None when no process can be started now (e.g. every ssh session is taken)
        self._lost = lost  # the error for a process that ended after it got the request (argv, rc, stderr)
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)  # notified whenever an instance stops being busy
        self._idle: dict[tuple[str, ...], list[ResidentProcess]] = {}
        self._busy: dict[tuple[str, ...], int] = {}
        self._finished: dict[tuple[str, ...], float] = {}  # when a process of that argv last finished a request
        self._closed = False

    def call(
        self,
        argv: Sequence[str],
        request: bytes,
        timeout: float,
        label: list[str],
        instances: int = 1,
        wait: float = 0.0,
    ) -> dict[str, Any] | None:
        """The response to `request` from a resident `argv --serve`, or None: all busy (see the class), cannot start,
        closed. The wait counts against `timeout`."""
        key = tuple(argv)
        start = time.monotonic()
        for _attempt in range(2):  # one found dead before it got the request is replaced once
            with self._lock:
                while not self._closed and self._busy.get(key, 0) >= instances:
                    remaining = wait_deadline(start, timeout, wait, self._finished.get(key)) - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._freed.wait(remaining)
                if self._closed:
                    return None
                waited = time.monotonic() - start
                idle = self._idle.get(key)
                process = idle.pop() if idle else None
                self._busy[key] = self._busy.get(key, 0) + 1
            try:
                if process is not None and not process.alive():
                    process.close()
                    process = None
                if process is None:
                    process = self._spawn([*argv, SERVE_FLAG])
                    if process is None:
                        return None
                try:
                    return process.exchange(request, label, timeout - waited)
                except Dead as dead:
                    rc, stderr = process.exit_code(), process.stderr_tail()
                    process.close()
                    process = None
                    if dead.sent:
                        raise self._lost(label, -1 if rc is None else rc, stderr) from None
                except BaseException:
                    process.close()  # timed out, or in an unknown state: never reused
                    process = None
                    raise
            finally:
                with self._lock:
                    self._busy[key] -= 1
                    self._finished[key] = time.monotonic()
                    if process is not None:
                        self._idle.setdefault(key, []).append(process)
                    self._freed.notify_all()  # waiters of every program share the condition
                    # Read again (": bool", not the False checked above): close() may have run in another thread.
                    closed: bool = self._closed
                if process is not None and closed:
                    self.close()
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._freed.notify_all()
            idle = [process for processes in self._idle.values() for process in processes]
            self._idle = {}
        for process in idle:
            process.close()
