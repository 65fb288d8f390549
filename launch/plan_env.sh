# Sourced by the launch scripts: resolves the layout of $LATHE_MODEL (a preset
# name, or any name with $LATHE_LAYOUT_FLAGS) into LATHE_PLAN_* variables with
# `lathe plan --format env`, and sets LATHE_BIN (the folder holding
# lathe_coordinator, dp_worker, lathe; default: this checkout's build/).
LATHE_BIN=${LATHE_BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/build}
_lathe_tool() { [ -f "$LATHE_BIN/$1" ] && [ -x "$LATHE_BIN/$1" ] && echo "$LATHE_BIN/$1" || echo "$LATHE_BIN/$2/$1"; }
LATHE_COORDINATOR_BIN=$(_lathe_tool lathe_coordinator coordinator)
LATHE_WORKER_BIN=$(_lathe_tool dp_worker dp_worker)
LATHE_CLI_BIN=$(_lathe_tool lathe client)
: "${LATHE_MODEL:?set LATHE_MODEL to a preset name (lathe plan --list) or the name of the model}"
# shellcheck disable=SC2086
_lathe_plan=$("$LATHE_CLI_BIN" plan --model "$LATHE_MODEL" --replicas "${LATHE_REPLICAS:-0}" ${LATHE_LAYOUT_FLAGS:-} \
  --format env) || { echo "launch: no layout for $LATHE_MODEL (see above)" >&2; exit 2; }
eval "$_lathe_plan"
