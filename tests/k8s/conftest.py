"""Fixtures for the tests in the lab cluster: Berth installed with `helm install` (tests/k8s/install.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from lab import config
from lab.topology import Lab
from tests.k8s.install import install_berth
from tests.k8s.kube import Kube

ARTIFACTS = config.REPO / "artifacts" / "k8s"
_kube: Kube | None = None


@pytest.fixture(scope="session")
def kube(kube_lab: Lab) -> Iterator[Kube]:
    """The cluster with Berth installed by helm and registered on every node."""
    global _kube
    _kube = install_berth(kube_lab)
    yield _kube
    _kube = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.failed and report.when in ("setup", "call") and _kube is not None:
        dest = ARTIFACTS / re.sub(r"[^\w.-]+", "_", item.nodeid).strip("_")
        try:
            _kube.save_evidence(dest)
            report.sections.append(("k8s artifacts", f"events, objects and Berth/sidecar logs in {dest}"))
        except Exception as e:  # noqa: BLE001 - never mask the test's own failure
            report.sections.append(("k8s artifacts", f"collecting failed: {e}"))
    return report
