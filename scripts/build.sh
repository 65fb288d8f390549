#!/usr/bin/env bash
# Configures (once) and builds lathe into build/ with ccache. Run scripts/setup.sh first.
# LATHE_CUDA=1: the CUDA build instead, into build-cuda/, against the CUDA
# PyTorch wheel of .venv-cuda, with the NCCL backend required (LATHE_CUDA=1
# bash scripts/setup.sh installs it; see docs/build-and-dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_DIR=${CCACHE_DIR:-$PWD/.ccache}
# Paths relative to the checkout, so a second checkout reuses the cache.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
JOBS=${LATHE_JOBS:-$(nproc)}
BUILD=build
VENV=.venv
EXTRA=()
if [ "${LATHE_CUDA:-0}" = 1 ]; then
  BUILD=build-cuda
  VENV=.venv-cuda
  EXTRA=(-DLATHE_CUDA=ON -DLATHE_WITH_NCCL=ON)
  if [ ! -x "$VENV/bin/python" ]; then
    LATHE_CUDA=1 bash scripts/setup.sh
  fi
fi
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLATHE_PYTHON="$PWD/$VENV/bin/python" "${EXTRA[@]}" ${LATHE_CMAKE_ARGS:-}
fi
cmake --build "$BUILD" -j "$JOBS" ${LATHE_TARGETS:+--target $LATHE_TARGETS}
