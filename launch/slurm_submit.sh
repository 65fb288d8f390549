#!/usr/bin/env bash
# Submits launch/slurm.sbatch with an allocation sized from the plan of
# $LATHE_MODEL x $LATHE_REPLICAS: nodes = replicas x node_count, one task and
# one GPU per device. Extra arguments go to sbatch (--partition, --time, ...).
# With LATHE_REPLICA_JOBS=1 (a job step per replica) the job asks for
# --no-kill: a failed node ends the steps on it, not the job. LATHE_DRY_RUN=1
# prints the sbatch command.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/plan_env.sh
cmd=(sbatch --nodes="$LATHE_PLAN_NODES" --ntasks-per-node="$LATHE_PLAN_DEVICES_PER_NODE"
  --gpus-per-node="$LATHE_PLAN_DEVICES_PER_NODE" --export=ALL,LATHE_HOME="$PWD")
[ "${LATHE_REPLICA_JOBS:-0}" = 1 ] && cmd+=(--no-kill)
cmd+=("$@" launch/slurm.sbatch)
if [ "${LATHE_DRY_RUN:-0}" = 1 ]; then echo "${cmd[*]}"; exit 0; fi
"${cmd[@]}"
