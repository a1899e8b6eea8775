"""e2e/runner.py: which specs each profile runs, and how its summary is read."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from e2e import runner
from lab.ginkgo import ginkgo_counts


def test_every_profile_has_a_testdriver_and_a_ci_subset() -> None:
    for profile in runner.PROFILES:
        assert (runner.TESTDRIVERS / f"{profile}.yaml").is_file()
        assert runner.CI_FOCUS[profile]
        for focus in runner.CI_FOCUS[profile]:
            re.compile(focus)


def test_the_ci_subset_covers_every_pattern_the_issue_names() -> None:
    focus = " ".join(f for fs in runner.CI_FOCUS.values() for f in fs)
    for suite in ("provisioning", "volumes", "volumeMode", "subPath", "snapshottable", "snapshot data source",
                  "pvc data source", "volume-expand", "multiVolume"):  # fmt: skip
        assert suite in focus, suite


def test_ci_focus_matches_the_suites_spec_names() -> None:
    spec = ("External Storage [Driver: berth.csi.io] [Testpattern: Dynamic PV (default fs)] provisioning should "
            "provision storage with pvc data source")  # fmt: skip
    block = spec.replace("(default fs)", "(block volmode)")
    assert any(re.search(rf"External.Storage.*{f}", block) for f in runner.CI_FOCUS["iscsi-block"])
    assert not any(re.search(rf"External.Storage.*{f}", block + " (ROX mode)") for f in runner.CI_FOCUS["iscsi-block"])
    assert not any(re.search(rf"External.Storage.*{f}", spec) for f in runner.CI_FOCUS["iscsi-block"])


def test_summary_reads_the_last_ginkgo_line(tmp_path: Path) -> None:
    log = tmp_path / "nfs.log"
    log.write_text("Ran 5 of 7673 Specs in 300.1 seconds\nSUCCESS! -- 5 Passed | 0 Failed | 0 Pending | 7668 Skipped\n")
    result = runner.E2EResult("nfs", 0, 301, log, ginkgo_counts(log.read_text()))
    assert not result.failed
    assert result.summary == "e2e nfs: 5 Passed | 0 Failed | 0 Pending | 7668 Skipped in 301 s"
    assert runner.E2EResult("nfs", 1, 5, log, ginkgo_counts("panic: ...")).failed  # no summary: never a pass


def test_the_ginkgo_cli_gets_the_same_run_and_only_absolute_paths(tmp_path: Path, monkeypatch) -> None:
    control_plane = SimpleNamespace(bin=Path("/cache/bin"), admin_kubeconfig=Path("/run/lab/admin.conf"))
    lab = SimpleNamespace(cluster=SimpleNamespace(control_plane=control_plane))
    monkeypatch.chdir(tmp_path)
    alone = runner.e2e_argv(lab, "nfs", True, Path("artifacts/e2e/nfs"))  # type: ignore[arg-type]
    cli = runner.e2e_argv(lab, "nfs", True, Path("artifacts/e2e/nfs"), procs=3)  # type: ignore[arg-type]
    assert alone[0] == "/cache/bin/e2e.test" and cli[:2] == ["/cache/bin/ginkgo", "--procs=3"]
    binary = cli.index("/cache/bin/e2e.test")
    assert cli[binary + 1] == "--"
    suite = cli[binary + 2 :]
    assert f"--report-dir={tmp_path}/artifacts/e2e/nfs" in suite
    assert alone == ["/cache/bin/e2e.test", *suite, *(f"--ginkgo.{flag.lstrip('-')}" for flag in cli[2:binary])]
    assert "--ginkgo.focus=External.Storage.*" in alone and "--ginkgo.v" in alone
    block = runner.e2e_argv(lab, "iscsi-block", True, Path("r"))  # type: ignore[arg-type]
    assert "--ginkgo.focus=External.Storage.*\\(block volmode\\)" in block
    fs_full, fs_ci = (runner.e2e_argv(lab, "iscsi-fs", full, Path("r")) for full in (True, False))  # type: ignore[arg-type]
    assert [a for a in fs_full if a.startswith("--ginkgo.skip=")][0].endswith("|\\(block volmode\\)")
    assert not [a for a in fs_ci if "block volmode" in a]
    one_pattern = runner.e2e_argv(lab, "iscsi-block", True, Path("r"), focus=[r"\(xfs\)"])  # type: ignore[arg-type]
    assert [a for a in one_pattern if "focus" in a] == ["--ginkgo.focus=External.Storage.*\\(xfs\\)"]


def test_the_ci_subset_runs_iscsi_fs_two_specs_at_a_time_and_the_full_suite_one(tmp_path: Path, monkeypatch) -> None:
    control_plane = SimpleNamespace(bin=Path("/cache/bin"), admin_kubeconfig=Path("/run/lab/admin.conf"))
    lab = SimpleNamespace(cluster=SimpleNamespace(control_plane=control_plane))
    argvs: list[list[str]] = []
    monkeypatch.setattr(runner.subprocess, "run", lambda argv, **_: argvs.append(argv) or SimpleNamespace(returncode=0))
    runner.run_e2e(lab, "iscsi-fs", tmp_path)  # type: ignore[arg-type]
    runner.run_e2e(lab, "iscsi-block", tmp_path)  # type: ignore[arg-type]
    runner.run_e2e(lab, "iscsi-fs", tmp_path, full=True)  # type: ignore[arg-type]
    runner.run_e2e(lab, "iscsi-fs", tmp_path, full=True, procs=4)  # type: ignore[arg-type]
    assert argvs[0][:2] == ["/cache/bin/ginkgo", "--procs=2"]
    assert argvs[1][0] == argvs[2][0] == "/cache/bin/e2e.test"
    assert argvs[3][:2] == ["/cache/bin/ginkgo", "--procs=4"]


def test_skip_reasons_count_the_specs_skipped_at_run_time(tmp_path: Path) -> None:
    (tmp_path / "junit_01.xml").write_text(
        '<testsuites><testsuite name="Kubernetes e2e suite">'
        '<testcase name="a"><skipped message="skipped - Driver berth.csi.io doesn&apos;t support xfs -- skipping"/>'
        '</testcase><testcase name="b"><skipped message="skipped -\n Driver berth.csi.io doesn&apos;t support xfs'
        ' -- skipping"/></testcase>'
        '<testcase name="c"><skipped message="skipped"/></testcase><testcase name="d"/>'
        "</testsuite></testsuites>"
    )
    assert runner.skip_reasons(tmp_path) == {"Driver berth.csi.io doesn't support xfs -- skipping": 2}
