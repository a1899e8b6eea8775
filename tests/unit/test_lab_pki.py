"""The lab cluster's PKI: identities that RBAC and the node authorizer recognise, and an apiserver certificate
that is valid for every address a client uses."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
import yaml

from lab import pki


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.make_pki(d, ["node1", "node2"])
    return d


def test_every_certificate_is_signed_by_the_ca(pki_dir: Path) -> None:
    for name in ("apiserver", "admin", "kube-controller-manager", "kube-scheduler", "kube-proxy", "node1", "node2"):
        out = openssl("verify", "-CAfile", str(pki_dir / "ca.crt"), str(pki_dir / f"{name}.crt"))
        assert out.strip().endswith("OK"), out


@pytest.mark.parametrize(
    ("name", "subject"),
    [
        ("node1", "O = system:nodes, CN = system:node:node1"),
        ("kube-proxy", "CN = system:kube-proxy"),
        ("admin", "O = system:masters"),
        ("kube-controller-manager", "CN = system:kube-controller-manager"),
    ],
)
def test_client_identities_are_the_ones_rbac_knows(pki_dir: Path, name: str, subject: str) -> None:
    text = openssl("x509", "-in", str(pki_dir / f"{name}.crt"), "-noout", "-subject", "-ext", "extendedKeyUsage")
    assert subject in text
    assert "TLS Web Client Authentication" in text


def test_apiserver_certificate_covers_loopback_the_service_ip_and_the_guest_forward(pki_dir: Path) -> None:
    text = openssl("x509", "-in", str(pki_dir / "apiserver.crt"), "-noout", "-ext", "subjectAltName,extendedKeyUsage")
    for address in ("IP Address:127.0.0.1", f"IP Address:{pki.KUBERNETES_SERVICE_IP}",
                    f"IP Address:{pki.GUEST_API_ADDRESS}", "DNS:kubernetes.default.svc"):  # fmt: skip
        assert address in text
    assert "TLS Web Server Authentication" in text


def test_kubeconfig_embeds_the_users_certificate(pki_dir: Path) -> None:
    cfg = yaml.safe_load(pki.kubeconfig(pki_dir, "node2", "https://10.0.2.100:6443"))
    assert cfg["clusters"][0]["cluster"]["server"] == "https://10.0.2.100:6443"
    user = cfg["users"][0]["user"]
    assert base64.b64decode(user["client-certificate-data"]) == (pki_dir / "node2.crt").read_bytes()
    assert base64.b64decode(user["client-key-data"]) == (pki_dir / "node2.key").read_bytes()
