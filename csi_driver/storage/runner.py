"""Run commands on the storage host: locally or over SSH, always as argument lists.

The controller has exactly one way to touch a storage host: a CommandRunner. Everything above it
(lvm, lio) builds argv lists and never shell strings, so request data (volume names, parameters,
IQNs) can never be interpreted by a shell.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol, runtime_checkable

from .berth_host import REFUSED_EXIT, RESIDENT_COMMANDS
from .errors import CommandFailed, CommandTimeout, HostUnreachable, InvalidRequest
from .resident import ResidentProcess, ResidentPrograms

log = logging.getLogger("berth.storage.ssh")

DEFAULT_TIMEOUT = 60.0
HOST_PYTHON = "python3"  # the storage host's interpreter for host programs (restricted: berth-host's own)
# sshd's MaxSessions defaults to 10 multiplexed sessions per connection; the 11th fails like a dead host.
DEFAULT_MAX_SESSIONS = 8
# Resident berth_host.py processes (each with its LVM shell) per SSH runner: the controller's workers often run two
# LVM commands at once, and one that finds every resident busy pays an ssh session and an `lvm` start of its own.
LVM_RUNNERS = 2
# An LVM command that finds every resident busy waits for one while they keep finishing commands, and runs one-shot
# once none has for this long (a long `sync -f`, a hung device) or after half its timeout. LVM serialises a VG's
# changes on its lock, so in a burst (50 CreateVolume calls) extra one-shot `lvm` processes only queue on that lock,
# and their start costs the host CPU: 50 concurrent creations took 49.5 s against 28.8 s one after another.
LVM_QUEUE_SECONDS = 10.0
# What a host program may need before its first line runs (ssh connection, interpreter start). Host programs stop
# acting this long before the controller's timeout, since a timeout kills only the local ssh, never the remote side.
HOST_START_MARGIN = 30.0


@cache
def host_program_source(file_name: str) -> str:
    """Source of a host program (lio_host.py, ...) as shipped in the package, sent verbatim to the host."""
    return resources.files("csi_driver.storage").joinpath(file_name).read_text(encoding="utf-8")


def berth_host_program() -> str:
    """berth_host.py: the forced command of restricted hosts, and over SSH the resident runner of LVM and sync
    commands (sent without the digests `berth host-command` fills in)."""
    return host_program_source("berth_host.py")


@dataclass(frozen=True)
class CommandResult:
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


@runtime_checkable
class CommandRunner(Protocol):
    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
    ) -> CommandResult:
        """Raises InvalidRequest (argv not a non-empty list of strings without NUL), CommandFailed (a non-zero exit
        when `check`; local: a missing program even without it), CommandTimeout (still running after `timeout`; ssh:
        no free session in time), HostUnreachable (ssh: connect or login failed, ssh exited 255, runner closed)."""
        ...

    def close(self) -> None:
        """Stop the resident host programs and the connection. Raises nothing of its own."""
        ...


def c_locale_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment with the C locale: LVM output (decimal separator, messages) must not depend on the
    caller's locale, and ssh may forward LANG/LC_* to the host (Debian's SendEnv default)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("LC_")}
    env["LANG"] = "C"
    env["LC_ALL"] = "C"
    return env


def _validate_argv(argv: Sequence[str]) -> list[str]:
    # A bare string would be iterated char by char; refuse it rather than run nonsense.
    if isinstance(argv, str | bytes):
        raise InvalidRequest("argv must be a sequence of strings, not a string")
    out = list(argv)
    if not out:
        raise InvalidRequest("argv is empty")
    for a in out:
        if not isinstance(a, str):
            raise InvalidRequest(f"argv element {a!r} is not a string")
        if "\x00" in a:
            raise InvalidRequest("argv element contains a NUL byte")
    return out


class LocalRunner:
    """Runs commands on this machine (controller co-located with the storage)."""

    def __init__(self, env: dict[str, str] | None = None):
        self._env = c_locale_env(env)
        self.resident = ResidentPrograms(self._spawn)

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
    ) -> CommandResult:
        args = _validate_argv(argv)
        try:
            proc = subprocess.run(
                args,
                input=input,
                # Without input, never let a child read the controller's stdin.
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                env=self._env,
                shell=False,
            )
        except subprocess.TimeoutExpired as e:
            raise CommandTimeout(args, timeout, e.stderr or b"") from e
        except FileNotFoundError as e:
            raise CommandFailed(args, 127, f"{args[0]}: command not found") from e
        except OSError as e:  # e.g. not executable: as a shell would answer, and never an unmapped error
            raise CommandFailed(args, 126, f"{args[0]}: {e.strerror or e}") from e
        result = CommandResult(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise CommandFailed(args, proc.returncode, proc.stderr, proc.stdout)
        return result

    def _spawn(self, argv: list[str]) -> ResidentProcess | None:
        return _start_resident(_validate_argv(argv), self._env, lambda: None)

    def close(self) -> None:
        self.resident.close()


def remote_command(argv: Sequence[str]) -> str:
    """The string ssh hands to the remote user's shell for argv.

    ssh concatenates its arguments into ONE string that the remote shell parses, so each element is
    quoted; `sh -c remote_command(argv)` then executes exactly argv.
    """
    return " ".join(shlex.quote(a) for a in _validate_argv(argv))


class SshRunner:
    """Runs commands on a storage host through the OpenSSH client, reusing one connection.

    A ControlMaster is started explicitly (ssh -M -N -f) with its socket in a private temp dir;
    later commands multiplex over it (~70 ms each instead of a full handshake). If the master died,
    ssh falls back to a direct connection, so a stale socket only costs speed.

    An unreachable host fails fast (docs/storage-host.md): one connection attempt at a time, bounded by twice the
    connect timeout, and callers that arrive meanwhile share its outcome instead of queueing for attempts of their
    own; after a failure the host is remembered as down for `down_retry_seconds`, during which calls answer
    HostUnreachable at once; the first call after that tries again, so recovery needs no restart. At most
    `max_sessions` commands run at once (sshd's MaxSessions).
    """

    def __init__(
        self,
        host: str,
        port: int = 22,
        user: str = "root",
        identity_file: str | None = None,
        known_hosts: str | None = None,
        strict_host_key_checking: str = "yes",
        connect_timeout: float = 10,
        control_persist: int = 600,
        ssh_binary: str = "ssh",
        extra_options: Sequence[str] = (),
        down_retry_seconds: float | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ):
        if not host or host.startswith("-") or any(c.isspace() for c in host):
            raise InvalidRequest(f"invalid ssh host {host!r}")
        if user.startswith("-") or any(c.isspace() for c in user):
            raise InvalidRequest(f"invalid ssh user {user!r}")
        if strict_host_key_checking not in ("yes", "accept-new", "no"):
            raise InvalidRequest("strict_host_key_checking must be yes, accept-new or no")
        self.host = host
        self.port = int(port)
        self.user = user
        self.identity_file = identity_file
        self.known_hosts = known_hosts
        self.strict_host_key_checking = strict_host_key_checking
        self.connect_timeout = connect_timeout
        self.control_persist = control_persist
        self.ssh_binary = ssh_binary
        self.extra_options = list(extra_options)
        self.down_retry_seconds = connect_timeout if down_retry_seconds is None else down_retry_seconds
        # Private (0700) dir: whoever can connect to the socket gets a root shell on the host.
        self._dir = tempfile.mkdtemp(prefix="berth-ssh-")
        self.control_path = os.path.join(self._dir, "cm")
        self._lock = threading.Lock()  # guards the fields below, never held while waiting for the host
        self._closed = False
        self._attempt: threading.Event | None = None  # set when the connection attempt in flight has ended
        self._down_until = 0.0
        self._down_reason: str | None = None  # why the host was last found unreachable; None while reachable
        self._sessions = threading.BoundedSemaphore(max_sessions)
        self._env = c_locale_env()
        self.resident = ResidentPrograms(self._spawn, self._resident_lost)

    @property
    def connect_bound(self) -> float:
        """The longest a connection attempt may take (TCP connect, then key exchange and authentication)."""
        return 2 * self.connect_timeout

    # --- command construction (pure, unit-tested) ---

    def base_args(self) -> list[str]:
        args = [
            self.ssh_binary,
            "-p", str(self.port),
            "-l", self.user,
            "-o", "BatchMode=yes",  # never prompt for a password or passphrase
            "-o", f"ConnectTimeout={max(1, math.ceil(self.connect_timeout))}",
            "-o", f"StrictHostKeyChecking={self.strict_host_key_checking}",
            # A cut link ends the master (and every command waiting on it) after 15 s, not 45 s.
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
            "-o", "LogLevel=ERROR",
            "-o", f"ControlPath={self.control_path}",
        ]  # fmt: skip
        if self.known_hosts:
            args += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.identity_file:
            args += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        for opt in self.extra_options:
            args += ["-o", opt]
        return args

    def master_args(self) -> list[str]:
        return [
            *self.base_args(),
            "-o", "ControlMaster=yes",
            "-o", f"ControlPersist={self.control_persist}",
            "-N", "-f", "-T",
            self.host,
        ]  # fmt: skip

    def command_args(self, argv: Sequence[str]) -> list[str]:
        # ControlMaster=no: use the master if it is there, else connect directly (no new master
        # that would hold our output pipes open in the background).
        return [*self.base_args(), "-o", "ControlMaster=no", "-T", self.host, "--", remote_command(argv)]

    # --- reachability ---

    def _fail_if_down(self) -> None:
        """Under self._lock: HostUnreachable at once while the host is remembered as down."""
        if self._closed:
            raise HostUnreachable(f"ssh runner for {self.host} is closed")
        remaining = self._down_until - time.monotonic()
        if self._down_reason is not None and remaining > 0:
            raise HostUnreachable(
                f"storage host {self.host}:{self.port} is unreachable ({self._down_reason}); "
                f"the next attempt is in {remaining:.0f} s"
            )

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            if self._down_reason is None:
                log.warning("storage host unreachable", extra={"host": self.host, "reason": reason})
            self._down_reason = reason
            self._down_until = time.monotonic() + self.down_retry_seconds

    def _mark_up(self) -> None:
        with self._lock:
            if self._down_reason is not None:
                log.info("storage host reachable again", extra={"host": self.host})
            self._down_reason = None

    def _ensure_master(self) -> None:
        while True:
            with self._lock:
                self._fail_if_down()
                if os.path.exists(self.control_path):
                    return
                attempt, mine = self._attempt, self._attempt is None
                if mine:
                    attempt = self._attempt = threading.Event()
            assert attempt is not None
            if not mine:
                attempt.wait(self.connect_bound + 5)  # share its outcome, then look again
                continue
            try:
                self._start_master()
            except HostUnreachable as err:
                self._mark_down(str(err))
                raise
            finally:
                with self._lock:
                    self._attempt = None
                attempt.set()
            self._mark_up()
            return

    def _start_master(self) -> None:
        # stderr to a file, not a pipe: the daemonised master would keep a pipe open forever.
        with tempfile.TemporaryFile(dir=self._dir) as err:
            try:
                rc = subprocess.run(
                    self.master_args(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    timeout=self.connect_bound,
                    env=self._env,
                ).returncode
            except subprocess.TimeoutExpired as e:
                raise HostUnreachable(f"ssh to {self.host}:{self.port} timed out after {self.connect_bound:g} s") from e
            except FileNotFoundError as e:
                raise HostUnreachable(f"ssh client {self.ssh_binary!r} not found") from e
            if rc != 0:
                err.seek(0)
                msg = err.read().decode("utf-8", "replace").strip()
                raise HostUnreachable(f"ssh to {self.user}@{self.host}:{self.port} failed: {msg}")

    def _take_session(self, args: list[str], timeout: float) -> None:
        """Wait for one of max_sessions, giving up early when the host is found down meanwhile."""
        deadline = time.monotonic() + timeout
        while not self._sessions.acquire(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
            with self._lock:
                self._fail_if_down()
            if time.monotonic() >= deadline:
                raise CommandTimeout(args, timeout, f"every ssh session to {self.host} stayed busy")

    # --- running ---

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
    ) -> CommandResult:
        args = _validate_argv(argv)
        if input is None and args[0] in RESIDENT_COMMANDS:
            result = self._run_resident(args, timeout)
            if result is not None:
                if check and result.rc != 0:
                    raise CommandFailed(args, result.rc, result.stderr, result.stdout)
                return result
        self._ensure_master()
        self._take_session(args, timeout)
        try:
            proc = subprocess.run(
                self.command_args(args),
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                env=self._env,
            )
        except subprocess.TimeoutExpired as e:
            raise CommandTimeout(args, timeout, e.stderr or b"") from e
        except FileNotFoundError as e:
            raise HostUnreachable(f"ssh client {self.ssh_binary!r} not found") from e
        finally:
            self._sessions.release()
        # 255 is ssh's own failure code; a remote program exiting 255 is indistinguishable, and
        # none of the programs we run uses it.
        if proc.returncode == 255:
            msg = proc.stderr.decode("utf-8", "replace").strip()
            error = HostUnreachable(f"ssh to {self.host}:{self.port} failed: {msg}")
            self._mark_down(str(error))
            raise error
        result = CommandResult(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise CommandFailed(args, proc.returncode, proc.stderr, proc.stdout)
        return result

    def _run_resident(self, args: list[str], timeout: float) -> CommandResult | None:
        """An LVM or sync command through the resident berth_host.py (each such command used to cost the host an
        ssh session, a shell and, restricted, a python3 start of berth-host); None when it is busy or cannot start,
        and the caller runs the command itself."""
        request = json.dumps({"v": 1, "argv": args}).encode()
        program = [HOST_PYTHON, "-c", berth_host_program()]
        response = self.resident.call(program, request, timeout, args, instances=LVM_RUNNERS, wait=LVM_QUEUE_SECONDS)
        if response is None:
            return None
        if "refused" in response:
            return CommandResult(REFUSED_EXIT, b"", f"berth-host: refused: {response['refused']}".encode())
        try:
            return CommandResult(int(response["rc"]), response["stdout"].encode(), response["stderr"].encode())
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CommandFailed(args, -1, f"berth_host.py answered {str(response)[:200]}".encode()) from None

    def _spawn(self, argv: list[str]) -> ResidentProcess | None:
        """A resident host program over the master; it holds one of max_sessions for its whole life, so it starts
        only when one is free at once (the caller then runs the request one-shot)."""
        args = _validate_argv(argv)
        self._ensure_master()
        if not self._sessions.acquire(blocking=False):
            return None
        try:
            process = _start_resident(self.command_args(args), self._env, self._sessions.release)
        except BaseException:
            self._sessions.release()
            raise
        if process is None:
            self._sessions.release()
        return process

    def _resident_lost(self, argv: list[str], rc: int, stderr: bytes) -> Exception:
        if rc != 255:  # see run(): ssh's own failure
            return CommandFailed(argv, rc, stderr)
        error = HostUnreachable(f"ssh to {self.host}:{self.port} failed: {stderr.decode('utf-8', 'replace').strip()}")
        self._mark_down(str(error))
        return error

    def close(self) -> None:
        """Stop the resident host programs and the master connection; remove the private socket directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.resident.close()
        if os.path.exists(self.control_path):
            try:
                subprocess.run(
                    [*self.base_args(), "-O", "exit", self.host],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=10,
                )
            except (subprocess.TimeoutExpired, OSError):
                pass  # best effort: ControlPersist ends it eventually anyway
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SshRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_resident(argv: list[str], env: dict[str, str], on_exit: Callable[[], None]) -> ResidentProcess | None:
    """None when argv cannot be started at all (no such program, not executable): the caller's one-shot run of
    the same argv then reports it as CommandFailed, where an OSError would escape every error mapping."""
    # stderr to a file, not a pipe nobody reads while the process waits for requests.
    stderr = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, bufsize=0)
    except OSError:
        stderr.close()
        return None
    except BaseException:
        stderr.close()
        raise
    return ResidentProcess(proc, stderr, on_exit)


