"""berth-host: the forced command of the controller's SSH key on a storage host (docs/storage-host.md,
"Restricted SSH access").

With `restrict,command="/usr/local/sbin/berth-host"` on the key in root's authorized_keys, sshd runs this program
instead of whatever the client asked for, with the request in SSH_ORIGINAL_COMMAND. It runs exactly Berth's own
operations and refuses anything else, so the key no longer opens a root shell:
- the LVM commands the controller runs, each with only the options Berth uses (an option such as `--config` can
  make LVM run a program of the caller's choosing);
- `sync -f` of an absolute path (an NFS volume's export);
- Berth's host programs (lio_host.py, nfs_host.py, thin_metadata_host.py, and this file itself) as
  `python3 -c <source> [--serve]`, recognised by the SHA-256 of their source: `berth host-command` writes this file
  with the digests of its own release filled in, so a controller of another release is refused until the host gets
  that release's berth-host. This file sent so (`--serve`, see serve()) is the controller's resident runner of the
  first two kinds, with the same checks; the copy it sends has no digests, so it runs no host program.
Runs on the storage host with python3's standard library only, as the host programs do; as the forced command, once
per command. It starts isolated and without site (`-IS`) and imports only what the command needs: on an emulated
host each import costs a good share of an LVM command's CPU. The command is split as the controller quotes it
(shlex.quote per argument, see split_quoted) and executed without a shell.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

PROGRAM_DIGESTS: frozenset[str] = frozenset()  # filled in by `berth host-command` (storage/host_access.py)
REFUSED_EXIT = 126

# Per LVM command: the options Berth passes, and whether each takes a value.
_REPORT = {"--reportformat": True, "--units": True, "--nosuffix": False, "-o": True, "--select": True}
LVM_OPTIONS: dict[str, dict[str, bool]] = {
    "lvs": _REPORT,
    "vgs": _REPORT,
    "lvcreate": {"--type": True, "--virtualsize": True, "--thinpool": True, "--name": True, "--addtag": True,
                 "--yes": False, "--snapshot": False, "--setactivationskip": True, "--activate": True,
                 "--permission": True},
    "lvchange": {"--activate": True, "--ignoreactivationskip": False, "--addtag": True, "--deltag": True},
    "lvextend": {"--size": True},
    "lvremove": {"--force": False, "--yes": False},
    "lvrename": {},
}  # fmt: skip
SERVE_ARGS: tuple[list[str], ...] = ([], ["--serve"])
# What the resident mode (serve) runs: every command but the host programs.
RESIDENT_COMMANDS = frozenset([*LVM_OPTIONS, "sync"])
# shlex.quote leaves a word bare when it holds only these (ASCII) characters, and single-quotes it otherwise.
BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-")


class Refused(Exception):
    pass


def decide(command: str) -> list[str]:
    """The argv to execute for ssh's original command; Refused when it is not one of Berth's operations."""
    return check_argv(split_quoted(command))


def check_argv(argv: list[str]) -> list[str]:
    """The argv to execute for the controller's argv; Refused when it is not one of Berth's operations."""
    if not argv:
        raise Refused("no command: berth-host never opens a shell")
    name, args = argv[0], argv[1:]
    if name in LVM_OPTIONS:
        _check_options(name, args, LVM_OPTIONS[name])
        return argv
    if name == "sync":
        if len(args) != 2 or args[0] != "-f" or not args[1].startswith("/") or ".." in args[1].split("/"):
            raise Refused("sync: only `sync -f <absolute path>`")
        return argv
    if os.path.basename(name).startswith("python3") and args[:1] == ["-c"] and len(args) >= 2:
        import hashlib  # only here: it loads OpenSSL

        if hashlib.sha256(args[1].encode()).hexdigest() not in PROGRAM_DIGESTS:
            raise Refused("not a host program of this berth-host's release: install the controller's release of "
                          "berth-host (`berth host-command`, docs/storage-host.md)")  # fmt: skip
        if args[2:] not in SERVE_ARGS:
            raise Refused("a host program takes no arguments but --serve")
        return [sys.executable, "-c", args[1], *args[2:]]  # this host's python3, whatever path was asked for
    raise Refused(f"{name!r} is not one of Berth's operations")


def split_quoted(command: str) -> list[str]:
    """The words of `command` as the controller writes it: words joined by spaces, each either bare (BARE
    characters only) or made of '...' runs and "'" for a quote inside, exactly what shlex.quote produces. Anything
    else (a backslash, $, a lone double quote, an unclosed quote) is Refused rather than interpreted."""
    words: list[str] = []
    i, n = 0, len(command)
    while i < n:
        if command[i] == " ":
            i += 1
            continue
        word: list[str] = []
        while i < n and command[i] != " ":
            if command[i] == "'":
                end = command.find("'", i + 1)
                if end < 0:
                    raise Refused("the command does not parse: no closing quotation")
                word.append(command[i + 1 : end])
                i = end + 1
            elif command.startswith("\"'\"", i):
                word.append("'")
                i += 3
            elif command[i] in BARE:
                word.append(command[i])
                i += 1
            else:
                raise Refused(f"the command does not parse: {command[i]!r} outside quotes")
        words.append("".join(word))
    return words


def _check_options(name: str, args: list[str], options: dict[str, bool]) -> None:
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            if arg not in options:
                raise Refused(f"{name}: {arg} is not an option Berth uses")
            if options[arg]:
                if i + 1 == len(args):
                    raise Refused(f"{name}: {arg} needs a value")
                i += 1
        i += 1


def serve() -> int:
    """Resident mode (`python3 -c <this source> --serve`, csi_driver/storage/resident.py): the controller's LVM and
    sync commands, one JSON request line each, {"v": 1, "argv": [...]}, answered with one line, {"rc": n,
    "stdout": "...", "stderr": "..."} or {"refused": "why"}, after the same checks as a forced command. Each command
    then costs the host no ssh session, shell or python3 start of its own, and an LVM command no `lvm` start either
    (LvmShell). Until stdin ends."""
    import json
    import subprocess

    env = dict(os.environ, LANG="C", LC_ALL="C", PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    lvm = LvmShell(["lvm"], env)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            argv = request["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) and "\0" not in a for a in argv):
                raise Refused("argv must be a list of strings")
            if argv[:1] and argv[0] not in RESIDENT_COMMANDS:
                raise Refused(f"{argv[0]!r} is not a command this mode runs")
            argv = check_argv(argv)
        except Refused as err:
            answer: dict[str, object] | None = {"refused": str(err)}
        except (ValueError, KeyError, TypeError) as err:
            answer = {"refused": f"not a request: {err}"}
        else:
            answer = lvm.run(argv) if argv[0] in LVM_OPTIONS else None
            if answer is None:
                try:
                    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, check=False)
                    answer = {"rc": done.returncode, "stdout": done.stdout.decode("utf-8", "replace"),
                              "stderr": done.stderr.decode("utf-8", "replace")}  # fmt: skip
                except OSError as err:  # as a shell reports a program it cannot run
                    answer = {"rc": 127, "stdout": "", "stderr": f"{argv[0]}: {err.strerror}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    lvm.close()
    return 0


class LvmShell:
    """LVM's own shell (`lvm` reading commands from stdin), kept running for the resident mode: an LVM command
    then costs no `lvm` start and no configuration load (under TCG 0.07 s for an lvs instead of 0.2 s). The protocol
    is lvmdbusd's: LVM_REPORT_FD gets, per command, one JSON document with the report (lvs, vgs) and a command log
    whose last entry is the shell's status of the command; the `lvmdbusd` command profile that lvm2 ships turns that
    on. After a failure `lastlog` gives the command's messages, which become stderr as `lvm` would have printed
    them. run() returns None, and the caller execs `lvm` as before, when the shell cannot take the command (a word
    its line splitter cannot carry) or cannot start (no such profile: then not again). A shell is replaced after
    RESTART_AFTER commands and when lvm.conf, lvmlocal.conf or a profile changes (the shell caches configuration and
    profiles between commands)."""

    RESTART_AFTER = 1000
    MAX_WORDS = 63  # the shell splits a line into at most 64 words
    CONFIG_FILES = ("/etc/lvm/lvm.conf", "/etc/lvm/lvmlocal.conf")
    PROFILE_DIR = "/etc/lvm/profile"  # command and metadata profiles (lvm.conf's config/profile_dir default)
    ENV = {"LVM_COMMAND_PROFILE": "lvmdbusd", "LVM_LOG_FILE_MAX_LINES": "0"}

    def __init__(self, program: list[str], env: dict[str, str]):
        self.program = program
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.report = -1
        self.usable = True
        self.commands = 0
        self.config_stamp: tuple[tuple[str, float], ...] = ()

    def run(self, argv: list[str]) -> dict[str, object] | None:
        line = shell_line(argv)
        if line is None or not self.usable:
            return None
        if self.proc is not None and (
            self.proc.poll() is not None
            or self.commands >= self.RESTART_AFTER
            or self._config_stamp() != self.config_stamp
        ):
            self.close()
        if self.proc is None and not self._start():
            self.usable = False
            return None
        self.commands += 1
        doc, stderr = self._exchange(line)
        if doc is None:
            self.close()
            return {"rc": 5, "stdout": "", "stderr": f"  {argv[0]}: the lvm shell ended during the command: {stderr}"}
        rc = _shell_rc(doc)
        stdout = ""
        if "report" in doc:
            import json

            stdout = json.dumps({"report": doc["report"]})
        if rc != 0:
            log, more = self._exchange("lastlog")
            messages = [e.get("log_message", "") for e in (log or {}).get("log", [])
                        if e.get("log_type") in ("error", "warn")]  # fmt: skip
            stderr += more + "".join(f"  {m}\n" for m in messages)
        return {"rc": rc, "stdout": stdout, "stderr": stderr}

    def close(self) -> None:
        import subprocess

        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.close()  # type: ignore[union-attr]  # the shell ends at the end of its input
            except OSError:
                pass  # it has ended already
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
        if self.report >= 0:
            os.close(self.report)
            self.report = -1

    def _config_stamp(self) -> tuple[tuple[str, float], ...]:
        """(path, mtime) of each configuration file and profile: a file edited, added or removed changes it."""
        try:
            profiles = sorted(os.path.join(self.PROFILE_DIR, name) for name in os.listdir(self.PROFILE_DIR))
        except OSError:
            profiles = []
        stamps = []
        for path in (*self.CONFIG_FILES, *profiles):
            try:
                stamps.append((path, os.stat(path).st_mtime))
            except OSError:
                stamps.append((path, 0.0))
        return tuple(stamps)

    def _start(self) -> bool:
        """Start the shell and check that it answers as expected (`version`)."""
        import subprocess

        self.config_stamp = self._config_stamp()
        self.report, write_end = os.pipe()
        env = dict(self.env, LVM_REPORT_FD=str(write_end), **self.ENV)
        try:
            self.proc = subprocess.Popen(self.program, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, pass_fds=(write_end,))  # fmt: skip
        except OSError:
            os.close(self.report)
            self.report = -1
            return False
        finally:
            os.close(write_end)
        self.commands = 0
        doc, _ = self._exchange("version")
        if doc is None or _shell_rc(doc) != 0:
            self.close()
            return False
        return True

    def _exchange(self, line: str) -> tuple[dict[str, Any] | None, str]:
        """Send one command line; its report document (None when the shell ended first) and what it wrote to
        stdout and stderr meanwhile (LVM prints its messages to the report, a few parse errors to stderr)."""
        import json

        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return None, ""
        report, other = b"", b""
        streams = [self.report, proc.stdout.fileno(), proc.stderr.fileno()]
        while self.report in streams:
            for fd, chunk in _read_ready(streams, None):
                if fd == self.report:
                    report += chunk
                else:
                    other += chunk
            if report.endswith(b"}\n"):
                try:
                    doc = json.loads(report)
                except ValueError:
                    continue
                outputs = [proc.stdout.fileno(), proc.stderr.fileno()]
                while chunks := _read_ready(outputs, 0):  # what it wrote before the report, if not read yet
                    other += b"".join(chunk for _, chunk in chunks)
                return doc, other.decode("utf-8", "replace")
        return None, other.decode("utf-8", "replace")


def shell_line(argv: list[str]) -> str | None:
    """argv as one line of the LVM shell, whose splitter knows whitespace and a quote opening a word, and no
    escapes; None when a word cannot be written so."""
    if len(argv) > LvmShell.MAX_WORDS:
        return None
    words = []
    for arg in argv:
        if "\n" in arg or "\r" in arg:
            return None
        if arg and not any(c.isspace() for c in arg) and arg[0] not in "'\"#":
            words.append(arg)
        elif '"' not in arg:
            words.append(f'"{arg}"')
        elif "'" not in arg:
            words.append(f"'{arg}'")
        else:
            return None
    return " ".join(words)


def _shell_rc(doc: dict[str, Any]) -> int:
    """The exit code `lvm` would have returned, from the shell's status entry (LVM's 1 is success)."""
    statuses = [e for e in doc.get("log", []) if e.get("log_context") == "shell" and e.get("log_type") == "status"]
    try:
        code = int(statuses[-1]["log_ret_code"])
    except (IndexError, KeyError, ValueError):
        return 5
    return 0 if code == 1 else code


def _read_ready(fds: list[int], timeout: float | None) -> list[tuple[int, bytes]]:
    """(fd, bytes) from those of `fds` ready within `timeout` (None: until one is); an fd at its end leaves `fds`."""
    import select

    ready, _, _ = select.select(fds, [], [], timeout)
    chunks = []
    for fd in ready:
        chunk = os.read(fd, 1 << 20)
        if chunk:
            chunks.append((fd, chunk))
        else:
            fds.remove(fd)
    return chunks


def main() -> int:  # returns only when refusing
    if sys.argv[1:] == ["--serve"]:
        return serve()
    command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    try:
        argv = decide(command)
    except Refused as err:
        # The program's name only: never the whole command line.
        first = command.split(maxsplit=1)[0][:64] if command.strip() else "(none)"
        import syslog  # only when refusing

        syslog.syslog(syslog.LOG_WARNING, f"berth-host: refused {first!r}: {err}")
        print(f"berth-host: refused: {err}", file=sys.stderr)
        return REFUSED_EXIT
    os.execvp(argv[0], argv)  # replaces this process, or raises


if __name__ == "__main__":
    sys.exit(main())
