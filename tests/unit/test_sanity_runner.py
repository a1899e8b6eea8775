"""The csi-sanity runner's verdict: a skipped spec is a capability gone missing."""

from csi_driver.config import parse_config
from sanity.runner import SanityResult

OUTPUT = """\
S [SKIPPED] [0.3 seconds]
GroupController Service [GroupController Server] [BeforeEach] GroupControllerGetCapabilities should return
S [SKIPPED] [0.1 seconds]
ModifyVolume [Controller Server] [BeforeEach] should fail if no volume id is given
S [SKIPPED] [0.1 seconds]
Controller Service [Controller Server] CreateVolume [It] should create volume with a volume attribute class
S [SKIPPED] [0.1 seconds]
Node Service NodeExpandVolume should work if node-expand is called after node-publish
"""


def test_every_skip_is_unexpected():
    result = SanityResult("iscsi-block", 1, 0, 1, 4, 1.0, OUTPUT)
    assert result.unexpected_skips() == [
        "GroupController Service [GroupController Server] [BeforeEach] GroupControllerGetCapabilities should return",
        "ModifyVolume [Controller Server] [BeforeEach] should fail if no volume id is given",
        "Controller Service [Controller Server] CreateVolume [It] should create volume with a volume attribute class",
        "Node Service NodeExpandVolume should work if node-expand is called after node-publish",
    ], "GroupController and ModifyVolume are offered: their specs must run"


def test_each_profile_names_a_lab_backend_and_gets_a_controller_serving_only_it():
    import yaml

    from sanity.runner import PROFILE_BACKENDS, PROFILES, REPO, lab_config_text

    assert set(PROFILE_BACKENDS) == set(PROFILES)
    for profile, backend in PROFILE_BACKENDS.items():
        parameters = next(f for f in PROFILES[profile] if f.startswith("--csi.testvolumeparameters="))
        assert yaml.safe_load((REPO / "sanity" / parameters.rsplit("/", 1)[1]).read_text()) == {"backend": backend}
        config = parse_config(yaml.safe_load(lab_config_text(backend)))
        assert list(config.backends) == [backend] and config.default_backend == backend


def test_each_profile_modifies_volumes_with_parameters_its_backend_offers():
    import yaml

    from csi_driver.services.validation import check_mutable_parameters
    from csi_driver.storage.iscsi import IscsiExporter
    from csi_driver.storage.nfs import NfsExporter
    from sanity.runner import PROFILES, REPO

    offered = {"iscsi-mount": IscsiExporter, "iscsi-block": IscsiExporter, "nfs": NfsExporter}
    for profile, flags in PROFILES.items():
        path = next(f for f in flags if f.startswith("--csi.testvolumemutableparameters=")).rsplit("/", 1)[1]
        mutable = yaml.safe_load((REPO / "sanity" / path).read_text())
        assert mutable, f"{profile}: csi-sanity would send no mutable parameters"
        check_mutable_parameters(mutable, offered[profile].mutable_parameters, profile)


def test_a_run_cut_short_by_the_suite_timeout_still_has_a_summary():
    from lab.ginkgo import ginkgo_counts

    line = "FAIL! - Suite Timeout Elapsed -- 44 Passed | 2 Failed | 1 Pending | 49 Skipped"
    assert ginkgo_counts(line) == {"Passed": 44, "Failed": 2, "Pending": 1, "Skipped": 49}
    assert ginkgo_counts("SUCCESS! -- 80 Passed | 0 Failed | 1 Pending | 6 Skipped\n")["Passed"] == 80
    assert ginkgo_counts("Ran 3 of 96 Specs\n") == {}


def test_failures_are_named_once_with_their_reason():
    output = (
        "• [FAILED] [12.3 seconds]\n"
        "Node Service [It] should work\n"
        "  [FAILED] rpc error: code = Internal desc = All paths need to be up\n"
        "Summarizing 1 Failure:\n"
        "  [FAIL] Node Service [It] should work\n"
        "  [FAIL] Node Service [It] should work\n"
    )
    result = SanityResult("iscsi-mount", 0, 1, 0, 0, 1.0, output)
    assert result.failure_lines() == [
        "• [FAILED] [12.3 seconds]",
        "[FAILED] rpc error: code = Internal desc = All paths need to be up",
        "[FAIL] Node Service [It] should work",
    ]