def call_host_program(
    runner: CommandRunner,
    python: str,
    source: str,
    name: str,
    request: dict[str, Any],
    timeout: float,
    resident: bool = True,
) -> dict[str, Any]:
    """One JSON request to a host program (lio_host.py, nfs_host.py, thin_metadata_host.py): through the runner's
    resident process of it when it has one free (see resident.py; `resident` False: never, for a program called so
    rarely that it should not hold an SSH session for good), else as `python3 -c <source>` with the request on stdin.
    Never on the command line: it may hold secrets. CommandFailed when no JSON response came (python3 missing, a
    crash)."""
    payload = json.dumps(request).encode()
    argv = [python, "-c", source]
    label = [python, "-c", f"<{name}>"]
    programs = getattr(runner, "resident", None) if resident else None
    if isinstance(programs, ResidentPrograms):
        response = programs.call(argv, payload, timeout, label)
        if response is not None:
            return response
    result = runner.run(argv, input=payload, timeout=timeout, check=False)
    response = last_json_object(result.text)
    if response is None:
        raise CommandFailed(label, result.rc, result.stderr, result.stdout)
    return response


def last_json_object(stdout: str) -> dict[str, Any] | None:
    """The JSON object a host program printed on its last non-empty line (earlier lines are noise, e.g. a
    library warning); None when that line is not a JSON object, i.e. the program did not run properly."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None
    return None
