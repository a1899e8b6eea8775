"""csi-sanity's Identity specs against a real `berth` process on a unix socket."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.sanity


def find_csi_sanity() -> str | None:
    candidates = [
        os.environ.get("CSI_SANITY"),
        shutil.which("csi-sanity"),
        str(Path.home() / "go/bin/csi-sanity"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture
def csi_sanity() -> str:
    binary = find_csi_sanity()
    if binary is None:
        if os.environ.get("BERTH_REQUIRE_SANITY") == "1":
            pytest.fail("csi-sanity not found (set CSI_SANITY or put it on PATH)")
        pytest.skip(
            "csi-sanity not installed: go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.5.0"
        )
    return binary


def wait_for_socket(path: Path, process: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"berth exited early with {process.returncode}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"berth did not create {path} within {timeout}s")
        time.sleep(0.1)


def test_identity_specs_pass(csi_sanity: str, tmp_path: Path) -> None:
    socket_path = tmp_path / "sock" / "csi.sock"
    berth = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "csi_driver",
            "--mode",
            "controller",
            "--endpoint",
            f"unix://{socket_path}",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_socket(socket_path, berth)
        result = subprocess.run(
            [
                csi_sanity,
                f"--csi.endpoint=unix://{socket_path}",
                "--ginkgo.focus=Identity",
                "--ginkgo.no-color",
                f"--csi.mountdir={tmp_path}/mnt",
                f"--csi.stagingdir={tmp_path}/staging",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        berth.terminate()
        _, berth_log = berth.communicate(timeout=30)
    summary = re.search(r"(SUCCESS|FAIL)! -- (\d+) Passed \| (\d+) Failed", result.stdout)
    print(result.stdout[-2000:])
    assert result.returncode == 0 and summary, result.stdout[-4000:] + result.stderr[-2000:]
    passed, failed = int(summary.group(2)), int(summary.group(3))
    assert failed == 0 and passed > 0
    assert '"method": "/csi.v1.Identity/Probe"' in berth_log, "RPCs should be logged by the interceptor"
    assert berth.returncode == 0, "berth should shut down cleanly on SIGTERM"
