"""The resident runner's LVM shell (berth_host.LvmShell) against a stand-in `lvm` that speaks the shell's protocol:
one command line in, one JSON document on LVM_REPORT_FD out, `lastlog` for the failed command's messages. The real
shell is exercised on the lab's storage host (tests/berth_lab, csi-sanity)."""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.storage.berth_host import LvmShell, shell_line

C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale


def split_like_lvm(line: str) -> list[str]:
    """lvm_split of LVM's shell: words split at C isspace, or a quote opening a word up to the same quote; no
    escapes; `#` opening a word ends the line."""
    words, i = [], 0
    while i < len(line):
        while i < len(line) and line[i] in C_SPACE:
            i += 1
        if i == len(line) or line[i] == "#":
            break
        quote = line[i] if line[i] in "'\"" else None
        i += 1 if quote else 0
        j = i
        while j < len(line) and (line[j] != quote if quote else line[j] not in C_SPACE):
            j += 1
        words.append(line[i:j])
        i = j + 1
    return words


FAKE_LVM = f"C_SPACE = {C_SPACE!r}\n" + inspect.getsource(split_like_lvm) + r'''
import json, os, sys
report = os.fdopen(int(os.environ["LVM_REPORT_FD"]), "w")
if os.environ.get("LVM_COMMAND_PROFILE") != "lvmdbusd" or os.environ.get("FAKE_NO_PROFILE"):
    sys.exit(5)  # as lvm does when the profile is missing
seen = open(os.environ["FAKE_SEEN"], "a")
last = []

def status(name, code, extra=()):
    return [*extra, {"log_type": "status", "log_context": "shell", "log_object_name": name,
                     "log_ret_code": str(code)}]

for line in sys.stdin:
    argv = split_like_lvm(line.rstrip("\n"))
    doc = {}
    if argv == ["lastlog"]:
        doc["log"] = last
    else:
        seen.write(json.dumps(argv) + "\n")
        seen.flush()
        if argv[0] == "die":
            sys.exit(1)
        if argv[0] == "lvs":
            doc["report"] = [{"lv": [{"lv_name": argv[-1]}]}]
        if argv[0] == "lvremove":
            sys.stderr.write("lvremove: a parse message\n")
            sys.stderr.flush()
            errors = [{"log_type": "error", "log_message": "Failed to find logical volume"},
                      {"log_type": "warn", "log_message": "WARNING: a warning"}]
            last = status(argv[0], 5, errors)
        else:
            last = status(argv[0], 1)
        doc["log"] = last if argv[0] != "lvremove" else status(argv[0], 5)
    report.write(json.dumps(doc, indent=2) + "\n")
    report.flush()
'''


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = tmp_path / "lvm.py"
    fake.write_text(FAKE_LVM)
    conf = tmp_path / "lvm.conf"
    conf.write_text("")
    monkeypatch.setattr(LvmShell, "CONFIG_FILES", (str(conf),))
    (tmp_path / "profile").mkdir()
    monkeypatch.setattr(LvmShell, "PROFILE_DIR", str(tmp_path / "profile"))
    lvm = LvmShell([sys.executable, str(fake)], {"FAKE_SEEN": str(tmp_path / "seen"), "PATH": "/usr/bin:/bin"})
    yield lvm
    lvm.close()


def seen(tmp_path: Path) -> list[list[str]]:
    return [json.loads(line) for line in (tmp_path / "seen").read_text().splitlines()]


def test_a_report_comes_back_as_lvm_prints_it_and_a_success_as_exit_code_0(shell: LvmShell, tmp_path: Path) -> None:
    answer = shell.run(["lvs", "--reportformat", "json", "--select", "pool_lv=p || lv_name=p", "vg"])
    assert answer == {"rc": 0, "stdout": json.dumps({"report": [{"lv": [{"lv_name": "vg"}]}]}), "stderr": ""}
    assert shell.run(["lvchange", "--addtag", "berth.x=1", "vg/lv"]) == {"rc": 0, "stdout": "", "stderr": ""}
    assert seen(tmp_path) == [
        ["version"],  # the start-up check
        ["lvs", "--reportformat", "json", "--select", "pool_lv=p || lv_name=p", "vg"],
        ["lvchange", "--addtag", "berth.x=1", "vg/lv"],
    ]


