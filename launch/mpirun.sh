#!/usr/bin/env bash
# A deployment with mpirun over a hostfile: the coordinator on this machine,
# the dp_worker ranks on the hosts of $LATHE_HOSTFILE (one line per node,
# "host slots=<devices>"), devices_per_node ranks per node. Stops everything
# on SIGTERM/SIGINT (the coordinator stops the workers). docs/launching.md
# lists every variable; LATHE_DRY_RUN=1 prints the two commands and exits.
set -euo pipefail
source "$(dirname "$0")/plan_env.sh"
: "${LATHE_MODEL_DIR:?set LATHE_MODEL_DIR to the model folder (same path on every host)}"
hostfile=${LATHE_HOSTFILE:-}
port=${LATHE_PORT:-7777}
host=${LATHE_COORDINATOR_HOST:-$(hostname -f 2>/dev/null || hostname)}
logs=${LATHE_LOG_DIR:-runs/mpirun-logs}
map_by=${LATHE_MAP_BY:-ppr:${LATHE_PLAN_DEVICES_PER_NODE}:node}
coordinator=("$LATHE_COORDINATOR_BIN" --listen "0.0.0.0:$port" --replicas "$LATHE_PLAN_REPLICAS"
  --port_file "$logs/port" --auth "${LATHE_AUTH:-auto}")
[ -n "${LATHE_CHECKPOINT_ROOT:-}" ] && coordinator+=(--checkpoint_root "$LATHE_CHECKPOINT_ROOT")
[ -n "${LATHE_API_KEY_FILE:-}" ] && coordinator+=(--api_keys_file "$LATHE_API_KEY_FILE")
workers=(mpirun -np "$LATHE_PLAN_RANKS" --map-by "$map_by" --bind-to none)
[ -n "$hostfile" ] && workers+=(--hostfile "$hostfile")
for v in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG OMP_NUM_THREADS LD_LIBRARY_PATH PATH; do
  [ -n "${!v:-}" ] && workers+=(-x "$v")
done
# shellcheck disable=SC2206
workers+=(${LATHE_MPIRUN_ARGS:-} "$LATHE_WORKER_BIN" --coordinator "$host:@PORT@" --model "$LATHE_MODEL_DIR"
  --base_model "$LATHE_PLAN_MODEL" --replicas "$LATHE_PLAN_REPLICAS" ${LATHE_LAYOUT_FLAGS:-})
[ -n "${LATHE_CHECKPOINT_ROOT:-}" ] && workers+=(--checkpoint_root "$LATHE_CHECKPOINT_ROOT")
[ -n "${LATHE_API_KEY_FILE:-}" ] && workers+=(--api_key_file "$LATHE_API_KEY_FILE")
if [ "${LATHE_DRY_RUN:-0}" = 1 ]; then
  echo "coordinator: ${coordinator[*]}"
  echo "workers: ${workers[*]//@PORT@/$port}"
  exit 0
fi
mkdir -p "$logs"
rm -f "$logs/port"
coordinator_pid="" workers_pid=""
stop() {
  [ -n "$coordinator_pid" ] && kill -TERM "$coordinator_pid" 2>/dev/null || true
  [ -n "$workers_pid" ] && { sleep 3; kill -TERM "$workers_pid" 2>/dev/null || true; }
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 0' TERM INT
"${coordinator[@]}" >"$logs/coordinator.log" 2>&1 &
coordinator_pid=$!
for _ in $(seq 300); do
  [ -s "$logs/port" ] || ! kill -0 "$coordinator_pid" 2>/dev/null && break
  sleep 0.1
done
if [ ! -s "$logs/port" ]; then
  echo "coordinator did not start ($logs/coordinator.log):" >&2
  tail -n 5 "$logs/coordinator.log" >&2
  exit 1
fi
port=$(cat "$logs/port")
echo "[mpirun] coordinator on $host:$port; $LATHE_PLAN_RANKS dp_worker ranks (logs in $logs)"
"${workers[@]//@PORT@/$port}" >"$logs/workers.log" 2>&1 &
workers_pid=$!
wait "$workers_pid"
