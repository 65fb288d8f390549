#!/usr/bin/env bash
# A deployment with mpirun over a hostfile: the coordinator on this machine,
# the dp_worker ranks on the hosts of $LATHE_HOSTFILE (one line per node,
# "host slots=<devices>"), devices_per_node ranks per node. Stops everything
# on SIGTERM/SIGINT (the coordinator stops the workers). The coordinator
# serves TLS with LATHE_TLS_CERT/LATHE_TLS_KEY (workers verify with
# LATHE_TLS_CA), or plaintext with LATHE_INSECURE_LISTEN=1; the workers
# register with LATHE_WORKER_TOKEN (a fresh random one unless set).
# docs/launching.md lists every variable; LATHE_DRY_RUN=1 prints the two
# commands and exits.
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
# The token travels in the environment (mpirun -x), never on a command line.
LATHE_WORKER_TOKEN=${LATHE_WORKER_TOKEN:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')}
export LATHE_WORKER_TOKEN
workers=(mpirun -np "$LATHE_PLAN_RANKS" --map-by "$map_by" --bind-to none)
[ -n "$hostfile" ] && workers+=(--hostfile "$hostfile")
for v in LATHE_WORKER_TOKEN NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG OMP_NUM_THREADS LD_LIBRARY_PATH PATH; do
  [ -n "${!v:-}" ] && workers+=(-x "$v")
done
# shellcheck disable=SC2206
workers+=(${LATHE_MPIRUN_ARGS:-} "$LATHE_WORKER_BIN" --coordinator "$host:@PORT@" --model "$LATHE_MODEL_DIR"
  --base_model "$LATHE_PLAN_MODEL" --replicas "$LATHE_PLAN_REPLICAS" ${LATHE_LAYOUT_FLAGS:-})
[ -n "${LATHE_CHECKPOINT_ROOT:-}" ] && workers+=(--checkpoint_root "$LATHE_CHECKPOINT_ROOT")
[ -n "${LATHE_DTYPE:-}" ] && workers+=(--dtype "$LATHE_DTYPE")
if [ -n "${LATHE_TLS_CERT:-}" ]; then
  coordinator+=(--tls_cert "$LATHE_TLS_CERT" --tls_key "${LATHE_TLS_KEY:?set LATHE_TLS_KEY with LATHE_TLS_CERT}")
  workers+=(--tls_ca "${LATHE_TLS_CA:?set LATHE_TLS_CA (same path on every host) with LATHE_TLS_CERT}")
elif [ "${LATHE_INSECURE_LISTEN:-0}" = 1 ]; then
  coordinator+=(--insecure_listen)
fi
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
