"""Node paths (issue #13 items 10 and 11, and hostile-but-legal paths): used exactly as given, or refused."""

import os

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.csi import csi_pb2
from csi_driver.node.commands import Result
from csi_driver.node.errors import InvalidPath
from csi_driver.node.mounts import MountTable
from csi_driver.node.paths import canonical_path, checked_path
from csi_driver.node.stage_record import RecordStore

from .test_node_service import VOL, code_of, publish_request, stage_request

HOSTILE_NAMES = [
    "with space",
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "back\\slash\\040",
    "quotes'\"`",
    "$(touch pwned);|&<>*?",
    "-o remount,rw",
    "unicode\u2028sep\x85\x1c",
    "\\012 not a newline",
]


def unpublish(node, context, target):
    node.service.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=target), context)


# --- the rules, at the function ---


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("relative/target", "not an absolute path"),
        ("", "not an absolute path"),
        ("/var/lib/kubelet/pods/../../../etc", "'..'"),
        ("/var/lib/kubelet/\0/mount", "NUL"),
        ("/" + "a/" * 2100, "the limit is 4095"),
        ("/var/" + "x" * 256, "component of 256 bytes"),
        ("/proc/self/root", "inside /proc"),
        ("/sys", "inside /sys"),
        ("/dev/sda", "inside /dev"),
        ("/", "root directory"),
        ("//./", "root directory"),
    ],
)
def test_paths_that_are_refused(path, fragment):
    with pytest.raises(InvalidPath, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        canonical_path(path, "target_path")


def test_canonical_form_is_the_kernel_s():
    assert canonical_path("//var/lib/./kubelet//pods/x/", "p") == "/var/lib/kubelet/pods/x"
    assert canonical_path("/var/lib/kubelet/a..b/...", "p") == "/var/lib/kubelet/a..b/..."  # names, not '..'


def test_a_symbolic_link_anywhere_in_the_path_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "pods").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidPath, match="symbolic link.*pods"):
        checked_path(str(tmp_path / "pods" / "mount"), "target_path")
    (tmp_path / "target").symlink_to("/etc")
    with pytest.raises(InvalidPath, match="symbolic link"):
        checked_path(str(tmp_path / "target"), "target_path")
    assert checked_path(str(tmp_path / "missing" / "deeper"), "p") == str(tmp_path / "missing" / "deeper")


# --- the rules, through the CSI service: INVALID_ARGUMENT before anything is touched ---


@pytest.mark.parametrize("bad", ["relative/staging", "/a/../b", "/a/\0b", "/proc/1/cwd"])
def test_stage_refuses_a_bad_staging_path(node, context, bad):
    code, details = code_of(node.service.NodeStageVolume, stage_request(node, staging_target_path=bad), context)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "staging_target_path" in details
    assert node.system.calls == [] and node.connector_log == []


@pytest.mark.parametrize("bad", ["relative/target", "/a/../b", "/a/\0b", "/proc/1/root/x", "/" + "y" * 300])
def test_publish_and_unpublish_refuse_a_bad_target_path(node, context, bad):
    node.service.NodeStageVolume(stage_request(node), context)
    calls = len(node.system.calls)
    request = publish_request(node, target_path=bad)
    code, details = code_of(node.service.NodePublishVolume, request, context)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "target_path" in details
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=bad)
    code, _ = code_of(node.service.NodeUnpublishVolume, request, context)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(node.system.calls) == calls


