#!/usr/bin/env bash
# Installs everything lathe needs on a fresh Debian 12 / Ubuntu 24.04 machine.
# Idempotent: a second run finds everything present and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  openmpi-bin libopenmpi-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libgtest-dev libgmock-dev nlohmann-json3-dev
  libcpp-httplib-dev  # the Tinker-compatible HTTP door (http/)
  libzstd-dev  # its zstd request bodies
  python3-venv python3-dev
  openssl  # the tests make TLS certificates with it
  # tests/launch/test_slurm.py starts a private single-node slurm with these.
  slurmd slurmctld slurm-client munge
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${LATHE_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# Reinstall only when requirements-dev.txt changed since the last install.
stamp=.venv/.lathe-requirements
if ! cmp -s requirements-dev.txt "$stamp"; then
  echo "[setup] installing Python packages into .venv"
  # torch first and pinned, so nothing later pulls a different build.
  .venv/bin/pip install -q "$(grep '^torch==' requirements-dev.txt)"
  .venv/bin/pip install -q -r requirements-dev.txt
  cp requirements-dev.txt "$stamp"
fi
# tinker 0.24.1, the last Tinker SDK that speaks JSON only, in a venv of its own
# (tests/e2e/test_http_tinker024.py runs it in a subprocess).
if [ ! -x .venv-tinker024/bin/python ]; then
  echo "[setup] creating .venv-tinker024"
  "$PY" -m venv .venv-tinker024
fi
stamp=.venv-tinker024/.lathe-requirements
if ! cmp -s requirements-tinker024.txt "$stamp"; then
  echo "[setup] installing Python packages into .venv-tinker024"
  .venv-tinker024/bin/pip install -q -r requirements-tinker024.txt
  cp requirements-tinker024.txt "$stamp"
fi
echo "[setup] ok"
