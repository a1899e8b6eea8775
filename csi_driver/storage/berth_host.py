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
    then costs the host no ssh session, shell or python3 start of its own. Until stdin ends."""
    import json
    import subprocess

    env = dict(os.environ, LANG="C", LC_ALL="C", PATH="/usr/sbin:/usr/bin:/sbin:/bin")
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
            answer: dict[str, object] = {"refused": str(err)}
        except (ValueError, KeyError, TypeError) as err:
            answer = {"refused": f"not a request: {err}"}
        else:
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, check=False)
                answer = {"rc": done.returncode, "stdout": done.stdout.decode("utf-8", "replace"),
                          "stderr": done.stderr.decode("utf-8", "replace")}  # fmt: skip
            except OSError as err:  # as a shell reports a program it cannot run
                answer = {"rc": 127, "stdout": "", "stderr": f"{argv[0]}: {err.strerror}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


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