def test_dot_dot_never_leads_out_of_the_kubelet_directory(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    escape = os.path.join(node.root, "mnt", "..", "escaped")
    code, _ = code_of(node.service.NodePublishVolume, publish_request(node, target_path=escape), context)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert not os.path.exists(os.path.join(node.root, "escaped"))


def test_publish_through_a_symlinked_directory_mounts_nothing_there(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    outside = os.path.join(node.root, "outside")
    os.mkdir(outside)
    os.symlink(outside, os.path.join(node.root, "mnt", "pod"))
    request = publish_request(node, target_path=os.path.join(node.root, "mnt", "pod", "mount"))
    code, details = code_of(node.service.NodePublishVolume, request, context)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "symbolic link" in details
    assert os.listdir(outside) == [] and not [c for c in node.system.calls if "--bind" in c]


def test_stats_of_a_path_that_cannot_be_a_volume_path_is_not_found(node, context):
    """csi-sanity sends "some/path" and expects NOT_FOUND; NUL must not become INTERNAL either."""
    node.service.NodeStageVolume(stage_request(node), context)
    for bad in ("some/path", "/x/\0", "/a/../b"):
        request = csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOL, volume_path=bad)
        code, _ = code_of(node.service.NodeGetVolumeStats, request, context)
        assert code == grpc.StatusCode.NOT_FOUND


# --- hostile but legal: mounted and unmounted correctly, argv only ---


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("block", [False, True])
def test_hostile_but_legal_targets_publish_and_unpublish(node, context, name, block):
    node.service.NodeStageVolume(stage_request(node, block=block), context)
    target = os.path.join(node.root, "mnt", name)
    node.service.NodePublishVolume(publish_request(node, block=block, target_path=target), context)
    source = node.device if block else os.path.join(node.root, "staging")
    binds = [c for c in node.system.calls if "--bind" in c]
    assert binds == [["mount", "--bind", "--", source, target]], "one argv, the name as given, after '--'"
    node.service.NodePublishVolume(publish_request(node, block=block, target_path=target), context)  # idempotent
    unpublish(node, context, target)
    assert not node.system.table.is_mountpoint(target) and not os.path.exists(target)


def kernel_escaped(path: str) -> str:
    """How the kernel writes a path into mountinfo (fs/proc_namespace.c mangles " \\t\\n\\\\")."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def test_mountinfo_round_trips_every_character_a_path_may_hold(tmp_path):
    """Every code point up to U+0250 and the Unicode line separators, in mount points the kernel escapes only
    partly; str.splitlines() used to split lines at \\r, \\v, \\f, \\x1c-\\x1e, \\x85 and U+2028/9."""
    characters = [chr(c) for c in range(1, 0x250) if chr(c) != "/"] + ["\u2028", "\u2029"]
    mount_points = ["/mnt/" + "".join(characters[i : i + 40]) for i in range(0, len(characters), 40)]
    mount_points += ["/mnt/" + name for name in HOSTILE_NAMES]
    lines = [
        f"{100 + i} 22 0:5 /sdb {kernel_escaped(mp)} rw,relatime shared:7 - devtmpfs udev rw,size=100k"
        for i, mp in enumerate(mount_points)
    ]
    info = tmp_path / "mountinfo"
    info.write_bytes(("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n" + "\n".join(lines) + "\n").encode("utf-8"))
    table = MountTable(str(info))
    assert [e.mount_point for e in table.entries()[1:]] == mount_points
    for mount_point in mount_points:
        assert table.at(mount_point) is not None


# --- NodeUnpublish removes only what Berth created (CSI: "the SP MUST delete the file or directory it created") ---


def test_unpublish_leaves_a_file_berth_did_not_create(node, context):
    target = os.path.join(node.root, "mnt", "someones-file")
    with open(target, "w") as f:
        f.write("not Berth's")
    unpublish(node, context, target)
    assert os.path.exists(target)
    node.service.NodeStageVolume(stage_request(node, block=True), context)
    empty = os.path.join(node.root, "mnt", "empty-file")
    open(empty, "w").close()
    unpublish(node, context, empty)
    assert os.path.exists(empty), "an empty file the CO made is still not Berth's"


def test_unpublish_leaves_a_directory_berth_did_not_create(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    target = os.path.join(node.root, "mnt", "made-by-the-co")
    os.mkdir(target)
    node.service.NodePublishVolume(publish_request(node, target_path=target), context)
    unpublish(node, context, target)
    assert not node.system.table.is_mountpoint(target) and os.path.isdir(target)


def test_unpublish_removes_its_own_directory_but_never_a_non_empty_one(node, context):
    node.service.NodeStageVolume(stage_request(node), context)
    own = os.path.join(node.root, "mnt", "own")
    node.service.NodePublishVolume(publish_request(node, target_path=own), context)
    unpublish(node, context, own)
    assert not os.path.exists(own)
    node.service.NodePublishVolume(publish_request(node, target_path=own), context)
    node.system.table.remove_top(own)  # the mount went away (node restart) and someone wrote into the directory
    open(os.path.join(own, "data"), "w").close()
    unpublish(node, context, own)
    assert os.path.exists(os.path.join(own, "data"))
    assert RecordStore(os.path.join(node.root, "state")).load(VOL).created == []


def test_a_failed_bind_removes_the_target_it_created(node, context):
    node.service.NodeStageVolume(stage_request(node, block=True), context)
    node.system.handlers.append(lambda args: Result(32, "", "mount: denied") if "--bind" in args else None)
    target = os.path.join(node.root, "mnt", "t")
    code, _ = code_of(node.service.NodePublishVolume, publish_request(node, block=True, target_path=target), context)
    assert code == grpc.StatusCode.INTERNAL
    assert not os.path.exists(target)
    record = RecordStore(os.path.join(node.root, "state")).load(VOL)
    assert record.created == [] and record.targets == {}


def test_a_target_that_cannot_be_created_is_a_clear_error_not_a_crash(node, context):
    """A file where the CO's parent directory should be: the OSError reaches the client as a sentence."""
    node.service.NodeStageVolume(stage_request(node), context)
    open(os.path.join(node.root, "mnt", "pod"), "w").close()
    request = publish_request(node, target_path=os.path.join(node.root, "mnt", "pod", "mount"))
    code, details = code_of(node.service.NodePublishVolume, request, context)
    assert code == grpc.StatusCode.INTERNAL and "cannot create the directory" in details and "File exists" in details


# --- properties over arbitrary text ---

ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)


@given(st.lists(st.sampled_from(["", ".", "..", "a", "b c", "\r", "\\", "-o"]) | ANY_TEXT))
def test_canonical_path_is_refusal_or_a_fixed_point_without_dot_dot(parts):
    path = "/".join(parts)
    try:
        canonical = canonical_path(path, "p")
    except InvalidPath:
        return
    assert canonical.startswith("/") and "//" not in canonical and canonical_path(canonical, "p") == canonical
    assert ".." not in canonical.split("/") and "." not in canonical.split("/") and "\0" not in canonical


@given(ANY_TEXT.filter(lambda name: name and "/" not in name and "\0" not in name))
def test_every_mount_point_name_survives_the_mount_table(tmp_path_factory, name):
    mount_point = "/mnt/" + name
    info = tmp_path_factory.mktemp("mi") / "mountinfo"
    info.write_bytes(f"301 22 0:5 /sdb {kernel_escaped(mount_point)} rw - devtmpfs udev rw\n".encode())
    assert [e.mount_point for e in MountTable(str(info)).entries()] == [mount_point]
