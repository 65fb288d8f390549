#!/usr/bin/env bash
# The main job as a service on one machine: installs what is missing, builds,
# generates a tiny random Qwen3-MoE model and synthetic SFT data under runs/,
# starts a coordinator (with Tinker's REST API on a free port, docs/http-api.md)
# and 2 replicas x a group of 2 dp_worker ranks under
# mpirun (expert parallel over the group), waits until the deployment serves,
# runs a short LoRA SFT job through it with the `lathe` CLI (one progress
# line per step; exits 1 unless the loss falls), saves a checkpoint under
# runs/checkpoints and lists it, then shuts everything down.
#
# Environment: LATHE_REPLICAS (2), LATHE_GROUP (2 ranks per replica), LATHE_EP
# (2), LATHE_STEPS (30), LATHE_LOG_DIR (runs/local-logs). Extra arguments go
# to `lathe train` (see `build/client/lathe --helpfull`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
replicas=${LATHE_REPLICAS:-2}
group=${LATHE_GROUP:-2}
ep=${LATHE_EP:-2}
steps=${LATHE_STEPS:-30}
logs=${LATHE_LOG_DIR:-runs/local-logs}
mkdir -p runs "$logs"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The replicas' credential on the coordinator (read by both from the environment).
LATHE_WORKER_TOKEN=${LATHE_WORKER_TOKEN:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')}
export LATHE_WORKER_TOKEN
make_args=()
[ -f runs/tiny-qwen3-moe/config.json ] || make_args+=(--make_tiny_model runs/tiny-qwen3-moe)
[ -f runs/sft-data.jsonl ] || make_args+=(--make_data runs/sft-data.jsonl)
[ ${#make_args[@]} -eq 0 ] || build/runtime/lathe_sft "${make_args[@]}"

coordinator_pid=""
workers_pid=""
cleanup() {
  [ -n "$coordinator_pid" ] && kill -TERM "$coordinator_pid" 2>/dev/null || true
  # The workers stop on the coordinator's shutdown; give them a moment.
  for _ in $(seq 50); do
    [ -n "$workers_pid" ] && kill -0 "$workers_pid" 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$workers_pid" ] && kill -TERM "$workers_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

rm -f "$logs/port" "$logs/http_port"
build/coordinator/lathe_coordinator --listen 127.0.0.1:0 --port_file "$logs/port" --replicas "$replicas" \
  --http_port 0 --http_port_file "$logs/http_port" \
  --checkpoint_root runs/checkpoints >"$logs/coordinator.log" 2>&1 &
coordinator_pid=$!
for _ in $(seq 100); do [ -s "$logs/port" ] && break; sleep 0.1; done
[ -s "$logs/port" ] || { echo "coordinator did not start; see $logs/coordinator.log" >&2; exit 1; }
address="127.0.0.1:$(cat "$logs/port")"
echo "[local] Tinker REST API on http://127.0.0.1:$(cat "$logs/http_port") (TINKER_BASE_URL; docs/http-api.md)"
echo "[local] operator's page on http://127.0.0.1:$(cat "$logs/http_port")/ops (metrics: /metrics; docs/operations.md)"
echo "[local] coordinator on $address; starting $replicas x $group dp_worker ranks (logs in $logs)"
mpirun --oversubscribe -np $((replicas * group)) build/dp_worker/dp_worker --coordinator "$address" \
  --model runs/tiny-qwen3-moe --replicas "$replicas" --ep "$ep" --checkpoint_root runs/checkpoints \
  ${LATHE_DTYPE:+--dtype "$LATHE_DTYPE"} >"$logs/workers.log" 2>&1 &
workers_pid=$!
build/client/lathe info --address "$address" --wait_s 120
build/client/lathe train --address "$address" --data runs/sft-data.jsonl --steps "$steps" --batch_size 8 \
  --learning_rate 5e-3 --lora_rank 32 --min_loss_drop 0.05 --save final "$@"
build/client/lathe checkpoints --address "$address"
