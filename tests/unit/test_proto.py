"""The CSI wire protocol: proto/csi.proto, its generated stubs, and wire identity with upstream v1.12.0."""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

REPO = Path(__file__).resolve().parents[2]
PROJECT_PROTO = REPO / "proto" / "csi.proto"
# The shared reference material sits beside the checkout (../shared), wherever the clone is.
DEFAULT_REFERENCE_PROTO = REPO.parent / "shared" / "reference" / "csi-spec-v1.12.0" / "csi.proto"
REFERENCE_ENV = "BERTH_CSI_REFERENCE_PROTO"


def _load_generator():
    spec = importlib.util.spec_from_file_location("berth_proto_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()


# --- generated stubs ---------------------------------------------------------------------------------


def test_stubs_are_not_stale():
    try:
        generator.check()
    except generator.GenerateError as exc:
        pytest.fail(str(exc))


def test_check_names_stale_files(tmp_path):
    generator.generate(tmp_path)
    assert generator.stale_files(tmp_path) == []
    (tmp_path / "csi_driver/csi/csi_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "csi_driver/csi/csi_pb2.pyi").unlink()
    (tmp_path / "csi_driver/kubelet/pluginregistration_pb2_grpc.py").write_text("# edited by hand\n")
    assert generator.stale_files(tmp_path) == [
        "csi_driver/csi/csi_pb2.py",
        "csi_driver/csi/csi_pb2.pyi",
        "csi_driver/kubelet/pluginregistration_pb2_grpc.py",
    ]
    with pytest.raises(generator.GenerateError, match=r"csi_pb2\.py, .*csi_pb2\.pyi, .*pluginregistration_pb2_grpc"):
        generator.check(tmp_path)


def test_package_reexports_stubs():
    import csi_driver.csi as csi
    from csi_driver.csi import csi_pb2, csi_pb2_grpc

    assert csi.csi_pb2 is csi_pb2
    assert csi.csi_pb2_grpc is csi_pb2_grpc
    assert csi_pb2_grpc.csi__pb2 is csi_pb2
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert hasattr(csi_pb2_grpc, "IdentityServicer")
    assert hasattr(csi_pb2_grpc, "add_NodeServicer_to_server")


def test_kubelet_registration_stubs_match_what_kubelet_calls():
    from csi_driver.kubelet import pluginregistration_pb2, pluginregistration_pb2_grpc

    assert pluginregistration_pb2_grpc.pluginregistration__pb2 is pluginregistration_pb2
    service = pluginregistration_pb2.DESCRIPTOR.services_by_name["Registration"]
    assert service.full_name == "pluginregistration.Registration"
    assert set(service.methods_by_name) == {"GetInfo", "NotifyRegistrationStatus"}

    def numbers(message):
        return {field.name: field.number for field in message.DESCRIPTOR.fields}

    assert numbers(pluginregistration_pb2.PluginInfo) == {
        "type": 1,
        "name": 2,
        "endpoint": 3,
        "supported_versions": 4,
    }
    assert pluginregistration_pb2.PluginInfo.DESCRIPTOR.fields_by_name["supported_versions"].is_repeated
    assert numbers(pluginregistration_pb2.RegistrationStatus) == {"plugin_registered": 1, "error": 2}
    assert numbers(pluginregistration_pb2.InfoRequest) == {}
    assert numbers(pluginregistration_pb2.RegistrationStatusResponse) == {}


# --- wire identity with the upstream spec ------------------------------------------------------------


def _reference_proto() -> Path:
    override = os.environ.get(REFERENCE_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            pytest.fail(f"{REFERENCE_ENV}={override} does not name a file")
        return path
    if not DEFAULT_REFERENCE_PROTO.is_file():
        pytest.skip(
            f"upstream CSI v1.12.0 csi.proto not found at {DEFAULT_REFERENCE_PROTO} (../shared beside the "
            f"checkout); set {REFERENCE_ENV} to its path to run this comparison"
        )
    return DEFAULT_REFERENCE_PROTO


def _compile(proto: Path, work: Path) -> descriptor_pb2.FileDescriptorProto:
    """Compile proto (as file name csi.proto, no source info) and return its FileDescriptorProto."""
    from grpc_tools import protoc

    work.mkdir()
    shutil.copyfile(proto, work / "csi.proto")
    out = work / "csi.pb"
    well_known = resources.files("grpc_tools") / "_proto"
    rc = protoc.main(
        ["grpc_tools.protoc", f"-I{work}", f"-I{well_known}", f"--descriptor_set_out={out}", "csi.proto"]
    )
    assert rc == 0, f"protoc failed compiling {proto}"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    assert [f.name for f in fds.file] == ["csi.proto"]
    return fds.file[0]


def _text(fdp: descriptor_pb2.FileDescriptorProto) -> list[str]:
    # Custom options are extensions unknown to descriptor_pb2, printed by number: 1059 = csi_secret,
    # 1060 = alpha_field / alpha_message / alpha_method / alpha_service / alpha_enum / alpha_enum_value.
    return text_format.MessageToString(fdp, print_unknown_fields=True).splitlines(keepends=True)


def test_project_proto_is_wire_identical_to_reference(tmp_path):
    reference = _compile(_reference_proto(), tmp_path / "reference")
    project = _compile(PROJECT_PROTO, tmp_path / "project")
    if project != reference or project.SerializeToString(deterministic=True) != reference.SerializeToString(
        deterministic=True
    ):
        diff = "".join(
            difflib.unified_diff(
                _text(reference), _text(project), "reference csi.proto", "proto/csi.proto", n=6
            )
        )
        pytest.fail(f"proto/csi.proto is not wire-identical to the CSI v1.12.0 reference:\n{diff}")


# --- custom options from Python ------------------------------------------------------------------------


def _field_option(message, field: str, extension):
    return message.DESCRIPTOR.fields_by_name[field].GetOptions().Extensions[extension]


def test_csi_secret_option_is_readable():
    from csi_driver.csi import csi_pb2

    assert _field_option(csi_pb2.CreateVolumeRequest, "secrets", csi_pb2.csi_secret) is True
    assert _field_option(csi_pb2.CreateVolumeRequest, "parameters", csi_pb2.csi_secret) is False
    assert _field_option(csi_pb2.NodeStageVolumeRequest, "secrets", csi_pb2.csi_secret) is True
    assert _field_option(csi_pb2.NodeStageVolumeRequest, "volume_context", csi_pb2.csi_secret) is False
    # NodeExpandVolumeRequest.secrets carries both custom field options.
    assert _field_option(csi_pb2.NodeExpandVolumeRequest, "secrets", csi_pb2.csi_secret) is True
    assert _field_option(csi_pb2.NodeExpandVolumeRequest, "secrets", csi_pb2.alpha_field) is True


def test_alpha_options_are_readable():
    from csi_driver.csi import csi_pb2

    fd = csi_pb2.DESCRIPTOR
    assert fd.services_by_name["SnapshotMetadata"].GetOptions().Extensions[csi_pb2.alpha_service] is True
    assert fd.services_by_name["Node"].GetOptions().Extensions[csi_pb2.alpha_service] is False
    get_snapshot = fd.services_by_name["Controller"].methods_by_name["GetSnapshot"]
    assert get_snapshot.GetOptions().Extensions[csi_pb2.alpha_method] is True
    assert csi_pb2.VolumeCondition.DESCRIPTOR.GetOptions().Extensions[csi_pb2.alpha_message] is True
    mode = csi_pb2.VolumeCapability.AccessMode.Mode.DESCRIPTOR
    assert mode.values_by_name["SINGLE_NODE_MULTI_WRITER"].GetOptions().Extensions[csi_pb2.alpha_enum_value]
    assert not mode.values_by_name["SINGLE_NODE_WRITER"].GetOptions().Extensions[csi_pb2.alpha_enum_value]
