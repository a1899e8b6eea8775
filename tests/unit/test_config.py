from pathlib import Path

import pytest

from csi_driver.config import ConfigError, load_config

VALID = """
driver_name: berth.example.org
default_backend: lab
backends:
  lab:
    protocol: iscsi
    host: {address: 198.18.0.1, ssh_port: 22}
    lvm: {volume_group: berth, thin_pool: pool, over_provisioning_ratio: 2}
    iscsi: {portals: ["198.18.0.1:3260", "198.18.1.1:3260"]}
node:
  max_volumes_per_node: 16
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "berth.yaml"
    path.write_text(text)
    return path


def test_valid_file_is_typed(tmp_path):
    config = load_config(write(tmp_path, VALID))
    backend = config.backends["lab"]
    assert config.driver_name == "berth.example.org"
    assert backend.lvm.over_provisioning_ratio == 2.0 and isinstance(
        backend.lvm.over_provisioning_ratio, float
    )
    assert backend.iscsi.portals == ["198.18.0.1:3260", "198.18.1.1:3260"]
    assert backend.host.ssh_user == "root"
    assert config.node.max_volumes_per_node == 16


def test_no_file_means_defaults():
    assert load_config(None).driver_name == "berth.csi.io"


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")).backends == {}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("thin_pool: pool", "thin_pol: pool"), "key 'backends.lab.lvm.thin_pol': unknown key"),
        (
            ("ssh_port: 22", "ssh_port: twenty"),
            "key 'backends.lab.host.ssh_port': expected an integer, got a string",
        ),
        (
            ("ssh_port: 22", "ssh_port: true"),
            "key 'backends.lab.host.ssh_port': expected an integer, got a boolean",
        ),
        (("protocol: iscsi", "protocol: fc"), "key 'backends.lab.protocol': expected one of 'iscsi', 'nfs'"),
        (("volume_group: berth, ", ""), "key 'backends.lab.lvm.volume_group': missing, expected a string"),
        (("default_backend: lab", "default_backend: other"), "names backend 'other', which is not defined"),
        (("max_volumes_per_node: 16", "max_volumes_per_node: [1]"), "expected an integer, got a list"),
        (('portals: ["198.18.0.1:3260", "198.18.1.1:3260"]', "portals: []"), "expected at least one"),
        (
            ("over_provisioning_ratio: 2", "over_provisioning_ratio: 0"),
            "key 'backends.lab.lvm.over_provisioning_ratio': expected a number above 0 and at most 100, got 0",
        ),
        (("over_provisioning_ratio: 2", "over_provisioning_ratio: 1000000"), "at most 100, got 1e+06"),
        (("  lab:\n", "  lab/x:\n"), "key 'backends.lab/x': a backend name is 1-100 of"),
        (("  lab:\n", f"  {'b' * 101}:\n"), "(it is part of every volume ID)"),
        (("ssh_port: 22", "ssh_port: 22, ssh_connect_timeout_seconds: 0"), "expected 1 to 120 seconds"),
        (
            ("iscsi: {portals", f"iscsi: {{iqn_prefix: iqn.2026-11.{'x' * 100}, portals"),
            "key 'backends.lab.iscsi.iqn_prefix': at most 100 bytes",
        ),
        (
            ("max_volumes_per_node: 16", "max_volumes_per_node: 16\n  storage_networks: [198.18.0/33]"),
            "key 'node.storage_networks[0]': expected a network like",
        ),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path, edit, expected):
    path = write(tmp_path, VALID.replace(*edit))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"config file {path}: ")
    assert expected in message


def test_protocol_section_required(tmp_path):
    text = VALID.replace('    iscsi: {portals: ["198.18.0.1:3260", "198.18.1.1:3260"]}\n', "")
    with pytest.raises(ConfigError, match="'backends.lab.iscsi': required when protocol is 'iscsi'"):
        load_config(write(tmp_path, text))


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "backends: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "absent.yaml")


def test_cli_reports_config_error_without_traceback(tmp_path, capsys):
    from csi_driver.cli import main

    path = write(tmp_path, "backendz: {}")
    assert main(["--config", str(path), "--endpoint", f"unix://{tmp_path}/s.sock"]) == 2
    err = capsys.readouterr().err
    assert f"berth: config file {path}: key 'backendz': unknown key" in err
    assert "Traceback" not in err
