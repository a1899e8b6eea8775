"""Ginkgo's closing summary line, as csi-sanity and Kubernetes' e2e.test both print it."""

from __future__ import annotations

import re

# "FAIL! - Suite Timeout Elapsed -- ..." too: a run cut short by --ginkgo.timeout still reports its counts.
SUMMARY = re.compile(r"(SUCCESS|FAIL)![^\n]*?-- (\d+) Passed \| (\d+) Failed \| (\d+) Pending \| (\d+) Skipped")
KINDS = ("Passed", "Failed", "Pending", "Skipped")


def ginkgo_counts(output: str) -> dict[str, int]:
    """The last summary line's counts by kind; empty when there is none (the suite did not get to the end)."""
    matches = SUMMARY.findall(output)
    return dict(zip(KINDS, map(int, matches[-1][1:]), strict=True)) if matches else {}
