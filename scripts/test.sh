#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test: GoogleTest units and
# mpirun tests under ctest, the parity suite against transformers/peft, then
# the service end to end on loopback (coordinator + mpirun dp_workers), both
# under pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# LATHE_CUDA=1: the CUDA build (build-cuda/, .venv-cuda); its gpu tests run
# where a GPU is visible (elsewhere, as in the CPU build, they are skipped).
BUILD=build
VENV=.venv
if [ "${LATHE_CUDA:-0}" = 1 ]; then
  BUILD=build-cuda
  VENV=.venv-cuda
fi
bash scripts/setup.sh
bash scripts/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Two cores: one math thread per process keeps runs stable and fast.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
(cd "$BUILD" && ctest --output-on-failure --timeout 600)
LATHE_BUILD_DIR="$PWD/$BUILD" "$VENV/bin/python" -m pytest tests/parity tests/e2e tests/launch -q -p no:cacheprovider
