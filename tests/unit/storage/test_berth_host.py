"""The restricted host's forced command (berth_host.py): Berth's own operations run, nothing else does."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.storage import lio, nfs, thin_metadata
from csi_driver.storage.berth_host import REFUSED_EXIT, Refused, split_quoted
from csi_driver.storage.host_access import berth_host_script
from csi_driver.storage.runner import berth_host_program, remote_command
from tests.unit.storage.fakes import FakeRunner, decide


def command(*argv: str) -> str:
    return remote_command(list(argv))  # what sshd puts in SSH_ORIGINAL_COMMAND


@pytest.mark.parametrize(
    "program", [lio.host_program(), nfs.host_program(), thin_metadata.host_program(), berth_host_program()]
)
@pytest.mark.parametrize("extra", [[], ["--serve"]])
def test_this_releases_host_programs_run_with_the_hosts_python(program: str, extra: list[str]) -> None:
    assert decide(command("/opt/odd/python3", "-c", program, *extra)) == [sys.executable, "-c", program, *extra]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["sh", "-c", "id"],
        ["bash"],
        ["python3", "-c", "import os; os.system('id')"],
        ["python3", "-c", lio.host_program() + "\n# changed"],
        ["python3", "-c", lio.host_program(), "--serve", "--debug"],
        ["python3", "-m", "http.server"],
        ["lvs", "--config", "global{thin_check_executable=/tmp/x}", "berth"],
        ["lvcreate", "--type", "thin", "--name", "x", "--commandprofile", "p", "berth"],
        ["lvremove", "--force", "--yes", "--", "berth/x"],
        ["lvextend", "--size"],
        ["vgremove", "berth"],
        ["sync", "-f", "srv/berth/x"],
        ["sync", "-f", "/srv/berth/../../etc"],
        ["sync", "/srv/berth/x"],
        ["/sbin/lvs; id"],
    ],
)
def test_anything_else_is_refused(argv: list[str]) -> None:
    with pytest.raises(Refused):
        decide(command(*argv) if argv else "")


def test_an_unparsable_command_is_refused() -> None:
    with pytest.raises(Refused, match="does not parse"):
        decide("lvs 'berth")


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))))
def test_commands_split_back_into_the_controllers_argv(argv: list[str]) -> None:
    assert split_quoted(" ".join(shlex.quote(a) for a in argv)) == argv


@pytest.mark.parametrize("text", ["lvs $(id)", "lvs `id`", 'lvs "berth"', "lvs ber\\th", "lvs berth;id", "lvs 'a'b'",
                                  "lvs\tberth", "lvs >x", "lvs ~"])  # fmt: skip
def test_shell_syntax_the_controller_never_writes_is_refused(text: str) -> None:
    with pytest.raises(Refused, match="does not parse"):
        split_quoted(text)


def test_the_fake_runner_holds_the_storage_layer_to_it() -> None:
    with pytest.raises(AssertionError, match="berth-host would refuse"):
        FakeRunner().on("lvs").run(["lvs", "--config", "x", "berth"])


def test_the_installed_script_refuses_and_runs(tmp_path) -> None:
    script = tmp_path / "berth-host"
    script.write_text(berth_host_script())
    script.chmod(0o755)

    def over_ssh(original: str) -> subprocess.CompletedProcess[str]:  # through its #! line, as sshd runs it
        env = {"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": original}
        return subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30)

    refused = over_ssh("id")
    assert refused.returncode == REFUSED_EXIT and "berth-host: refused" in refused.stderr
    assert over_ssh(command("python3", "-c", "print(1)")).returncode == REFUSED_EXIT
    assert over_ssh(command("python3", "-c", lio.host_program(), "--help")).returncode == REFUSED_EXIT
    synced = over_ssh(command("sync", "-f", "/"))
    assert synced.returncode == 0, synced.stderr


def test_the_resident_mode_runs_what_the_forced_command_would_and_refuses_the_rest() -> None:
    requests = [
        {"v": 1, "argv": ["sync", "-f", "/"]},
        {"v": 1, "argv": ["sync", "-f", "/berth-no-such-dir"]},
        {"v": 1, "argv": ["lvs", "--config", "global{thin_check_executable=/tmp/x}", "berth"]},
        {"v": 1, "argv": ["python3", "-c", lio.host_program()]},  # a host program: never from the resident
        {"v": 1, "argv": ["id"]},
        {"v": 1, "argv": "sync -f /"},
    ]
    lines = "".join(json.dumps(r) + "\n" for r in requests) + "not json\n"
    served = subprocess.run([sys.executable, "-c", berth_host_program(), "--serve"], input=lines, capture_output=True,
                            text=True, timeout=60, check=True)  # fmt: skip
    answers = [json.loads(line) for line in served.stdout.splitlines()]
    assert answers[0] == {"rc": 0, "stdout": "", "stderr": ""}
    assert answers[1]["rc"] == 1 and "berth-no-such-dir" in answers[1]["stderr"]
    assert "--config is not an option Berth uses" in answers[2]["refused"]
    assert all("refused" in a for a in answers[3:]) and len(answers) == 7
