#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test: GoogleTest units and
# mpirun tests under ctest, the parity suite against transformers/peft, then
# the service end to end on loopback (coordinator + mpirun dp_workers), both
# under pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Two cores: one math thread per process keeps runs stable and fast.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
(cd build && ctest --output-on-failure --timeout 600)
LATHE_BUILD_DIR="$PWD/build" .venv/bin/python -m pytest tests/parity tests/e2e tests/launch -q -p no:cacheprovider
