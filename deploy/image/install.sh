#!/bin/sh
# What goes into Berth's container image, for both ways of building it:
#   Containerfile        FROM debian:bookworm-slim, then this script (podman/docker build; pushed to a registry)
#   lab/kube_images.py   mmdebstrap bookworm, then this script in the chroot (no registry, for the lab cluster)
#
#   install.sh deps PYPROJECT   Debian packages (./packages) and the venv /opt/berth with the dependencies that
#                               PYPROJECT names (core + the `node` extra): the big layer that rarely changes
#   install.sh berth SRC        Berth itself from the source tree SRC: a thin layer, rebuilt on every code change
set -eu

here=$(cd "$(dirname "$0")" && pwd)
venv=/opt/berth
# .pyc files are written by pip at install time only (they make start-up fast); nothing writes more later.
export PYTHONDONTWRITEBYTECODE=1

pip() {
  "$venv/bin/pip" --no-cache-dir --disable-pip-version-check --no-input "$@"
}

case "${1:-}" in
deps)
  pyproject=$2
  cp "$here/dpkg-slim.cfg" /etc/dpkg/dpkg.cfg.d/berth-slim
  export DEBIAN_FRONTEND=noninteractive
  # mmdebstrap leaves fresh lists behind (and has installed the list already); a container base has none.
  if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    apt-get update -q
  fi
  # shellcheck disable=SC2046
  apt-get install -y -q --no-install-recommends $(sed 's/#.*//' "$here/packages")
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old

  python3 -m venv "$venv"
  python3 -c '
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["node"]))
' "$pyproject" >/tmp/berth-requirements.txt
  pip install -q -r /tmp/berth-requirements.txt
  rm /tmp/berth-requirements.txt
  ;;
berth)
  src=$2
  pip install -q "$src[node]"
  "$venv/bin/berth" --version
  ;;
*)
  echo "usage: $0 deps PYPROJECT | berth SRC" >&2
  exit 2
  ;;
esac
