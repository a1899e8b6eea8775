import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from csi_driver.storage.errors import CommandFailed, CommandTimeout, HostUnreachable, InvalidRequest
from csi_driver.storage.runner import CommandRunner, LocalRunner, SshRunner, remote_command

HOSTILE = [
    "plain",
    "with space",
    "",
    "it's",
    'double"quote',
    "semi;colon",
    "$(touch /tmp/berth-pwned)",
    "`id`",
    "new\nline",
    "tab\there",
    "back\\slash",
    "glob*?[a]",
    "~root",
    "-n",
    "$HOME",
    "a && b || c | d > e < f",
    "ünïcödé 名前",
    "#comment",
    "'",
    "''",
]

SHELLS = [s for s in ("sh", "dash", "bash") if shutil.which(s)]


def argv_via_shell(shell: str, built: str) -> list[str]:
    # printf '%s\0' ARGS... prints each argument NUL-terminated: exactly what the shell passed on.
    out = subprocess.run([shell, "-c", built], capture_output=True, check=True).stdout
    return out.decode().split("\0")[:-1]


@pytest.mark.parametrize("shell", SHELLS)
def test_remote_command_round_trips_through_a_shell(shell):
    argv = ["printf", "%s\\0", *HOSTILE]
    assert argv_via_shell(shell, remote_command(argv)) == HOSTILE
    assert not os.path.exists("/tmp/berth-pwned")


def test_remote_command_rejects_strings_and_nul():
    with pytest.raises(InvalidRequest):
        remote_command("ls -l")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        remote_command(["echo", "a\x00b"])
    with pytest.raises(InvalidRequest):
        remote_command([])


def test_local_runner_passes_arguments_verbatim():
    r = LocalRunner()
    assert isinstance(r, CommandRunner)
    res = r.run(["printf", "%s\\0", *HOSTILE])
    assert res.rc == 0
    assert res.stdout.decode().split("\0")[:-1] == HOSTILE


def test_local_runner_stdin_and_c_locale():
    r = LocalRunner()
    res = r.run(
        [sys.executable, "-c", "import os,sys; print(sys.stdin.read().upper(), os.environ['LC_ALL'])"], input=b"abc"
    )
    assert res.text.strip() == "ABC C"


def test_local_runner_failure_carries_argv_rc_stderr():
    r = LocalRunner()
    with pytest.raises(CommandFailed) as exc:
        r.run([sys.executable, "-c", "import sys; sys.stderr.write('boom: Insufficient free space\\n'); sys.exit(5)"])
    e = exc.value
    assert e.rc == 5 and e.argv[0] == sys.executable
    assert "Insufficient free space" in e.stderr_tail and "exited 5" in str(e)
    res = r.run([sys.executable, "-c", "raise SystemExit(3)"], check=False)
    assert res.rc == 3


def test_local_runner_timeout_and_missing_binary():
    r = LocalRunner()
    with pytest.raises(CommandTimeout):
        r.run(["sleep", "5"], timeout=0.2)
    with pytest.raises(CommandFailed) as exc:
        r.run(["/nonexistent/berth-binary"])
    assert exc.value.rc == 127


def test_command_failed_message_is_bounded():
    e = CommandFailed(["python3", "-c", "x" * 5000], 1, "e" * 10000)
    assert len(str(e)) < 2300


# --- SshRunner against a fake ssh client (no server needed) ---

