#!/usr/bin/env bash
# Configures (once) and builds lathe into build/ with ccache. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_DIR=${CCACHE_DIR:-$PWD/.ccache}
# Paths relative to the checkout, so a second checkout reuses the cache.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
JOBS=${LATHE_JOBS:-$(nproc)}
if [ ! -f build/build.ninja ]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLATHE_PYTHON="$PWD/.venv/bin/python" ${LATHE_CMAKE_ARGS:-}
fi
cmake --build build -j "$JOBS"
