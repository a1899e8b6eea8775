import os
import signal
import subprocess
import sys

from csi_driver.faults import ENV, fault_point

CALL = "from csi_driver.faults import fault_point; fault_point('a.b'); print('passed')"


def run_point(armed_file) -> subprocess.CompletedProcess:
    env = {**os.environ, ENV: str(armed_file)}
    return subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True, text=True, timeout=60)


def test_an_armed_point_kills_the_process_once(tmp_path):
    armed = tmp_path / "armed"
    armed.write_text("x.y\na.b\n")
    first = run_point(armed)
    assert first.returncode == -signal.SIGKILL and "passed" not in first.stdout
    assert armed.read_text() == "x.y\n"  # disarmed: the retry gets past it
    second = run_point(armed)
    assert second.returncode == 0 and second.stdout.strip() == "passed"


def test_points_are_inert_without_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    fault_point("a.b")
    monkeypatch.setenv(ENV, str(tmp_path / "missing"))
    fault_point("a.b")
