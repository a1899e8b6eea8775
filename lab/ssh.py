"""Run commands in a guest over ssh to its port forward on 127.0.0.1."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class CommandError(RuntimeError):
    def __init__(self, guest: str, cmd: str, result: Result):
        self.result = result
        super().__init__(
            f"{guest}: `{cmd}` exited {result.rc}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-4000:]}"
        )


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class SSH:
    name: str
    port: int
    key: Path
    control_dir: Path

    def base_argv(self) -> list[str]:
        return [
            "ssh", "-p", str(self.port), "-i", str(self.key), "-l", "root",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            # Every run is a fresh clone with the image's host key: nothing to verify against.
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            # One master connection per guest: a command then costs ~70 ms instead of a handshake under TCG.
            "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_dir}/ssh-{self.name}.sock",
            "-o", "ControlPersist=120",
        ]  # fmt: skip

    def argv(self, cmd: str | None = None, tty: bool = False) -> list[str]:
        args = self.base_argv() + (["-t"] if tty else ["-T"]) + ["127.0.0.1"]
        return args + ([cmd] if cmd is not None else [])

    def run(
        self, cmd: str, timeout: float = 120, check: bool = True, input: str | bytes | None = None, text: bool = True
    ) -> Result:
        """Run `cmd` with the guest's root shell; raise CommandError on a non-zero exit if `check`."""
        try:
            p = subprocess.run(
                self.argv(cmd),
                input=input,
                capture_output=True,
                timeout=timeout,
                text=text,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"{self.name}: `{cmd}` still running after {timeout} s") from e
        res = Result(p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise CommandError(self.name, cmd, res)
        return res

    def wait_ready(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> float:
        """Wait until sshd answers; returns the seconds waited. `alive` aborts early if qemu died."""
        t0 = time.monotonic()
        while True:
            try:
                if self.run("true", timeout=15, check=False).ok:
                    return time.monotonic() - t0
            except TimeoutError:
                pass
            if not alive():
                raise RuntimeError(f"{self.name}: qemu exited before ssh was ready (see its console.log)")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.name}: no ssh after {timeout} s (see its console.log)")
            time.sleep(1)

    def close(self) -> None:
        subprocess.run(self.base_argv() + ["-O", "exit", "127.0.0.1"], capture_output=True, timeout=10)
