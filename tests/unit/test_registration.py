"""Registration with kubelet (what node-driver-registrar did): the socket, the two RPCs, the CLI wiring."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from csi_driver import cli
from csi_driver.config import load_config
from csi_driver.csi import csi_pb2, csi_pb2_grpc
from csi_driver.kubelet import pluginregistration_pb2, pluginregistration_pb2_grpc
from csi_driver.server.registration import KubeletRegistration

DRIVER = "berth.csi.io"


def registration_stub(socket_path: Path) -> pluginregistration_pb2_grpc.RegistrationStub:
    return pluginregistration_pb2_grpc.RegistrationStub(grpc.insecure_channel(f"unix:{socket_path}"))


def get_info(socket_path: Path) -> pluginregistration_pb2.PluginInfo:
    return registration_stub(socket_path).GetInfo(pluginregistration_pb2.InfoRequest(), timeout=5)


@pytest.fixture
def registration(tmp_path):
    registry = str(tmp_path / "plugins_registry")
    registration = KubeletRegistration(registry, DRIVER, "/var/lib/kubelet/plugins/x/csi.sock")
    registration.start()
    yield registration
    registration.stop()


def test_get_info_answers_what_kubelet_checks(tmp_path, registration):
    socket_path = tmp_path / "plugins_registry" / f"{DRIVER}-reg.sock"
    assert registration.socket_path == str(socket_path)
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    info = get_info(socket_path)
    assert info.type == "CSIPlugin"
    assert info.name == DRIVER
    assert info.endpoint == "/var/lib/kubelet/plugins/x/csi.sock"
    assert list(info.supported_versions) == ["1.0.0"]


def test_refused_registration_is_logged_with_kubelet_reason_and_serving_goes_on(tmp_path, registration, caplog):
    stub = registration_stub(Path(registration.socket_path))
    with caplog.at_level(logging.INFO, logger="berth.registration"):
        stub.NotifyRegistrationStatus(
            pluginregistration_pb2.RegistrationStatus(plugin_registered=False, error="version 9.0.0 unsupported"),
            timeout=5,
        )
        stub.NotifyRegistrationStatus(pluginregistration_pb2.RegistrationStatus(plugin_registered=True), timeout=5)
    refused, accepted = [r for r in caplog.records if r.name == "berth.registration" and "kubelet" in r.msg]
    assert refused.levelno == logging.ERROR and refused.reason == "version 9.0.0 unsupported"
    assert accepted.levelno == logging.INFO and accepted.msg == "registered with kubelet"
    assert get_info(Path(registration.socket_path)).name == DRIVER, "still serving after a refusal"


def test_stale_socket_is_replaced_and_stop_removes_it(tmp_path):
    registry = tmp_path / "plugins_registry"
    registry.mkdir()
    socket_path = registry / f"{DRIVER}-reg.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(socket_path))
    stale.close()  # what a killed process leaves behind
    registration = KubeletRegistration(str(registry), DRIVER, "/csi/csi.sock")
    registration.start()
    try:
        assert get_info(socket_path).endpoint == "/csi/csi.sock"
    finally:
        registration.stop()
    assert not socket_path.exists()
    registration.stop()  # a second stop (start failed, signal during start-up) is harmless


# --- wired through the CLI -------------------------------------------------------------------------------------


def node_config(tmp_path: Path) -> Path:
    path = tmp_path / "berth.yaml"
    path.write_text(f"node:\n  state_dir: {tmp_path / 'state'}\n  protocols: [nfs]\n")
    return path


def build_node_server(tmp_path: Path, monkeypatch, *extra: str):
    # The node's readiness (mount tools, state dir) is the host's business, not this test's.
    monkeypatch.setattr("csi_driver.node.prerequisites.node_readiness_check", lambda *a, **k: lambda: None)
    config_path = node_config(tmp_path)
    args = cli.build_parser().parse_args(
        ["--mode", "node", "--node-id", "node-1", "--config", str(config_path),
         "--endpoint", f"unix://{tmp_path}/csi/csi.sock", *extra]
    )  # fmt: skip
    return cli.build_server(args, load_config(config_path))


def test_node_server_registers_its_csi_socket_and_cleans_up(tmp_path, monkeypatch):
    server = build_node_server(tmp_path, monkeypatch, "--kubelet-registration-dir", str(tmp_path / "registry"))
    reg_socket = tmp_path / "registry" / f"{DRIVER}-reg.sock"
    server.start()
    try:
        info = get_info(reg_socket)
        assert info.endpoint == f"{tmp_path}/csi/csi.sock", "defaults to the path of --endpoint"
        # What kubelet does next: dial the endpoint it was given.
        identity = csi_pb2_grpc.IdentityStub(grpc.insecure_channel(f"unix:{info.endpoint}"))
        assert identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5).name == info.name == DRIVER
    finally:
        server.stop(0)
    assert not reg_socket.exists() and not (tmp_path / "csi" / "csi.sock").exists()


def test_kubelet_csi_endpoint_is_what_kubelet_is_told(tmp_path, monkeypatch):
    server = build_node_server(
        tmp_path,
        monkeypatch,
        "--kubelet-registration-dir",
        str(tmp_path / "registry"),
        "--kubelet-csi-endpoint",
        "/var/lib/kubelet/plugins/berth.csi.io/csi.sock",
    )
    server.start()
    try:
        info = get_info(tmp_path / "registry" / f"{DRIVER}-reg.sock")
        assert info.endpoint == "/var/lib/kubelet/plugins/berth.csi.io/csi.sock"
    finally:
        server.stop(0)


def test_no_registration_without_the_flag(tmp_path, monkeypatch):
    server = build_node_server(tmp_path, monkeypatch)
    assert server.companions == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "controller", "--kubelet-registration-dir", "/r"], "--kubelet-registration-dir needs --mode node"),
        (
            ["--mode", "node", "--node-id", "n", "--endpoint", "tcp://127.0.0.1:0", "--kubelet-registration-dir", "/r"],
            "needs --kubelet-csi-endpoint",
        ),
        (["--health-port", "70000"], "--health-port must be 0 (off) or a TCP port"),
    ],
)
def test_cli_rejects_unusable_flag_combinations(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_sigterm_removes_the_registration_socket(tmp_path):
    """The real program: the registration socket appears once Berth serves, and goes on SIGTERM."""
    reg_socket = tmp_path / "registry" / f"{DRIVER}-reg.sock"
    csi_socket = tmp_path / "csi" / "csi.sock"
    argv = [
        sys.executable, "-m", "csi_driver", "--mode", "node", "--node-id", "node-1",
        "--config", str(node_config(tmp_path)), "--endpoint", f"unix://{csi_socket}",
        "--kubelet-registration-dir", str(reg_socket.parent),
    ]  # fmt: skip
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not reg_socket.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no registration socket after 30 s"
            time.sleep(0.05)
        assert csi_socket.exists(), "the CSI socket listens before kubelet is told about it"
        assert get_info(reg_socket).endpoint == str(csi_socket)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    stderr = process.stderr.read()
    assert "registration socket removed" in stderr
    assert not reg_socket.exists() and not csi_socket.exists()
