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
  libgloo-dev  # the cross-replica collectives between separate jobs (parallel/gloo_communicator.h)
  python3-venv python3-dev
  openssl  # the tests make TLS certificates with it
  clang  # libFuzzer targets (scripts/fuzz.sh); its runtimes are installed below
  # tests/launch/test_slurm.py starts a private single-node slurm with these.
  slurmd slurmctld slurm-client munge
  # tests/e2e/test_ops.py opens the operator's page in headless Chromium.
  chromium chromium-driver
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

# libFuzzer and clang's sanitizer runtimes come in a package named after
# clang's major version (libclang-rt-14-dev on Debian 12).
clang_rt="libclang-rt-$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)-dev"
if ! dpkg-query -W -f='${Status}' "$clang_rt" 2>/dev/null | grep -q "install ok installed"; then
  echo "[setup] installing $clang_rt"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$clang_rt"
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
# LATHE_CUDA=1: the CUDA build's own environment, .venv-cuda (scripts/build.sh
# builds build-cuda/ against it): torch and NCCL from requirements-cuda.txt, then
# the rest of requirements-dev.txt. Several GB; reinstalled only when either changes.
if [ "${LATHE_CUDA:-0}" = 1 ]; then
  if [ ! -x .venv-cuda/bin/python ]; then
    echo "[setup] creating .venv-cuda"
    "$PY" -m venv .venv-cuda
  fi
  cuda_stamp=.venv-cuda/.lathe-requirements
  if [ "$(cat requirements-cuda.txt requirements-dev.txt)" != "$(cat "$cuda_stamp" 2>/dev/null)" ]; then
    echo "[setup] installing the CUDA PyTorch wheel and the Python packages into .venv-cuda"
    .venv-cuda/bin/pip install -q -r requirements-cuda.txt
    grep -v -E '^(torch|nvidia-nccl-cu13)==' requirements-dev.txt > .venv-cuda/.lathe-dev-rest.txt
    .venv-cuda/bin/pip install -q -r requirements-cuda.txt -r .venv-cuda/.lathe-dev-rest.txt
    cat requirements-cuda.txt requirements-dev.txt > "$cuda_stamp"
  fi
fi
# The Loops SDK (tests/e2e/test_loops.py) needs Python >= 3.12: its own venv,
# .venv-loops, from the first such interpreter found; none: skipped (the test
# skips too).
LOOPS_SDK="baseten-loops==0.32.0"
loops_py=""
for c in ${LATHE_LOOPS_PYTHON:-} python3.13 python3.12 python3 "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
    loops_py=$c
    break
  fi
done
if [ -z "$loops_py" ]; then
  echo "[setup] no Python >= 3.12 found (set LATHE_LOOPS_PYTHON): skipping .venv-loops (the Loops SDK tests skip)"
elif [ "$(cat .venv-loops/.lathe-loops 2>/dev/null)" != "$LOOPS_SDK" ]; then
  echo "[setup] installing $LOOPS_SDK into .venv-loops ($loops_py)"
  [ -x .venv-loops/bin/python ] || "$loops_py" -m venv .venv-loops
  .venv-loops/bin/pip install -q "$LOOPS_SDK"
  echo "$LOOPS_SDK" > .venv-loops/.lathe-loops
fi
# tinker-cookbook's recipes (tests/e2e/test_cookbook.py), in their own environment: the
# cookbook pins transformers <= 5.5.4, older than .venv's. torch first, the CPU build as in
# .venv, so the cookbook's torch requirement pulls no CUDA wheels; math-rl: rl_loop's grading.
COOKBOOK_PACKAGES=("tinker==0.38.0" "tinker-cookbook[math-rl]==0.5.8")
cookbook_stamp=.venv-cookbook/.lathe-packages
if [ "$(cat "$cookbook_stamp" 2>/dev/null)" != "$(grep '^torch==' requirements-dev.txt) ${COOKBOOK_PACKAGES[*]}" ]; then
  echo "[setup] installing tinker-cookbook into .venv-cookbook"
  [ -x .venv-cookbook/bin/python ] || "$PY" -m venv .venv-cookbook
  .venv-cookbook/bin/pip install -q "$(grep '^torch==' requirements-dev.txt)"
  .venv-cookbook/bin/pip install -q "${COOKBOOK_PACKAGES[@]}"
  echo "$(grep '^torch==' requirements-dev.txt) ${COOKBOOK_PACKAGES[*]}" > "$cookbook_stamp"
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
