#!/usr/bin/env bash
# Builds lathe's torch-free unit tests with AddressSanitizer and
# UndefinedBehaviorSanitizer (GCC, as the main build) into build-asan/ and
# runs them under ctest. Usage:
#   scripts/sanitize.sh [-R REGEX]   only the tests whose names match REGEX
# "Torch-free": the tests labelled unit whose targets link nothing of
# libtorch (read from CMake's dependency graph); the libtorch tests are left
# out because each of their files takes minutes under the sanitizers on a
# small machine. Any sanitizer report fails its test (halt_on_error).
# Run scripts/setup.sh first; LATHE_JOBS sets the build's parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."
filter=.
while [ $# -gt 0 ]; do
  case "$1" in
    -R) filter=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "sanitize.sh: unknown flag $1" >&2; exit 2 ;;
  esac
done
export CCACHE_DIR=${CCACHE_DIR:-$PWD/.ccache}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
if [ ! -f build-asan/build.ninja ]; then
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLATHE_BUILD_BENCH=OFF \
    -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_C_FLAGS="$flags" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DLATHE_PYTHON="$PWD/.venv/bin/python" --graphviz=build-asan/graph/lathe.dot ${LATHE_CMAKE_ARGS:-} >/dev/null
else
  # Configure again so tests added since are listed and graphed.
  cmake build-asan --graphviz=build-asan/graph/lathe.dot >/dev/null
fi
# Unit tests whose dependency graph holds no torch library.
tests=()
for t in $(ctest --test-dir build-asan -N -L unit | sed -n 's/^ *Test *#[0-9]*: //p'); do
  [[ "$t" =~ $filter ]] || continue
  graph=build-asan/graph/lathe.dot.$t
  [ -f "$graph" ] || continue
  grep -qi 'torch' "$graph" || tests+=("$t")
done
[ ${#tests[@]} -gt 0 ] || { echo "sanitize.sh: no torch-free unit test matches $filter" >&2; exit 2; }
echo "[sanitize] ${#tests[@]} tests: ${tests[*]}"
cmake --build build-asan -j "${LATHE_JOBS:-$(nproc)}" --target "${tests[@]}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
regex="^($(IFS='|'; echo "${tests[*]}"))\$"
ctest --test-dir build-asan -R "$regex" --output-on-failure
