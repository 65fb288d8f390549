#!/usr/bin/env bash
# Builds lathe's libFuzzer targets (fuzz/, clang + ASan + UBSan) into
# build-fuzz/ with ccache and runs them. Usage:
#   scripts/fuzz.sh [--target NAME]... [--time SECONDS] [--runs N] [--build-only]
#   --target NAME  run only this target (fuzz_submit_request, ...); repeatable; default all
#   --time S       stop each target after S seconds (default 20)
#   --runs N       stop each target after N executions (default: no limit, --time decides)
#   --build-only   build, run nothing
#   --build-dir D  build and keep corpora/artifacts in D instead of build-fuzz/
# Exit status: 0 no finding, 1 a finding or a failed build, 2 bad flags, 77 no clang.
# Each target starts from its committed seeds (fuzz/corpus/<target>/) and
# keeps what it finds in <build-dir>/corpus/<target>/ for the next run; a
# crash, leak, sanitizer report or broken invariant leaves its input in
# <build-dir>/artifacts/ and makes the script exit 1. One summary line per
# target: executions, seconds, result. Extra libFuzzer flags: LATHE_FUZZ_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=() seconds=20 runs=-1 build_only=0 dir=build-fuzz
while [ $# -gt 0 ]; do
  case "$1" in
    --target) targets+=("$2"); shift 2 ;;
    --time) seconds=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --build-only) build_only=1; shift ;;
    --build-dir) dir=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "fuzz.sh: unknown flag $1" >&2; exit 2 ;;
  esac
done
# 77: skipped (ctest's fuzz_smoke reports it as such), not failed.
command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ not found (scripts/setup.sh installs it): nothing fuzzed" >&2; exit 77; }
export CCACHE_DIR=${CCACHE_DIR:-$PWD/.ccache}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
if [ ! -f "$dir/build.ninja" ]; then
  CC=clang CXX=clang++ cmake -S fuzz -B "$dir" -G Ninja >/dev/null
fi
if ! cmake --build "$dir" -j "${LATHE_JOBS:-$(nproc)}" >"$dir/build.log" 2>&1; then
  tail -n 40 "$dir/build.log" >&2
  exit 1
fi
[ "$build_only" = 1 ] && exit 0
[ ${#targets[@]} -eq 0 ] && targets=($(cd fuzz && ls fuzz_*.cc | sed 's/\.cc$//'))
mkdir -p "$dir/artifacts"
failed=0
for t in "${targets[@]}"; do
  [ -x "$dir/$t" ] || { echo "fuzz.sh: no target $t" >&2; exit 2; }
  mkdir -p "$dir/corpus/$t"
  dict=(); [ -f "fuzz/dict/$t.dict" ] && dict=(-dict="fuzz/dict/$t.dict")
  log="$dir/$t.log"
  start=$(date +%s)
  set +e
  "$dir/$t" -max_total_time="$seconds" -runs="$runs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$dir/artifacts/$t-" "${dict[@]}" ${LATHE_FUZZ_FLAGS:-} \
    "$dir/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if [ "$rc" = 0 ]; then result=ok; else result="FAILED (rc $rc, see $log)"; failed=1; fi
  echo "$t: ${execs:-?} executions in $(( $(date +%s) - start )) s: $result"
done
exit "$failed"
