"""The lab cluster's PKI and kubeconfigs, made with the openssl command (no kubeadm, no Python crypto library).

One CA signs everything: the apiserver's serving certificate and one client certificate per identity. The
identities are the ones a production cluster uses, so RBAC, the node authorizer and NodeRestriction apply to
the lab as they would anywhere: kubelets are `system:node:<name>` in `system:nodes`, kube-proxy is
`system:kube-proxy`, the admin is in `system:masters`.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

# The apiserver as the guests reach it: a qemu guestfwd address on each node's control NIC, on the apiserver's
# own port (the `kubernetes` Service's endpoint carries that port).
GUEST_API_ADDRESS = "10.0.2.100"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
API_SANS = [
    "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local", "DNS:localhost", "IP:127.0.0.1",
    f"IP:{KUBERNETES_SERVICE_IP}", f"IP:{GUEST_API_ADDRESS}",
]  # fmt: skip


def _openssl(*args: str, input: bytes | None = None) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, input=input)


def make_ca(d: Path) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(d / "ca.key"))
    _openssl("req", "-x509", "-new", "-key", str(d / "ca.key"), "-subj", "/CN=berth-lab-ca", "-days", "30",
             "-out", str(d / "ca.crt"), "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip


def make_cert(d: Path, name: str, subject: str, usage: str, sans: list[str] | None = None) -> None:
    """name.key + name.crt signed by d/ca: usage is serverAuth or clientAuth."""
    key, csr, crt = (d / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    ext = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if sans:
        ext.append("subjectAltName=" + ",".join(sans))
    ext_file = d / f"{name}.ext"
    ext_file.write_text("\n".join(ext) + "\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-days", "30", "-extfile", str(ext_file), "-out", str(crt))  # fmt: skip
    csr.unlink()
    ext_file.unlink()


def make_pki(d: Path, nodes: list[str]) -> None:
    """Everything the control plane, the kubelets, kube-proxy and the admin need, in directory d."""
    d.mkdir(parents=True, exist_ok=True)
    make_ca(d)
    make_cert(d, "apiserver", "/CN=kube-apiserver", "serverAuth", API_SANS)
    clients = {
        "admin": "/O=system:masters/CN=berth-lab-admin",
        "apiserver-kubelet-client": "/O=system:masters/CN=kube-apiserver-kubelet-client",
        "kube-controller-manager": "/CN=system:kube-controller-manager",
        "kube-scheduler": "/CN=system:kube-scheduler",
        "kube-proxy": "/CN=system:kube-proxy",
        **{node: f"/O=system:nodes/CN=system:node:{node}" for node in nodes},
    }
    for name, subject in clients.items():
        make_cert(d, name, subject, "clientAuth")
    _openssl("genrsa", "-out", str(d / "sa.key"), "2048")
    _openssl("rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"))


def kubeconfig(d: Path, user: str, server: str) -> str:
    """A kubeconfig for client certificate `user` (d/user.crt + key) with the CA and certs embedded."""

    def b64(name: str) -> str:
        return base64.b64encode((d / name).read_bytes()).decode()

    return f"""apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: {server}
    certificate-authority-data: {b64("ca.crt")}
users:
- name: {user}
  user:
    client-certificate-data: {b64(user + ".crt")}
    client-key-data: {b64(user + ".key")}
contexts:
- name: lab
  context: {{cluster: lab, user: {user}}}
current-context: lab
"""
