"""pytest fixtures for the storage lab (loaded from tests/conftest.py).

- `lab`: session-scoped; brings the topology up once and tears it down at the end of the session, also when
  tests fail or the run is interrupted (Ctrl-C, SIGTERM; the guests even die with a SIGKILLed pytest).
  With BERTH_LAB_REUSE=1 it uses a lab already started by `python -m lab up` (after syncing the tree) and
  leaves it running. Skipped, with the reason, only when qemu-system-x86_64 is missing.
- On a failed test that used `lab`: console logs, `journalctl -b` and storage state of every guest are
  copied into artifacts/lab/<test>/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import config
from lab.topology import STATE, Lab

ARTIFACTS = Path(os.environ.get("BERTH_LAB_ARTIFACTS", config.REPO / "artifacts" / "lab"))
_active: Lab | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs the qemu storage lab (real kernel iSCSI/LIO/NFS/LVM in guests)")
    config.addinivalue_line("markers", "k8s: needs the lab with its Kubernetes cluster (kubelet, sidecars, Helm)")


def _clean_stale_runs() -> None:
    """Remove run directories of earlier pytest sessions that were killed (their owner pid is gone)."""
    root = config.LAB_DIR / "run"
    for d in root.glob("pytest-*") if root.is_dir() else []:
        pid = int(d.name.split("-", 1)[1]) if d.name.split("-", 1)[1].isdigit() else 0
        if pid and Path(f"/proc/{pid}").exists():
            continue
        if (d / STATE).exists():
            Lab.attach(d).down()  # stops any guest still alive, then removes the directory
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    yield from _session_lab(kubernetes=False)


@pytest.fixture(scope="session")
def kube_lab() -> Iterator[Lab]:
    """The lab with a Kubernetes cluster (lab.cluster): `kube_lab.cluster.control_plane.kubectl(...)`."""
    yield from _session_lab(kubernetes=True)


def _session_lab(kubernetes: bool) -> Iterator[Lab]:
    global _active
    if not config.qemu_binary():
        pytest.skip(
            "qemu-system-x86_64 not found on PATH: the storage lab needs qemu "
            "(apt-get install qemu-system-x86 qemu-utils, or run lab/ci-setup.sh)"
        )
    if os.environ.get("BERTH_LAB_REUSE") == "1" and (config.RUN_DIR / STATE).exists():
        existing = Lab.attach(config.RUN_DIR)
        if all(existing.alive().values()) and bool(existing.cluster) == kubernetes:
            existing.sync()
            _active = existing
            yield existing
            _active = None
            return
    _clean_stale_runs()
    lab = Lab(config.LAB_DIR / "run" / f"pytest-{os.getpid()}", owner_bound=True, kubernetes=kubernetes)
    # SIGTERM (CI timeout, kill) would end pytest without teardown: turn it into a KeyboardInterrupt.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        timings = lab.up()
        print(f"\n[lab] up: {timings}")
        _active = lab
        yield lab
    finally:
        _active = None
        lab.down()
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if (
        report.failed
        and report.when in ("setup", "call")
        and _active is not None
        and {"lab", "kube_lab"} & set(getattr(item, "fixturenames", ()))
    ):
        dest = ARTIFACTS / re.sub(r"[^\w.-]+", "_", item.nodeid).strip("_")
        try:
            _active.collect(dest)
            report.sections.append(("lab artifacts", f"console logs and journals in {dest}"))
        except Exception as e:  # noqa: BLE001 - never mask the test's own failure
            report.sections.append(("lab artifacts", f"collecting failed: {e}"))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One line per lab test phase in artifacts/lab/times.log as it ends, so a run cut short by a time limit
    still shows where its time went (junit XML is written only at the end)."""
    if not {"lab", "k8s"} & set(report.keywords) or (report.when != "call" and report.duration < 1):
        return
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with (ARTIFACTS / "times.log").open("a") as log:
        log.write(f"{time.strftime('%H:%M:%S')} {os.getpid()} {report.duration:7.1f}s {report.when:8} "
                  f"{report.outcome:7} {report.nodeid}\n")  # fmt: skip