FAKE_SSH = textwrap.dedent(
    """\
    #!{python}
    # Fake OpenSSH client: records its argv, manages the control socket as a plain file and runs
    # the remote command string with `sh -c`, like sshd hands it to the user's shell.
    import os, subprocess, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_SSH_LOG"], "a") as log:
        log.write(repr(args) + "\\n")
    if os.environ.get("FAKE_SSH_UNREACHABLE"):
        sys.stderr.write("ssh: connect to host storage port 22: Connection refused\\n")
        sys.exit(255)
    state = open(os.environ["FAKE_SSH_STATE"]).read().split() if os.environ.get("FAKE_SSH_STATE") else ["up"]
    if state[0] == "hang":  # a host whose packets vanish: the connection attempt runs into its timeout
        import time
        time.sleep(float(state[1]))
        sys.stderr.write("ssh: connect to host storage port 22: Connection timed out\\n")
        sys.exit(255)
    opts = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "-o" and "=" in args[i + 1])
    path = opts["ControlPath"]
    if "-O" in args:
        os.unlink(path)
        sys.exit(0)
    if opts.get("ControlMaster") == "yes":
        open(path, "w").close()
        sys.exit(0)
    cmd = args[args.index("--") + 1:]
    assert len(cmd) == 1, cmd
    sys.exit(subprocess.run(["sh", "-c", cmd[0]]).returncode)
    """
)


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    script = tmp_path / "ssh"
    script.write_text(FAKE_SSH.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "ssh.log"
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    return script, log


def logged(log):
    import ast

    return [ast.literal_eval(line) for line in log.read_text().splitlines()]


def test_ssh_runner_round_trips_hostile_argv(fake_ssh):
    script, log = fake_ssh
    r = SshRunner(
        "storage.example",
        port=2222,
        identity_file="/keys/id_ed25519",
        known_hosts="/keys/known_hosts",
        ssh_binary=str(script),
    )
    try:
        res = r.run(["printf", "%s\\0", *HOSTILE])
        assert res.stdout.decode().split("\0")[:-1] == HOSTILE
        res = r.run(["cat"], input=b"json on stdin")
        assert res.stdout == b"json on stdin"
        with pytest.raises(CommandFailed) as exc:
            r.run(["sh", "-c", "echo nope >&2; exit 3"])
        assert exc.value.rc == 3 and "nope" in exc.value.stderr
        assert r.run(["false"], check=False).rc == 1
    finally:
        r.close()
    calls = logged(log)
    masters = [c for c in calls if "ControlMaster=yes" in c]
    assert len(masters) == 1, "the master is started once and reused"
    assert {"-N", "-f"} <= set(masters[0]) and any(a.startswith("ControlPersist=") for a in masters[0])
    for c in calls:
        assert "BatchMode=yes" in c and "StrictHostKeyChecking=yes" in c
        assert c[c.index("-p") + 1] == "2222" and c[c.index("-l") + 1] == "root"
        assert "UserKnownHostsFile=/keys/known_hosts" in c and c[c.index("-i") + 1] == "/keys/id_ed25519"
    assert ["-O", "exit"] == calls[-1][-3:-1]
    assert not os.path.exists(r.control_path) and not os.path.exists(os.path.dirname(r.control_path))


def test_ssh_runner_control_dir_is_private():
    r = SshRunner("h")
    try:
        mode = stat.S_IMODE(os.stat(os.path.dirname(r.control_path)).st_mode)
        assert mode == 0o700
        # Unix socket paths are limited to ~108 bytes.
        assert len(r.control_path) < 100
    finally:
        r.close()


def test_ssh_runner_unreachable(fake_ssh, monkeypatch):
    script, _ = fake_ssh
    monkeypatch.setenv("FAKE_SSH_UNREACHABLE", "1")
    r = SshRunner("storage.example", ssh_binary=str(script))
    try:
        with pytest.raises(HostUnreachable) as exc:
            r.run(["true"])
        assert "Connection refused" in str(exc.value)
    finally:
        r.close()


def test_ssh_runner_255_from_command_is_unreachable(fake_ssh):
    script, _ = fake_ssh
    r = SshRunner("storage.example", ssh_binary=str(script))
    try:
        with pytest.raises(HostUnreachable):
            r.run(["sh", "-c", "exit 255"], check=False)
    finally:
        r.close()


def test_ssh_command_args_shape():
    r = SshRunner("10.0.0.5", user="berth", strict_host_key_checking="accept-new")
    try:
        args = r.command_args(["lvs", "a b"])
        assert args[-3:] == ["10.0.0.5", "--", "lvs 'a b'"]
        assert "ControlMaster=no" in args and "StrictHostKeyChecking=accept-new" in args
    finally:
        r.close()
    with pytest.raises(HostUnreachable):
        r.run(["true"])  # closed


@pytest.mark.parametrize("host", ["", "-oProxyCommand=x", "a b"])
def test_ssh_runner_rejects_option_like_hosts(host):
    with pytest.raises(InvalidRequest):
        SshRunner(host)


# --- an unreachable storage host (issue #13 item 7) ---


@pytest.fixture
def host_state(fake_ssh, tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.write_text("up")
    monkeypatch.setenv("FAKE_SSH_STATE", str(state))
    return state


def test_calls_to_a_dead_host_share_one_attempt_then_fail_at_once_and_recover(fake_ssh, host_state):
    """Each caller used to wait for the lock, then make its own 40 s attempt: calls queued one after another."""
    import threading
    import time

    script, log = fake_ssh
    host_state.write_text("hang 1.0")
    r = SshRunner("storage.example", ssh_binary=str(script), connect_timeout=1, down_retry_seconds=0.5)
    try:
        errors: list[Exception] = []

        def call() -> None:
            try:
                r.run(["true"])
            except HostUnreachable as err:
                errors.append(err)

        started = time.monotonic()
        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 6 and time.monotonic() - started < 4, "six calls, one attempt's time, not six"
        assert len([c for c in logged(log) if "ControlMaster=yes" in c]) == 1
        started = time.monotonic()
        with pytest.raises(HostUnreachable, match="storage host storage.example:22 is unreachable"):
            r.run(["true"])
        assert time.monotonic() - started < 0.2, "remembered as down: no new attempt"
        host_state.write_text("up")
        time.sleep(0.6)
        assert r.run(["echo", "back"]).text == "back\n", "recovered without a restart"
    finally:
        r.close()


def test_a_lost_connection_marks_the_host_down(fake_ssh, host_state):
    script, log = fake_ssh
    r = SshRunner("storage.example", ssh_binary=str(script), down_retry_seconds=30)
    try:
        r.run(["true"])
        with pytest.raises(HostUnreachable):
            r.run(["sh", "-c", "exit 255"])
        count = len(logged(log))
        with pytest.raises(HostUnreachable, match="unreachable"):
            r.run(["true"])
        assert len(logged(log)) == count, "failed without running ssh"
    finally:
        r.close()


def test_at_most_max_sessions_commands_at_once(fake_ssh, tmp_path):
    """sshd refuses an 11th multiplexed session (MaxSessions 10), which reads like a dead host."""
    import threading

    script, _ = fake_ssh
    r = SshRunner("storage.example", ssh_binary=str(script), max_sessions=2)
    marker = tmp_path / "running"
    marker.mkdir()
    # Each command notes itself in a directory while it runs and records how many were running.
    body = f'touch {marker}/$$; ls {marker} | wc -l >> {tmp_path}/peaks; sleep 0.3; rm {marker}/$$'
    try:
        threads = [threading.Thread(target=r.run, args=(["sh", "-c", body],)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        r.close()
    peaks = [int(x) for x in (tmp_path / "peaks").read_text().split()]
    assert len(peaks) == 5 and max(peaks) <= 2


def test_lvm_and_sync_commands_run_through_one_resident_berth_host(fake_ssh):
    script, log = fake_ssh
    r = SshRunner("storage.example", ssh_binary=str(script))
    try:
        for _ in range(3):
            assert r.run(["sync", "-f", "/"]).rc == 0
        with pytest.raises(CommandFailed) as refused:
            r.run(["lvs", "--config", "global{thin_check_executable=/tmp/x}", "berth"])
        assert refused.value.rc == 126 and "berth-host: refused" in refused.value.stderr
        failed = r.run(["sync", "-f", "/berth-no-such-dir"], check=False)
        assert failed.rc == 1 and b"berth-no-such-dir" in failed.stderr
    finally:
        r.close()
    sessions = [c[-1] for c in logged(log) if "--" in c]
    assert len(sessions) == 1 and sessions[0].endswith(" --serve"), "one ssh session served all five"