def test_a_failure_has_lvms_exit_code_and_its_messages_on_stderr(shell: LvmShell) -> None:
    answer = shell.run(["lvremove", "--force", "--yes", "vg/gone"])
    assert answer is not None and answer["rc"] == 5
    stderr = str(answer["stderr"])
    assert "  Failed to find logical volume\n" in stderr and "  WARNING: a warning\n" in stderr
    assert "lvremove: a parse message" in stderr


def test_a_shell_that_ends_mid_command_fails_that_command_and_the_next_gets_a_new_shell(
    shell: LvmShell, tmp_path: Path
) -> None:
    died = shell.run(["die"])
    assert died is not None and died["rc"] == 5 and "the lvm shell ended during the command" in str(died["stderr"])
    assert shell.run(["lvs", "vg"]) is not None
    assert seen(tmp_path) == [["version"], ["die"], ["version"], ["lvs", "vg"]]


def test_a_shell_that_ended_between_commands_is_replaced_before_the_next(shell: LvmShell, tmp_path: Path) -> None:
    shell.run(["lvs", "a"])
    assert shell.proc is not None
    shell.proc.kill()
    shell.proc.wait()
    assert shell.run(["lvs", "b"]) == {"rc": 0, "stdout": json.dumps({"report": [{"lv": [{"lv_name": "b"}]}]}),
                                       "stderr": ""}  # fmt: skip
    assert seen(tmp_path) == [["version"], ["lvs", "a"], ["version"], ["lvs", "b"]]


def test_a_changed_lvm_conf_or_many_commands_start_a_new_shell(
    shell: LvmShell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shell.run(["lvs", "a"])
    conf = Path(LvmShell.CONFIG_FILES[0])
    conf.write_text("# changed\n")
    stat = conf.stat()
    os.utime(conf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    shell.run(["lvs", "b"])
    monkeypatch.setattr(LvmShell, "RESTART_AFTER", 2)
    shell.run(["lvs", "c"])
    shell.run(["lvs", "d"])
    assert seen(tmp_path) == [["version"], ["lvs", "a"], ["version"], ["lvs", "b"], ["lvs", "c"], ["version"],
                              ["lvs", "d"]]  # fmt: skip


def test_a_profile_added_or_changed_starts_a_new_shell(shell: LvmShell, tmp_path: Path) -> None:
    shell.run(["lvs", "a"])
    profile = tmp_path / "profile" / "thin-performance.profile"
    profile.write_text("allocation {}\n")
    shell.run(["lvs", "b"])
    shell.run(["lvs", "c"])
    stat = profile.stat()
    os.utime(profile, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    shell.run(["lvs", "d"])
    assert seen(tmp_path) == [["version"], ["lvs", "a"], ["version"], ["lvs", "b"], ["lvs", "c"], ["version"],
                              ["lvs", "d"]]  # fmt: skip


def test_without_the_profile_the_shell_is_not_used_and_not_tried_again(shell: LvmShell, tmp_path: Path) -> None:
    shell.env["FAKE_NO_PROFILE"] = "1"
    assert shell.run(["lvs", "vg"]) is None
    assert shell.run(["lvs", "vg"]) is None
    assert not (tmp_path / "seen").exists()


def test_a_command_the_shell_cannot_carry_is_left_to_the_caller(shell: LvmShell, tmp_path: Path) -> None:
    assert shell.run(["lvchange", "--addtag", "a\nb", "vg/lv"]) is None
    assert shell.run(["lvs", "--select", "x='a' && y=\"b\"", "vg"]) is None
    assert not (tmp_path / "seen").exists()  # not even started


@given(st.lists(st.text(alphabet=st.sampled_from(list("ab=|&# \t'\".-/")), max_size=8), min_size=1, max_size=8))
def test_every_line_splits_back_into_its_argv(argv: list[str]) -> None:
    line = shell_line(argv)
    if line is None:
        assert any('"' in a and "'" in a for a in argv)
    else:
        assert split_like_lvm(line) == argv


def test_too_many_words_for_one_line_are_left_to_the_caller() -> None:
    assert shell_line(["lvchange", *["--addtag", "t"] * 32]) is None
    assert shell_line(["lvchange", *["--addtag", "t"] * 31]) is not None
