#!/bin/sh
# CI setup for the storage lab: host packages, then build (or reuse) the cached guest image.
# Run from anywhere; scripts/setup calls this (nasm: the hand-over VM guest is assembled on the host too;
# umoci: lab/kube_images.py packs the lab cluster's container images as OCI archives; socat, openssl and
# containerd: the lab cluster's apiserver forward, PKI and pre-unpacked node image store).
set -eu
cd "$(dirname "$0")/.."

need=""
for pair in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils mmdebstrap:mmdebstrap \
            ssh:openssh-client ssh-keygen:openssh-client mkfs.ext4:e2fsprogs nasm:nasm \
            socat:socat openssl:openssl umoci:umoci containerd:containerd; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need="$need ${pair#*:}"
done
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx switch_root || need="$need busybox-static"
if [ -n "$need" ] || [ "${BERTH_LAB_APT_UPDATE:-0}" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # shellcheck disable=SC2086
  [ -z "$need" ] || apt-get install -y -q --no-install-recommends $need
else
  # The image pins the kernel the host's apt lists name; refresh them if they are older than a day.
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mtime -1 2>/dev/null | head -n1)" ]; then
    apt-get update -q
  fi
fi

# PYTHON: any python3 >= 3.11 (the lab uses only the standard library); CSI_SANITY: a prebuilt binary to
# put in the image instead of building it with Go.
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" -m lab build
