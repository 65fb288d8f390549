#!/usr/bin/env bash
# A deployment with mpirun over a hostfile: the coordinator on this machine,
# the dp_worker ranks on the hosts of $LATHE_HOSTFILE (one line per node,
# "host slots=<devices>"), devices_per_node ranks per node. Stops everything
# on SIGTERM/SIGINT (the coordinator stops the workers). The coordinator
# serves TLS with LATHE_TLS_CERT/LATHE_TLS_KEY (workers verify with
# LATHE_TLS_CA), or plaintext with LATHE_INSECURE_LISTEN=1; the workers
# register with LATHE_WORKER_TOKEN (a fresh random one unless set).
# docs/launching.md lists every variable; LATHE_DRY_RUN=1 prints the
# commands and exits. LATHE_REPLICA_JOBS=1 starts each replica as an mpirun
# job of its own (dp_worker --replica_index; replica i on hostfile lines
# i*node_count …) and starts a replica whose job failed again (up to
# LATHE_MAX_RESTARTS times, after LATHE_RESTART_DELAY_S, doubling): the
# others serve on meanwhile and the restarted one rejoins.
set -euo pipefail
source "$(dirname "$0")/plan_env.sh"
source "$(dirname "$0")/replica_supervisor.sh"
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
if [ -n "${LATHE_MAX_RUNS:-}" ]; then
  coordinator+=(--max_runs "$LATHE_MAX_RUNS")
  workers+=(--max_runs "$LATHE_MAX_RUNS")
fi
if [ -n "${LATHE_TLS_CERT:-}" ]; then
  coordinator+=(--tls_cert "$LATHE_TLS_CERT" --tls_key "${LATHE_TLS_KEY:?set LATHE_TLS_KEY with LATHE_TLS_CERT}")
  workers+=(--tls_ca "${LATHE_TLS_CA:?set LATHE_TLS_CA (same path on every host) with LATHE_TLS_CERT}")
elif [ "${LATHE_INSECURE_LISTEN:-0}" = 1 ]; then
  coordinator+=(--insecure_listen)
fi
replica_jobs=${LATHE_REPLICA_JOBS:-0}
per_replica=$((LATHE_PLAN_RANKS / LATHE_PLAN_REPLICAS))
# Replica i's job: its own ranks (and hostfile lines), the same flags plus its index.
replica_cmd() {
  local i=$1 cmd=() w
  for w in "${workers[@]}"; do
    if [ "$w" = "$LATHE_PLAN_RANKS" ] && [ ${#cmd[@]} = 2 ]; then cmd+=("$per_replica"); else cmd+=("$w"); fi
  done
  if [ -n "$hostfile" ]; then
    local k
    for k in "${!cmd[@]}"; do [ "${cmd[$k]}" = "$hostfile" ] && cmd[$k]="$logs/hosts-$i"; done
  fi
  cmd+=(--replica_index "$i")
  [ -n "${LATHE_GLOO_HOSTNAME:-}" ] && cmd+=(--gloo_hostname "$LATHE_GLOO_HOSTNAME")
  printf '%s\n' "${cmd[@]}"
}
if [ "$replica_jobs" = 1 ] && [ -n "$hostfile" ]; then
  mapfile -t lines < <(grep -v '^[[:space:]]*\(#\|$\)' "$hostfile")
  if [ "${#lines[@]}" -lt "$LATHE_PLAN_NODES" ]; then
    echo "launch: LATHE_REPLICA_JOBS=1 needs a hostfile line per node (replica i on lines i*node_count …):" \
      "$hostfile has ${#lines[@]}, the plan $LATHE_PLAN_NODES" >&2
    exit 2
  fi
fi
if [ "${LATHE_DRY_RUN:-0}" = 1 ]; then
  echo "coordinator: ${coordinator[*]}"
  if [ "$replica_jobs" = 1 ]; then
    for i in $(seq 0 $((LATHE_PLAN_REPLICAS - 1))); do
      mapfile -t cmd < <(replica_cmd "$i")
      echo "replica $i: ${cmd[*]//@PORT@/$port}"
    done
  else
    echo "workers: ${workers[*]//@PORT@/$port}"
  fi
  exit 0
fi
mkdir -p "$logs"
rm -f "$logs/port"
rm -f "$logs/stopping"
coordinator_pid="" workers_pid="" replica_pids=()
stop() {
  touch "$logs/stopping"  # no replica is started again
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
if [ "$replica_jobs" != 1 ]; then
  echo "[mpirun] coordinator on $host:$port; $LATHE_PLAN_RANKS dp_worker ranks (logs in $logs)"
  "${workers[@]//@PORT@/$port}" >"$logs/workers.log" 2>&1 &
  workers_pid=$!
  wait "$workers_pid"
  exit $?
fi
echo "[mpirun] coordinator on $host:$port; $LATHE_PLAN_REPLICAS replica jobs of $per_replica ranks (logs in $logs)"
if [ -n "$hostfile" ]; then
  for i in $(seq 0 $((LATHE_PLAN_REPLICAS - 1))); do
    printf '%s\n' "${lines[@]:$((i * LATHE_PLAN_NODE_COUNT)):$LATHE_PLAN_NODE_COUNT}" >"$logs/hosts-$i"
  done
fi
# One supervisor per replica (launch/replica_supervisor.sh): a job that fails
# is started again; it ends with a clean exit (the coordinator stopped it) or
# once stopping.
supervise() {
  local i=$1
  mapfile -t cmd < <(replica_cmd "$i")
  lathe_supervise_replica mpirun "$i" "$logs/replica-$i.log" "$logs/stopping" "$coordinator_pid" \
    "${cmd[@]//@PORT@/$port}"
}
for i in $(seq 0 $((LATHE_PLAN_REPLICAS - 1))); do
  supervise "$i" &
  replica_pids+=($!)
done
status=0
for pid in "${replica_pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
