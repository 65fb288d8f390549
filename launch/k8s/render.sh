#!/usr/bin/env bash
# Prints a Kubernetes manifest for a deployment: `render.sh mpijob` (Kubeflow
# MPI Operator, kubeflow.org/v2beta1) or `render.sh lws` (LeaderWorkerSet,
# leaderworkerset.x-k8s.io/v1), every replica in one MPI job, each with a
# Service for the coordinator; or `render.sh lws-replicas`: the coordinator a
# Deployment and Service, each replica a LeaderWorkerSet group of its own.
# Sized from the plan of $LATHE_MODEL x $LATHE_REPLICAS; every other
# variable is listed in docs/launching.md. Usage: render.sh mpijob | kubectl apply -f -
set -euo pipefail
here=$(dirname "$0")
source "$here/../plan_env.sh"
kind=${1:?usage: render.sh mpijob|lws|lws-replicas}
[ -f "$here/$kind.yaml" ] || { echo "render.sh: no template $kind (mpijob, lws, lws-replicas)" >&2; exit 2; }
export LATHE_NAME=${LATHE_NAME:-lathe}
export LATHE_IMAGE=${LATHE_IMAGE:-lathe:latest}
export LATHE_MODEL_DIR=${LATHE_MODEL_DIR:-/models/$(basename "$LATHE_PLAN_MODEL")}
export LATHE_MODEL_PVC=${LATHE_MODEL_PVC:-lathe-models}
export LATHE_CHECKPOINT_PVC=${LATHE_CHECKPOINT_PVC:-lathe-checkpoints}
export LATHE_API_KEY_SECRET=${LATHE_API_KEY_SECRET:-lathe-api-key}
export LATHE_SSH_SECRET=${LATHE_SSH_SECRET:-lathe-ssh}
export LATHE_WORKER_TOKEN_SECRET=${LATHE_WORKER_TOKEN_SECRET:-lathe-worker-token}
export LATHE_PORT=${LATHE_PORT:-7777}
export LATHE_NCCL_SOCKET_IFNAME=${LATHE_NCCL_SOCKET_IFNAME:-eth0}
export LATHE_LAYOUT_FLAGS=${LATHE_LAYOUT_FLAGS:-}
# --max_runs of the coordinator and the workers (unset: their default).
export LATHE_MAX_RUNS_FLAGS=${LATHE_MAX_RUNS:+--max_runs $LATHE_MAX_RUNS}
# TLS from the Secret $LATHE_TLS_SECRET (tls.crt, tls.key, ca.crt; its
# certificate names ${LATHE_NAME}-coordinator), unless LATHE_INSECURE_LISTEN=1.
# Kubernetes' gRPC probe speaks plaintext only: under TLS the readiness probe
# checks that the port accepts connections.
export LATHE_TLS_SECRET=${LATHE_TLS_SECRET:-lathe-tls}
if [ "${LATHE_INSECURE_LISTEN:-0}" = 1 ]; then
  export LATHE_COORDINATOR_TLS_FLAGS="--insecure_listen" LATHE_WORKER_TLS_FLAGS="" LATHE_PROBE=grpc
else
  export LATHE_COORDINATOR_TLS_FLAGS="--tls_cert /etc/lathe/tls/tls.crt --tls_key /etc/lathe/tls/tls.key"
  export LATHE_WORKER_TLS_FLAGS="--tls_ca /etc/lathe/tls/ca.crt" LATHE_PROBE=tcpSocket
fi
export LATHE_PLAN_MODEL LATHE_PLAN_REPLICAS LATHE_PLAN_NODES LATHE_PLAN_RANKS LATHE_PLAN_DEVICES_PER_NODE
export LATHE_PLAN_NODE_COUNT
export LATHE_PLAN_WORKER_NODES=$((LATHE_PLAN_NODES - 1))
# lws-replicas: one group (one MPI job) per replica.
export LATHE_PLAN_GROUP_WORKER_NODES=$((LATHE_PLAN_NODE_COUNT - 1))
export LATHE_PLAN_GROUP_RANKS=$((LATHE_PLAN_RANKS / LATHE_PLAN_REPLICAS))
# ${VAR} placeholders only; everything else passes through unchanged.
perl -pe 's/\$\{(LATHE_[A-Z_]+)\}/exists $ENV{$1} ? $ENV{$1} : die "render.sh: $1 is not set\n"/ge' \
  "$here/$kind.yaml"
