"""The csi-sanity runner's verdict: only skips of features Berth does not offer are acceptable."""

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


def test_only_skips_of_features_not_offered_are_expected():
    result = SanityResult("iscsi-block", 1, 0, 1, 4, 1.0, OUTPUT)
    assert len(result.skipped_specs()) == 4
    assert result.unexpected_skips() == [
        "Node Service NodeExpandVolume should work if node-expand is called after node-publish"
    ]


def test_each_profile_names_a_lab_backend_and_gets_a_controller_serving_only_it():
    import yaml

    from sanity.runner import PROFILE_BACKENDS, PROFILES, REPO, lab_config_text

    assert set(PROFILE_BACKENDS) == set(PROFILES)
    for profile, backend in PROFILE_BACKENDS.items():
        parameters = next(f for f in PROFILES[profile] if f.startswith("--csi.testvolumeparameters="))
        assert yaml.safe_load((REPO / "sanity" / parameters.rsplit("/", 1)[1]).read_text()) == {"backend": backend}
        config = parse_config(yaml.safe_load(lab_config_text(backend)))
        assert list(config.backends) == [backend] and config.default_backend == backend
