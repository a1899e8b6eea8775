"""Kubernetes' storage e2e suite (External Storage), the CI subset of every profile, at the same time
(e2e/runner.py; `e2e/run --full` runs the rest by hand)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from e2e.runner import PROFILES, run_e2e
from lab import config
from tests.k8s.kube import Kube

pytestmark = [pytest.mark.lab, pytest.mark.k8s]


def test_e2e_ci_subset(kube: Kube) -> None:
    out = config.REPO / "artifacts" / "e2e"
    with ThreadPoolExecutor(len(PROFILES)) as pool:
        results = list(pool.map(lambda p: run_e2e(kube.lab, p, out), PROFILES))
    summaries = "\n".join(r.summary for r in results)
    print(f"\n{summaries}")
    assert not any(r.failed for r in results), f"{summaries}\nlogs: {out}"
