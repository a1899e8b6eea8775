"""The csi-sanity runner's verdict: only skips of features Berth does not offer are acceptable."""

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
