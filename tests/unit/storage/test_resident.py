"""Resident host programs (csi_driver/storage/resident.py) through a LocalRunner and a tiny real program."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from csi_driver.storage.errors import CommandFailed, CommandTimeout
from csi_driver.storage.resident import wait_deadline
from csi_driver.storage.runner import LocalRunner, call_host_program

# Answers {"pid", "mode", "n"}; "sleep" waits first, "exit" ends the process without answering. One request per
# process without --serve, one per line with it: the contract of lio_host.py and nfs_host.py.
PROGRAM = """
import json, os, sys, time
def answer(text):
    req = json.loads(text)
    time.sleep(req.get("sleep", 0))
    if req.get("exit"):
        os._exit(3)
    print("a warning on stdout first")
    return {"pid": os.getpid(), "mode": MODE, "n": req.get("n")}
MODE = "serve" if sys.argv[1:] == ["--serve"] else "once"
if MODE == "serve":
    for line in iter(sys.stdin.readline, ""):
        print(json.dumps(answer(line)), flush=True)
else:
    print(json.dumps(answer(sys.stdin.read())))
"""


@pytest.fixture
def runner():
    r = LocalRunner()
    yield r
    r.close()


def call(runner: LocalRunner, timeout: float = 10, **request):
    return call_host_program(runner, sys.executable, PROGRAM, "test", request, timeout)


def test_one_resident_process_answers_request_after_request(runner):
    first, second = call(runner, n=1), call(runner, n=2)
    assert (first["mode"], second["mode"]) == ("serve", "serve")
    assert first["pid"] == second["pid"] and second["n"] == 2


def test_a_resident_process_that_died_is_replaced(runner):
    pid = call(runner)["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    again = call(runner)
    assert again["mode"] == "serve" and again["pid"] != pid


def test_a_timed_out_request_kills_the_process_and_the_next_one_starts_afresh(runner):
    pid = call(runner)["pid"]
    with pytest.raises(CommandTimeout):
        call(runner, timeout=0.5, sleep=5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # a late answer can never be mistaken for the next request's
    assert call(runner)["pid"] != pid


def test_a_process_that_ends_after_it_got_the_request_is_an_error_not_a_retry(runner):
    with pytest.raises(CommandFailed) as failed:
        call(runner, exit=True)
    assert failed.value.rc == 3
    assert call(runner)["mode"] == "serve"


def test_a_request_that_finds_it_busy_runs_one_shot(runner):
    pid = call(runner)["pid"]
    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(call(runner, sleep=1.5)))
    thread.start()
    time.sleep(0.5)
    meanwhile = call(runner)
    thread.join()
    assert meanwhile["mode"] == "once" and slow["pid"] == pid


def test_with_two_instances_two_requests_at_once_each_get_a_resident_process(runner):
    """What the runner allows its resident berth_host.py (the controller's workers often run two LVM commands at
    once); a third request meanwhile gets None (its caller runs it one-shot), and both stay for the requests after."""
    request = b'{"sleep": 1.5}'
    answers: list = []

    def resident_call() -> None:
        answers.append(runner.resident.call([sys.executable, "-c", PROGRAM], request, 10, ["test"], instances=2))

    threads = [threading.Thread(target=resident_call) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.7)
    third = runner.resident.call([sys.executable, "-c", PROGRAM], b"{}", 10, ["test"], instances=2)
    for thread in threads:
        thread.join()
    assert third is None
    assert [a["mode"] for a in answers] == ["serve", "serve"] and answers[0]["pid"] != answers[1]["pid"]
    again = {runner.resident.call([sys.executable, "-c", PROGRAM], b"{}", 10, ["test"], instances=2)["pid"]}
    assert again <= {a["pid"] for a in answers}


def resident_call(runner, request: bytes, timeout: float = 10, wait: float = 0.0):
    return runner.resident.call([sys.executable, "-c", PROGRAM], request, timeout, ["test"], wait=wait)


def test_a_request_allowed_to_wait_gets_the_resident_once_it_is_free(runner):
    """What the runner does for LVM commands (LVM serialises them anyway): it queues on the resident instead of
    starting a process of its own; one that waits too long still gets None, and so runs one-shot."""
    pid = resident_call(runner, b"{}")["pid"]
    slow = threading.Thread(target=resident_call, args=(runner, b'{"sleep": 1.5}'))
    slow.start()
    time.sleep(0.5)
    too_short = resident_call(runner, b"{}", wait=0.2)
    queued = resident_call(runner, b'{"n": 7}', wait=5)
    slow.join()
    assert too_short is None
    assert queued is not None and (queued["pid"], queued["n"]) == (pid, 7)


def test_a_waiting_request_waits_on_while_the_residents_keep_finishing_requests():
    assert wait_deadline(start=100, timeout=60, wait=10, finished=None) == 110
    assert wait_deadline(start=100, timeout=60, wait=10, finished=95) == 110  # before it came: no news
    assert wait_deadline(start=100, timeout=60, wait=10, finished=108) == 118
    assert wait_deadline(start=100, timeout=60, wait=10, finished=125) == 130  # half its timeout, at most
    assert wait_deadline(start=100, timeout=8, wait=10, finished=None) == 104


def test_the_wait_counts_against_the_timeout_and_takes_at_most_half_of_it(runner):
    resident_call(runner, b"{}")
    slow = threading.Thread(target=resident_call, args=(runner, b'{"sleep": 2}'))
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert resident_call(runner, b"{}", timeout=1, wait=5) is None  # busy for longer than half the timeout
    assert time.monotonic() - started < 0.9
    slow.join()


def test_close_wakes_a_waiting_request_which_then_runs_one_shot(runner):
    resident_call(runner, b"{}")
    slow = threading.Thread(target=resident_call, args=(runner, b'{"sleep": 2}'))
    slow.start()
    time.sleep(0.3)
    threading.Timer(0.3, runner.close).start()
    started = time.monotonic()
    assert resident_call(runner, b"{}", wait=5) is None
    assert time.monotonic() - started < 1.5
    slow.join()


def test_after_close_requests_run_one_shot(runner):
    pid = call(runner)["pid"]
    runner.close()
    assert call(runner)["mode"] == "once"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_program_called_without_resident_always_runs_one_shot(runner):
    """thin_metadata_host.py: called a few times a day, it must not hold an SSH session for good."""
    once = [call_host_program(runner, sys.executable, PROGRAM, "test", {"n": n}, 10, resident=False) for n in (1, 2)]
    assert [answer["mode"] for answer in once] == ["once", "once"] and once[0]["pid"] != once[1]["pid"]
    assert call(runner)["mode"] == "serve", "the others still go to their resident process"


@pytest.mark.parametrize("python", ["/nonexistent/python3", "/etc/hostname"])
def test_a_host_program_that_cannot_start_is_a_command_failure(runner, python):
    """Not an OSError: that would escape the gRPC mapping and every `except StorageError` cleanup."""
    with pytest.raises(CommandFailed) as caught:
        call_host_program(runner, python, PROGRAM, "test", {}, 10)
    assert caught.value.rc in (126, 127) and python in str(caught.value)
